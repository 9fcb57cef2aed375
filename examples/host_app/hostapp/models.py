"""The host's own models, with foreign keys to tokendb's (app label ``tokendb``)."""

from tortoise import fields
from tortoise.models import Model


class Project(Model):
    """A user's project; a user with projects cannot be deleted (RESTRICT)."""

    id = fields.UUIDField(primary_key=True)
    name = fields.CharField(max_length=100)
    owner = fields.ForeignKeyField(
        "tokendb.User", related_name="projects", on_delete=fields.RESTRICT
    )
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "projects"


class ProjectCharge(Model):
    """A ledger row billed to a project, written in the same transaction as the charge."""

    id = fields.UUIDField(primary_key=True)
    project = fields.ForeignKeyField(
        "hostapp.Project", related_name="charges", on_delete=fields.CASCADE
    )
    transaction = fields.OneToOneField(
        "tokendb.TokenTransaction", related_name="project_charge", on_delete=fields.RESTRICT
    )
    tokens = fields.IntField()

    class Meta:
        table = "project_charges"
