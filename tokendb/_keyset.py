"""Keyset pagination cursors on ``(created_at, id)``, shared by every list operation.

A page boundary is the last row of the previous page, given as the model
instance or its id. It must belong to the same owner (user or session) as
the page: a foreign id is :class:`~tokendb.errors.NotFound`, so listing
cannot be used to probe other tenants' rows.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from tortoise.models import Model

from tokendb import _args, _db
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
        cursor_id, owner_id,
    )
    if not rows:
        raise NotFound(entity, cursor_id)
    return rows[0]["created_at"], cursor_id
