"""The host's own models, with foreign keys to tokendb's (app label ``tokendb``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tortoise import fields
from tortoise.models import Model

if TYPE_CHECKING:  # at run time Tortoise resolves "tokendb.User"; importing it here
    # would also list tokendb's models in this module, where Tortoise looks for models
    from tokendb.models import TokenTransaction, User


class Project(Model):
    """A user's project; a user with projects cannot be deleted (RESTRICT)."""

    id = fields.UUIDField(primary_key=True)
    name = fields.CharField(max_length=100)
    owner: fields.ForeignKeyRelation[User] = fields.ForeignKeyField(
        "tokendb.User", related_name="projects", on_delete=fields.RESTRICT
    )
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "projects"


class ProjectCharge(Model):
    """A ledger row billed to a project, written in the same transaction as the charge."""

    id = fields.UUIDField(primary_key=True)
    project: fields.ForeignKeyRelation[Project] = fields.ForeignKeyField(
        "hostapp.Project", related_name="charges", on_delete=fields.CASCADE
    )
    transaction: fields.OneToOneRelation[TokenTransaction] = fields.OneToOneField(
        "tokendb.TokenTransaction", related_name="project_charge", on_delete=fields.RESTRICT
    )
    tokens = fields.IntField()

    class Meta:
        table = "project_charges"
