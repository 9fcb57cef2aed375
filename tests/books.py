"""The books, checked in SQL: every invariant of README's "Guarantees", from the rows alone.

:func:`problems` reads the current state and names every broken invariant;
:func:`Snapshot` remembers what must never change (ledger rows, revoked and
expired keys, ended sessions) so that :meth:`Snapshot.broken_since` can tell
what a later state undid. Independent of tokendb's own audits: the tests use
both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import asyncpg

_EMAIL_SHAPE = r"^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$"

# One row per broken invariant: (invariant, the row at fault).
PROBLEMS = f"""
WITH ledger AS (
    SELECT t.*,
           lag(balance_after, 1, 0) OVER w AS previous_after,
           row_number() OVER w AS position,
           row_number() OVER (PARTITION BY user_id ORDER BY created_at DESC, id DESC) AS newest
    FROM token_transactions t
    WINDOW w AS (PARTITION BY user_id ORDER BY created_at, id)
), messages AS (
    SELECT m.*,
           lag(tokens_used_after, 1, 0) OVER w AS previous_after,
           row_number() OVER w AS position,
           row_number() OVER (PARTITION BY session_id ORDER BY created_at DESC, id DESC) AS newest
    FROM chat_messages m
    WINDOW w AS (PARTITION BY session_id ORDER BY created_at, id)
), billed AS (
    SELECT m.id, m.session_id, m.tokens, coalesce(-t.amount, 0) AS billed
    FROM chat_messages m
    JOIN chat_sessions s ON s.id = m.session_id
    LEFT JOIN token_transactions t
        ON t.reference_id = m.id AND t.type = 'usage' AND t.user_id = s.user_id
)
SELECT 'ledger chain', id::text FROM ledger
    WHERE balance_after <> previous_after + amount OR seq <> position
UNION ALL
SELECT 'balance = sum = newest balance_after', u.id::text FROM users u
    WHERE u.token_balance <> coalesce(
            (SELECT sum(amount) FROM token_transactions WHERE user_id = u.id), 0)
       OR u.token_balance <> coalesce(
            (SELECT balance_after FROM ledger WHERE user_id = u.id AND newest = 1), 0)
UNION ALL
SELECT 'balance >= 0', id::text FROM users WHERE token_balance < 0
UNION ALL
SELECT 'ledger row dated after its commit', id::text FROM token_transactions
    WHERE created_at > clock_timestamp()
UNION ALL
SELECT 'message chain', id::text FROM messages
    WHERE tokens_used_after <> previous_after + tokens OR seq <> position
UNION ALL
SELECT 'message dated after its commit', id::text FROM chat_messages
    WHERE created_at > clock_timestamp()
UNION ALL
SELECT 'tokens_used = sum of tokens = newest total', s.id::text FROM chat_sessions s
    WHERE s.tokens_used <> coalesce(
            (SELECT sum(tokens) FROM chat_messages WHERE session_id = s.id), 0)
       OR s.tokens_used <> coalesce(
            (SELECT tokens_used_after FROM messages WHERE session_id = s.id AND newest = 1), 0)
UNION ALL
SELECT 'tokens_used = sum billed', s.id::text FROM chat_sessions s
    WHERE s.tokens_used <> coalesce((SELECT sum(billed) FROM billed WHERE session_id = s.id), 0)
UNION ALL
SELECT 'message billed exactly', id::text FROM billed WHERE billed <> tokens
UNION ALL
SELECT 'session key of its user', s.id::text FROM chat_sessions s
    JOIN api_keys k ON k.id = s.api_key_id WHERE k.user_id <> s.user_id
UNION ALL
SELECT 'email normalised and shaped', id::text FROM users
    WHERE email <> lower(btrim(email)) OR email !~ '{_EMAIL_SHAPE}'
UNION ALL
SELECT 'held tokens = sum of active holds', u.id::text FROM users u
    WHERE u.held_tokens <> coalesce(
        (SELECT sum(amount) FROM token_holds WHERE user_id = u.id AND status = 'active'), 0)
UNION ALL
SELECT 'a capture is a new usage row of the hold, its key and model', h.id::text
    FROM token_holds h LEFT JOIN token_transactions t ON t.id = h.captured_transaction_id
    WHERE h.status = 'captured' AND (
        t.id IS NULL OR t.user_id <> h.user_id OR t.type <> 'usage'
        OR t.amount <> -h.captured_amount OR t.created_at < h.created_at
        OR t.api_key_id IS DISTINCT FROM coalesce(h.api_key_id, t.api_key_id)
        OR t.model IS DISTINCT FROM coalesce(h.model, t.model))
"""


async def problems(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    """Every broken invariant of the current state, as ``(invariant, row id)``."""
    return [(row[0], row[1]) for row in await conn.fetch(PROBLEMS)]


@dataclass
class Snapshot:
    """What no later state may undo: ledger rows, revocations, expiries, ended sessions, ids."""

    ledger: dict[Any, tuple[Any, ...]] = field(default_factory=dict)
    revoked: dict[Any, str] = field(default_factory=dict)  # key id -> key_hash
    expired: dict[Any, Any] = field(default_factory=dict)  # key id -> expires_at
    ended: dict[Any, Any] = field(default_factory=dict)  # session id -> ended_at
    # Users that own ledger rows or keys may not be deleted (but by the owner),
    # and API keys may not: an id of either that vanished was renamed.
    kept_users: set[Any] = field(default_factory=set)
    keys: set[Any] = field(default_factory=set)

    @classmethod
    async def take(cls, conn: asyncpg.Connection) -> Snapshot:
        snapshot = cls()
        for row in await conn.fetch("SELECT * FROM token_transactions"):
            snapshot.ledger[row["id"]] = tuple(row.values())
        for row in await conn.fetch(
            "SELECT id, key_hash, is_active, expires_at, expires_at <= clock_timestamp() AS gone "
            "FROM api_keys"
        ):
            if not row["is_active"]:
                snapshot.revoked[row["id"]] = row["key_hash"]
            if row["gone"]:
                snapshot.expired[row["id"]] = row["expires_at"]
        for row in await conn.fetch(
            "SELECT id, ended_at FROM chat_sessions WHERE ended_at IS NOT NULL"
        ):
            snapshot.ended[row["id"]] = row["ended_at"]
        snapshot.kept_users = {
            row["id"]
            for row in await conn.fetch(
                "SELECT id FROM users u WHERE EXISTS (SELECT FROM token_transactions t "
                "WHERE t.user_id = u.id) OR EXISTS (SELECT FROM api_keys k WHERE k.user_id = u.id)"
            )
        }
        snapshot.keys = {row["id"] for row in await conn.fetch("SELECT id FROM api_keys")}
        return snapshot

    def broken_since(self, earlier: Snapshot) -> list[str]:
        """What this (later) snapshot undid of ``earlier``'s."""
        found = []
        for row_id, row in earlier.ledger.items():
            if self.ledger.get(row_id) != row:
                found.append(f"ledger row {row_id} changed or vanished")
        for key_id, key_hash in earlier.revoked.items():
            if self.revoked.get(key_id) != key_hash:
                found.append(f"revoked key {key_id} came back (or lost its hash)")
        for key_id, expires_at in earlier.expired.items():
            if self.expired.get(key_id) != expires_at:
                found.append(f"expired key {key_id} came back")
        for session_id, ended_at in earlier.ended.items():
            if session_id in self.ended and self.ended[session_id] != ended_at:
                found.append(f"ended session {session_id} re-opened")
        # A session may be deleted (with its messages); it cannot come back open.
        for user_id in earlier.kept_users - self.kept_users:
            found.append(f"user {user_id}, who has ledger rows or keys, was renamed or deleted")
        for key_id in earlier.keys - self.keys:
            found.append(f"API key {key_id} was renamed or deleted")
        return found
