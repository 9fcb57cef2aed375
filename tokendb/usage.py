"""Usage per API key and model, per UTC day: the report and its audit.

Every usage row of the ledger records the key and the model it paid for
(``charge(api_key=, model=)``, ``add_message`` from its session), and the
database rolls each statement's usage into ``usage_daily`` (tokens and
requests per user, key, model and UTC day) with the statement that wrote it
(migration 7, ``token_transactions_usage_rollup``): the rollup is never
behind the ledger and no job resets it. A refund takes its tokens off its
*charge's* key, model and day, so refunding gives the charge's window its
tokens back; ``requests`` counts charges and does not change.

:func:`usage_report` reads only the rollup (a few rows per day), so its cost
does not grow with the ledger. :func:`audit_usage` recomputes the rollup from
the ledger and returns the groups where the two differ.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from tokendb import _args, _db, _keyset, _ledger_sql
from tokendb._translate import translated
from tokendb.errors import NotFound, ValidationError
from tokendb.models import ApiKey, User

__all__ = [
    "GROUPINGS",
    "UsageDiscrepancy",
    "UsageRow",
    "audit_usage",
    "usage_report",
]

GROUPINGS = ("day", "model", "api_key")
"""What :func:`usage_report` can group by (its default: all three)."""

_COLUMNS = {"day": ("day", "date"), "api_key": ("api_key_id", "uuid"), "model": ("model", "text")}


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One group of :func:`usage_report`: ``tokens`` (net of refunds) and ``requests``
    (charges, refunded or not). A field the report is not grouped by is ``None``;
    grouped by ``api_key``/``model``, ``None`` is the usage without a key/model."""

    day: dt.date | None
    api_key_id: UUID | None
    model: str | None
    tokens: int
    requests: int


@functools.cache  # at most 8 groupings
def _statement(groups: tuple[str, ...]) -> str:
    shown = ", ".join(
        f"{column} AS {column}" if name in groups else f"NULL::{kind} AS {column}"
        for name, (column, kind) in _COLUMNS.items()
    )
    keys = [_COLUMNS[name][0] for name in _COLUMNS if name in groups]
    grouped = f"GROUP BY {', '.join(keys)}" if keys else ""
    ordered = ", ".join(f"{key} NULLS FIRST" for key in keys) or "1"
    return f"""
SELECT {shown}, sum(tokens) AS tokens, sum(requests) AS requests
FROM usage_daily
WHERE user_id = $1 AND day >= $2 AND day < $3
  AND ($4::uuid IS NULL OR api_key_id = $4) AND ($5::text IS NULL OR model = $5)
{grouped}
HAVING count(*) > 0
ORDER BY {ordered}
"""


def _groups(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValidationError("group_by", f"must be a tuple of {', '.join(GROUPINGS)}")
    groups: list[str] = []
    for item in value:
        if not isinstance(item, str) or item not in GROUPINGS:
            raise ValidationError("group_by", f"{item!r} is not one of {', '.join(GROUPINGS)}")
        if item in groups:
            raise ValidationError("group_by", f"{item!r} is given twice")
        groups.append(item)
    return tuple(name for name in GROUPINGS if name in groups)


def _day(value: Any, field: str) -> dt.date:
    """A UTC day: a ``date``, or an aware ``datetime`` at midnight UTC.

    The rollup has one row per UTC day, so a bound inside a day could only
    be rounded, and a rounded bound reports tokens outside the range asked
    for (or leaves some out): it is refused instead.
    """
    if isinstance(value, dt.datetime):
        moment = _args.aware_datetime(value, field).astimezone(dt.UTC)
        if moment.time() != dt.time(0):
            raise ValidationError(
                field, "must be a date or midnight UTC: the rollup is per UTC day"
            )
        return moment.date()
    if isinstance(value, dt.date):
        return dt.date(value.year, value.month, value.day)
    raise ValidationError(field, f"must be a date or a datetime, got {type(value).__name__}")


@translated
async def usage_report(
    *,
    user: User | UUID | str,
    since: dt.date | dt.datetime,
    until: dt.date | dt.datetime,
    group_by: Sequence[str] = GROUPINGS,
    api_key: ApiKey | UUID | str | None = None,
    model: str | None = None,
) -> list[UsageRow]:
    """``user``'s usage from ``since`` to ``until`` (exclusive), summed per ``group_by``.

    ``since`` and ``until`` are UTC days: dates, or aware datetimes at
    midnight UTC. ``group_by`` is any of ``"day"``, ``"model"`` and
    ``"api_key"`` (``()``: one total row); rows come ordered by those fields
    (``None`` first), and a field not grouped by is ``None``. ``api_key``
    and ``model`` keep only that key's / model's usage. No usage: ``[]``.

    Reads the daily rollup, never the ledger: a month is about 30 rows per
    key and model, whatever the number of charges.

    Raises:
        NotFound: unknown user, or ``api_key`` is not one of ``user``'s keys.
        ValidationError: a bound that is not a date or midnight UTC, ``since``
            after ``until``, an unknown grouping, or another malformed argument.
        DatabaseUnavailable: the database is unreachable.
    """
    user_id = _args.ref_id(user, "user", User)
    start, end = _day(since, "since"), _day(until, "until")
    if start > end:
        raise ValidationError("since", "must not be after until")
    groups = _groups(group_by)
    key_id = _args.optional_ref_id(api_key, "api_key", ApiKey)
    model_name = None if model is None else _args.text(model, "model", max_length=50)
    rows = await _db.read(_statement(groups), user_id, start, end, key_id, model_name)
    if not rows:
        await _keyset.require_owner("users", "user", user_id)
        if key_id is not None:
            owners = await _db.read(_ledger_sql.KEY_OWNER, key_id)
            if not owners or owners[0]["user_id"] != user_id:
                raise NotFound("API key", key_id)
    return [
        UsageRow(
            day=row["day"],
            api_key_id=row["api_key_id"],
            model=row["model"],
            tokens=int(row["tokens"]),
            requests=int(row["requests"]),
        )
        for row in rows
    ]


@dataclass(frozen=True, slots=True)
class UsageDiscrepancy:
    """A group (user, key, model, UTC day) whose rollup differs from its ledger rows.

    ``tokens``/``requests`` are ``usage_daily``'s (0 without a row);
    ``ledger_tokens``/``ledger_requests`` what the ledger's usage and refund
    rows add up to.
    """

    user_id: UUID
    api_key_id: UUID | None
    model: str | None
    day: dt.date
    tokens: int
    requests: int
    ledger_tokens: int
    ledger_requests: int


@translated
async def audit_usage(*, user: User | UUID | str | None = None) -> list[UsageDiscrepancy]:
    """Check the rollup: every group (of ``user``, or of everyone) where ``usage_daily``
    is not what the ledger adds up to. Empty when they agree.

    One read over the ledger's usage and refund rows; cheap enough to run
    after every test (tokendb's own suite does, next to :func:`audit_ledger`).

    Raises:
        ValidationError: ``user`` is not a user or a UUID.
        DatabaseUnavailable: the database is unreachable.
    """
    if user is None:
        rows = await _db.read(_ledger_sql.AUDIT_USAGE)
    else:
        rows = await _db.read(_ledger_sql.AUDIT_USAGE_USER, _args.ref_id(user, "user", User))
    return [
        UsageDiscrepancy(
            user_id=row["user_id"],
            api_key_id=row["api_key_id"],
            model=row["model"],
            day=row["day"],
            tokens=int(row["tokens"]),
            requests=int(row["requests"]),
            ledger_tokens=int(row["ledger_tokens"]),
            ledger_requests=int(row["ledger_requests"]),
        )
        for row in rows
    ]
