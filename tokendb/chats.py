"""Chat sessions whose messages are billed.

``add_message`` stores the message, adds its tokens to the session and
charges the user in **one statement** (:data:`_ADD_MESSAGE`), so
``session.tokens_used == Σ message.tokens == −Σ usage rows of its messages``
holds after every call. Lock order is session row, then user row,
everywhere; no code path takes them the other way round, so chats cannot
deadlock with each other or with the ledger (which locks only users).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from tokendb import _args, _db, _keyset
from tokendb.errors import (
    ApiKeyExpired,
    ApiKeyRevoked,
    ChatSessionEnded,
    InsufficientTokens,
    NotFound,
)
from tokendb.ids import new_id
from tokendb.models import ApiKey, ChatMessage, ChatSession, MessageRole, User

__all__ = [
    "MAX_CONTENT_LENGTH",
    "ChatDiscrepancy",
    "add_message",
    "audit_chats",
    "end_chat",
    "get_chat",
    "list_chats",
    "list_messages",
    "start_chat",
]

MAX_CONTENT_LENGTH = 4_000_000
"""Characters in one message: room for a full long-context prompt, not unbounded."""

_START = """
INSERT INTO chat_sessions (id, user_id, api_key_id, tokens_used, model, created_at, ended_at)
SELECT $1, user_id, id, 0, $3, clock_timestamp(), NULL
FROM api_keys
WHERE id = $2 AND is_active AND (expires_at IS NULL OR expires_at > now())
  AND ($4::uuid IS NULL OR user_id = $4)
RETURNING *
"""

# Session row first (tokens_used), then the user row (the debit). If the
# debit would go below zero, users_token_balance_nonnegative aborts the
# whole statement: the session update and the message go with it.
_ADD_MESSAGE = """
WITH session AS (
    UPDATE chat_sessions SET tokens_used = tokens_used + $5
    WHERE id = $2 AND ended_at IS NULL AND ($7::uuid IS NULL OR user_id = $7)
    RETURNING id, user_id, model
), debit AS (
    UPDATE users
    SET token_balance = token_balance - $5, updated_at = clock_timestamp()
    WHERE $5 > 0 AND id = (SELECT user_id FROM session)
    RETURNING id, token_balance
), message AS (
    INSERT INTO chat_messages (id, session_id, role, content, tokens, created_at)
    SELECT $1, id, $3, $4, $5, clock_timestamp() FROM session
    RETURNING *
), usage AS (
    INSERT INTO token_transactions
        (id, user_id, amount, type, description, reference_id, balance_after, created_at)
    SELECT $6, debit.id, -$5, 'usage', 'chat message (' || session.model || ')', $1,
           debit.token_balance, clock_timestamp()
    FROM debit, session
    RETURNING id
)
SELECT * FROM message
"""


def _owner(user: Any) -> UUID | None:
    return _args.optional_ref_id(user, "user", User)


@_db.translated
async def start_chat(
    *,
    api_key: ApiKey | UUID | str,
    model: str,
    user: User | UUID | str | None = None,
) -> ChatSession:
    """Open a chat session billed to ``api_key``'s user, for ``model`` (1–50 characters).

    The key must be active and unexpired. With ``user``, the key must belong
    to that user. Raises :class:`ApiKeyRevoked`, :class:`ApiKeyExpired`,
    :class:`NotFound` (unknown key) and :class:`ValidationError`.
    """
    key_id = _args.ref_id(api_key, "api_key", ApiKey)
    model_name = _args.text(model, "model", max_length=50)
    owner = _owner(user)
    rows = await _db.write(_START, new_id(), key_id, model_name, owner)
    if rows:
        return _db.to_model(ChatSession, rows[0])
    found = await _db.read(
        "SELECT key_prefix, is_active, expires_at FROM api_keys "
        "WHERE id = $1 AND ($2::uuid IS NULL OR user_id = $2)",
        key_id,
        owner,
    )
    if not found:
        raise NotFound("API key", key_id)
    if not found[0]["is_active"]:
        raise ApiKeyRevoked(found[0]["key_prefix"])
    raise ApiKeyExpired(found[0]["key_prefix"], found[0]["expires_at"])


@_db.translated
async def add_message(
    *,
    session: ChatSession | UUID | str,
    role: MessageRole | str,
    content: str,
    tokens: int,
    user: User | UUID | str | None = None,
) -> ChatMessage:
    """Store a message and bill its ``tokens`` to the session's user, atomically.

    One statement: the message, ``session.tokens_used += tokens`` and a
    ``usage`` row (``reference_id`` = the message id, description naming the
    model). ``tokens == 0`` stores the message without a ledger row. With
    ``user``, the session must belong to that user.

    Raises :class:`InsufficientTokens` and :class:`ChatSessionEnded` (nothing
    stored in either case), :class:`NotFound` and :class:`ValidationError`.
    """
    session_id = _args.ref_id(session, "session", ChatSession)
    member = _args.enum_member(role, MessageRole, "role")
    body = _args.text(content, "content", max_length=MAX_CONTENT_LENGTH, min_length=0, strip=False)
    cost = _args.whole_number(tokens, "tokens", minimum=0)
    owner = _owner(user)
    arguments = (new_id(), session_id, member.value, body, cost, new_id(), owner)
    with _args.fits_integer_column("tokens"):
        try:
            rows = await _db.write(_ADD_MESSAGE, *arguments)
        except asyncpg.CheckViolationError as exc:
            if exc.constraint_name != "users_token_balance_nonnegative":
                raise
            rows = await _db.transaction(lambda conn: _add_under_lock(conn, arguments))
    if rows:
        return _db.to_model(ChatMessage, rows[0])
    state = await _db.read(
        "SELECT ended_at FROM chat_sessions WHERE id = $1 AND ($2::uuid IS NULL OR user_id = $2)",
        session_id,
        owner,
    )
    if not state:
        raise NotFound("chat session", session_id)
    raise ChatSessionEnded(session_id)


async def _add_under_lock(conn: asyncpg.Connection, arguments: tuple[Any, ...]) -> list[Any]:
    """:data:`_ADD_MESSAGE` again after a refusal, deciding with both rows locked.

    The refusal was judged on the balance at lock time; by now a credit may
    have landed, and reading the balance afterwards could report one that
    covers the message. Locking the session then the user (the usual order)
    makes the balance the decision is made on the one that is reported.
    """
    _, session_id, _, _, cost, _, owner = arguments
    user_id = await conn.fetchval(
        "SELECT user_id FROM chat_sessions WHERE id = $1 AND ended_at IS NULL "
        "AND ($2::uuid IS NULL OR user_id = $2) FOR UPDATE",
        session_id,
        owner,
    )
    if user_id is None:
        return []  # ended or gone meanwhile: the caller tells which
    balance = await conn.fetchval(
        "SELECT token_balance FROM users WHERE id = $1 FOR UPDATE", user_id
    )
    if balance < cost:
        raise InsufficientTokens(user_id, int(balance), cost)
    return await conn.fetch(_ADD_MESSAGE, *arguments)


@_db.translated
async def end_chat(
    *, session: ChatSession | UUID | str, user: User | UUID | str | None = None
) -> ChatSession:
    """End ``session``; idempotent (the first ``ended_at`` stays). Raises :class:`NotFound`."""
    session_id = _args.ref_id(session, "session", ChatSession)
    rows = await _db.write(
        "UPDATE chat_sessions SET ended_at = coalesce(ended_at, clock_timestamp()) "
        "WHERE id = $1 AND ($2::uuid IS NULL OR user_id = $2) RETURNING *",
        session_id,
        _owner(user),
    )
    if not rows:
        raise NotFound("chat session", session_id)
    return _db.to_model(ChatSession, rows[0])


@_db.translated
async def get_chat(
    *, session: ChatSession | UUID | str, user: User | UUID | str | None = None
) -> ChatSession:
    """The chat session (with ``user``: only if it is theirs). Raises :class:`NotFound`."""
    session_id = _args.ref_id(session, "session", ChatSession)
    rows = await _db.read(
        "SELECT * FROM chat_sessions WHERE id = $1 AND ($2::uuid IS NULL OR user_id = $2)",
        session_id,
        _owner(user),
    )
    if not rows:
        raise NotFound("chat session", session_id)
    return _db.to_model(ChatSession, rows[0])


@_db.translated
async def list_chats(
    *,
    user: User | UUID | str,
    limit: int = 50,
    before: ChatSession | UUID | str | None = None,
) -> list[ChatSession]:
    """``user``'s chat sessions, newest first; ``before`` is the previous page's last session."""
    user_id = _args.ref_id(user, "user", User)
    return await _keyset.page(
        ChatSession,
        _SESSION_PAGES,
        owner_column="user_id",
        owner_id=user_id,
        limit=_args.page_limit(limit),
        boundary=before,
        field="before",
        entity="chat session",
    )


_SESSION_PAGES = _keyset.statements("chat_sessions", "user_id", newest_first=True)
_MESSAGE_PAGES = _keyset.statements("chat_messages", "session_id", newest_first=False)


@_db.translated
async def list_messages(
    *,
    session: ChatSession | UUID | str,
    limit: int = 100,
    after: ChatMessage | UUID | str | None = None,
    user: User | UUID | str | None = None,
) -> list[ChatMessage]:
    """``session``'s messages, oldest first, ``limit`` (1–1000) per page.

    Keyset pagination on ``(created_at, id)``: ``after`` is the last message
    of the previous page. Raises :class:`NotFound` (unknown session, another
    user's session when ``user`` is given, or an ``after`` of another session).
    """
    session_id = _args.ref_id(session, "session", ChatSession)
    page = _args.page_limit(limit)
    owner = _owner(user)
    exists = await _db.read(
        "SELECT 1 FROM chat_sessions WHERE id = $1 AND ($2::uuid IS NULL OR user_id = $2)",
        session_id,
        owner,
    )
    if not exists:
        raise NotFound("chat session", session_id)
    return await _keyset.page(
        ChatMessage,
        _MESSAGE_PAGES,
        owner_column="session_id",
        owner_id=session_id,
        limit=page,
        boundary=after,
        field="after",
        entity="chat message",
    )


@dataclass(frozen=True)
class ChatDiscrepancy:
    """A session whose counters disagree: ``tokens_used`` vs Σ message tokens vs Σ billed."""

    session_id: UUID
    tokens_used: int
    message_tokens: int
    billed_tokens: int


_AUDIT_CHATS = """
SELECT s.id AS session_id, s.tokens_used,
       coalesce(m.message_tokens, 0) AS message_tokens,
       coalesce(m.billed_tokens, 0) AS billed_tokens
FROM chat_sessions s
LEFT JOIN (
    SELECT cm.session_id, sum(cm.tokens) AS message_tokens,
           -sum(coalesce(t.amount, 0)) AS billed_tokens
    FROM chat_messages cm
    LEFT JOIN chat_sessions cs ON cs.id = cm.session_id
    LEFT JOIN token_transactions t
        ON t.reference_id = cm.id AND t.type = 'usage' AND t.user_id = cs.user_id
    GROUP BY cm.session_id
) m ON m.session_id = s.id
WHERE s.tokens_used <> coalesce(m.message_tokens, 0)
   OR s.tokens_used <> coalesce(m.billed_tokens, 0)
ORDER BY s.id
"""


@_db.translated
async def audit_chats() -> list[ChatDiscrepancy]:
    """Every session where ``tokens_used``, Σ message tokens and Σ billed usage disagree."""
    rows = await _db.read(_AUDIT_CHATS)
    return [
        ChatDiscrepancy(
            session_id=row["session_id"],
            tokens_used=int(row["tokens_used"]),
            message_tokens=int(row["message_tokens"]),
            billed_tokens=int(row["billed_tokens"]),
        )
        for row in rows
    ]
