"""Per-key token limits: decided under the key's row lock, on usage read after it.

An API key with a ``token_limit`` may use at most that many tokens per
``limit_period`` (a UTC day, a UTC month, or its whole life). A usage
movement through such a key (a charge, a chat message, a hold) runs in a
transaction that

1. locks the key's row (:data:`LOCK_KEY`, ``FOR NO KEY UPDATE``), which every
   other limited movement of the key also takes first, so they queue;
2. reads the window's usage from ``usage_daily`` plus the key's active,
   unexpired holds (:data:`WINDOW`) in a *new statement*: under READ
   COMMITTED its snapshot is taken after the lock was granted, so it sees
   every movement of the key that committed before (a subquery of the
   locking statement would not: its snapshot predates the wait);
3. refuses with :class:`KeyLimitExceeded`, nothing written, or debits on the
   same connection before the key's lock is released at commit.

No counter is reset by a job: the window is read from the rollup, which the
database writes with each ledger statement (migration 7), so a refund gives
its charge's window the tokens back and a new day starts at 0 by itself.

Unlimited keys and keyless movements never take the key's lock: their
statements (:data:`tokendb._ledger_sql.MOVE`, :data:`~tokendb._ledger_sql.BATCH`,
:data:`~tokendb._ledger_sql.ADD_MESSAGE`, :data:`tokendb._holds_sql.HOLD`)
move nothing through a key that has a limit (:data:`LIMITED`, in MOVE and
HOLD as :func:`key_allowed`), and the caller then takes the path above.
Which keys have a limit is remembered per process
(:func:`probably_limited`), so a limited key's movements go straight to the
locked path; the hint is never trusted for a decision, only for the route.
"""

from __future__ import annotations

from typing import NamedTuple
from uuid import UUID

from tokendb import _db
from tokendb.errors import KeyLimitExceeded, NotFound
from tokendb.models import LimitPeriod

__all__ = [
    "LIMITED",
    "LOCK_KEY",
    "WINDOW",
    "KeyLimit",
    "check",
    "key_allowed",
    "lock_key",
    "probably_limited",
    "remember",
]

LIMITED = "k.token_limit IS NOT NULL"
"""SQL: the API key ``k`` has a limit, so nothing moves through it but under its lock."""


def key_allowed(key: str, user: str, *, decided: bool) -> str:
    """SQL: the movement's key ``key`` is NULL, or one of ``user``'s keys, and has no
    limit unless the caller ``decided`` its limit under the key's lock (:func:`check`).

    The condition of :data:`tokendb._ledger_sql.MOVE` and
    :data:`tokendb._holds_sql.HOLD` (``decided=False``), and of their
    ``_DECIDED`` twins sent under the key's lock.
    """
    limited = "" if decided else f" AND NOT {LIMITED}"
    return (
        f"({key}::uuid IS NULL OR EXISTS (\n"
        f"          SELECT 1 FROM api_keys k WHERE k.id = {key} AND k.user_id = {user}{limited}\n"
        "      ))"
    )


# FOR NO KEY UPDATE: it queues limited movements of the key (and a limit change) as FOR
# UPDATE would, but lets a foreign key check (FOR KEY SHARE) of the key through. With FOR
# UPDATE, a chat message billed through the key whose statement held the user's row and
# then checked its ledger row's key deadlocked with a limited charge holding the key and
# waiting for that user (found by tests/test_stress.py, hot users).
LOCK_KEY = "SELECT user_id, token_limit, limit_period FROM api_keys WHERE id = $1 FOR NO KEY UPDATE"

# $1 the key, $2 its period. The UTC day is the database's, as the rollup's
# (created_at = clock_timestamp()). Holds count while active and unexpired: a
# capture turns one into usage of the same or fewer tokens, so a capture never
# needs the key's lock and is never refused.
WINDOW = """
WITH today AS (SELECT (clock_timestamp() AT TIME ZONE 'UTC')::date AS d)
SELECT (SELECT coalesce(sum(u.tokens), 0) FROM usage_daily u, today
        WHERE u.api_key_id = $1
          AND u.day >= CASE $2::text
                           WHEN 'day' THEN today.d
                           WHEN 'month' THEN today.d - (extract(day FROM today.d)::int - 1)
                           ELSE '-infinity'::date END)
     + (SELECT coalesce(sum(h.amount), 0) FROM token_holds h
        WHERE h.api_key_id = $1 AND h.status = 'active' AND h.expires_at > clock_timestamp())
       AS used
"""


class KeyLimit(NamedTuple):
    """A key's ``token_limit`` per ``period``, read under its row lock."""

    limit: int
    period: LimitPeriod


_LIMITED: dict[UUID, None] = {}
_MAX_REMEMBERED = 10_000


def probably_limited(key_id: UUID) -> bool:
    """Whether ``key_id`` had a limit when this process last looked (a route, not a decision)."""
    return key_id in _LIMITED


def remember(key_id: UUID, *, limited: bool) -> None:
    """Note whether ``key_id`` has a limit (its next movement's route)."""
    if not limited:
        _LIMITED.pop(key_id, None)
        return
    if len(_LIMITED) >= _MAX_REMEMBERED:
        _LIMITED.clear()  # a forgotten key costs one refused statement, then is known again
    _LIMITED[key_id] = None


async def lock_key(conn: _db.Connection, key_id: UUID, user_id: UUID | None) -> KeyLimit | None:
    """Lock ``key_id``'s row (``user_id``'s key, when given); its limit, or None.

    Raises :class:`NotFound` for an unknown key or another user's.
    """
    row = await conn.fetchrow(LOCK_KEY, key_id)
    if row is None or (user_id is not None and row["user_id"] != user_id):
        raise NotFound("API key", key_id)
    limited = row["token_limit"] is not None
    remember(key_id, limited=limited)
    if not limited:
        return None
    return KeyLimit(int(row["token_limit"]), LimitPeriod(row["limit_period"]))


async def check(conn: _db.Connection, key_id: UUID, limit: KeyLimit, requested: int) -> None:
    """Refuse ``requested`` tokens more through ``key_id`` past its ``limit``.

    Sent after :func:`lock_key` on the same transaction: a new statement,
    so it sees every movement of the key committed before the lock.
    Raises :class:`KeyLimitExceeded`.
    """
    used = int(await conn.fetchval(WINDOW, key_id, limit.period.value))
    if used + requested > limit.limit:
        raise KeyLimitExceeded(
            key_id, limit=limit.limit, used=used, requested=requested, period=limit.period
        )
