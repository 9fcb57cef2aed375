"""Keyset pagination on ``(created_at, id)``, and the rules every list operation shares.

* A page boundary is the last row of the previous page, given as the model
  instance or its id. It must belong to the same owner (user or session) as
  the page: a foreign id is :class:`~tokendb.errors.NotFound`, so listing
  cannot be used to probe other tenants' rows.
* An unknown owner is :class:`~tokendb.errors.NotFound`; a known owner with
  no rows is an empty list (:func:`require_owner`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

from tortoise.models import Model

from tokendb import _args, _db
from tokendb._rows import to_models
from tokendb.errors import NotFound


async def cursor(
    value: Any,
    model: type[Model],
    *,
    field: str,
    entity: str,
    owner_column: str,
    owner_id: UUID,
) -> tuple[datetime, UUID]:
    """``(created_at, id)`` of the row ``value`` of ``model`` owned by ``owner_id``."""
    if isinstance(value, model):
        if getattr(value, owner_column) != owner_id:
            raise NotFound(entity, value.pk)
        created_at: datetime = getattr(value, "created_at")  # noqa: B009 - every table has it
        return created_at, value.pk
    cursor_id = _args.uuid_value(value, field)
    rows = await _db.read(
        f"SELECT created_at FROM {model._meta.db_table} WHERE id = $1 AND {owner_column} = $2",
        cursor_id,
        owner_id,
    )
    if not rows:
        raise NotFound(entity, cursor_id)
    return rows[0]["created_at"], cursor_id


M = TypeVar("M", bound=Model)


def statements(
    table: str, owner_column: str, *, newest_first: bool, condition: str | None = None
) -> tuple[str, str]:
    """The first-page and the next-page statement of ``table`` listed per ``owner_column``.

    Parameters: ``$1`` owner, ``$2`` limit, and for the next page ``$3, $4``
    the ``(created_at, id)`` of the previous page's last row. Both walk an
    ``(owner, created_at, id)`` index in order: no sort, no OFFSET.
    ``condition`` (SQL without parameters) filters the rows listed.
    """
    order, beyond = (" DESC", "<") if newest_first else ("", ">")
    ordering = f"ORDER BY created_at{order}, id{order} LIMIT $2"
    owned = f"{owner_column} = $1" + ("" if condition is None else f" AND {condition}")
    first = f"SELECT * FROM {table} WHERE {owned} {ordering}"
    following = (
        f"SELECT * FROM {table} WHERE {owned} AND (created_at, id) {beyond} ($3, $4) {ordering}"
    )
    return first, following


async def require_owner(table: str, entity: str, owner_id: UUID) -> None:
    """Raise :class:`NotFound` (``entity``, ``owner_id``) unless ``table`` has that row."""
    if not await _db.read(f"SELECT 1 FROM {table} WHERE id = $1", owner_id):
        raise NotFound(entity, owner_id)


async def page(
    model: type[M],
    sql: tuple[str, str],
    *,
    owner_column: str,
    owner_id: UUID,
    limit: int,
    boundary: Any,
    field: str,
    entity: str,
    owner: tuple[str, str] | None = None,
) -> list[M]:
    """One page of ``model`` rows owned by ``owner_id``: the first, or the one past ``boundary``.

    ``sql`` comes from :func:`statements`; ``boundary`` is the previous
    page's last row (instance or id), checked by :func:`cursor`. With
    ``owner`` (its table and entity name), an empty first page checks that
    the owner exists (:func:`require_owner`); pass None when the caller has
    checked it already.
    """
    first, following = sql
    if boundary is None:
        rows = await _db.read(first, owner_id, limit)
        if not rows and owner is not None:
            await require_owner(*owner, owner_id)
    else:
        created_at, cursor_id = await cursor(
            boundary,
            model,
            field=field,
            entity=entity,
            owner_column=owner_column,
            owner_id=owner_id,
        )
        rows = await _db.read(following, owner_id, limit, created_at, cursor_id)
    return to_models(model, rows)
