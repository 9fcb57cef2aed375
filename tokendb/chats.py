"""Chat sessions whose messages are billed.

``add_message`` stores the message, adds its tokens to the session and
charges the user in **one statement** (:data:`_ledger_sql.ADD_MESSAGE`), so
``session.tokens_used == Σ message.tokens == −Σ usage rows of its messages``
holds after every call. Lock order is session row, then user row (then a
hold: :data:`_ledger_sql.ADD_MESSAGE_CAPTURE`), everywhere; no code path
takes them the other way round, so chats cannot deadlock with each other,
with the ledger or with holds (which lock a user, then its holds).

A session whose key has a ``token_limit`` is billed in a transaction that
locks the key's row first (key, session, user: the ledger's limited path
also takes a key before its user), reads the key's window after the lock
and refuses past the limit (:mod:`tokendb._limits_sql`).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from tokendb import (
    _args,
    _db,
    _holds_sql,
    _keyset,
    _ledger_sql,
    _limits_sql,
    _settings,
    _sql,
    _waits,
)
from tokendb._rows import to_model
from tokendb._translate import translated
from tokendb.errors import (
    ApiKeyExpired,
    ApiKeyRevoked,
    CaptureExceedsHold,
    ChatSessionEnded,
    DatabaseTimeout,
    HoldNotActive,
    InsufficientTokens,
    NotFound,
    ValidationError,
)
from tokendb.ids import new_id
from tokendb.models import (
    ApiKey,
    ChatMessage,
    ChatSession,
    HoldStatus,
    MessageRole,
    TokenHold,
    User,
)

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

_NEW_SESSION = _sql.insert(
    ChatSession,
    {
        "id": "$1",
        "user_id": "user_id",
        "api_key_id": "id",
        "tokens_used": "0",
        "model": "$3",
        "created_at": "clock_timestamp()",
    },
    source="api_keys",
)
# $1 new id, $2 the key, $3 model, $4 the key's owner or NULL.
_START = f"""
{_NEW_SESSION}
WHERE id = $2 AND is_active AND (expires_at IS NULL OR expires_at > now())
  AND {_sql.owned_by("$4")}
RETURNING *
"""

# $1 the row, $2 its owner or NULL: another user's row is not found.
_OWNED = f"WHERE id = $1 AND {_sql.owned_by('$2')}"
_KEY_STATE = f"SELECT key_prefix, is_active, expires_at FROM api_keys {_OWNED}"
_SESSION = f"SELECT * FROM chat_sessions {_OWNED}"
_SESSION_STATE = f"SELECT ended_at, api_key_id FROM chat_sessions {_OWNED}"
_LOCK_OPEN_SESSION = f"SELECT user_id FROM chat_sessions {_OWNED} AND ended_at IS NULL FOR UPDATE"
_END = (
    f"UPDATE chat_sessions SET ended_at = coalesce(ended_at, clock_timestamp()) {_OWNED} "
    "RETURNING *"
)


@translated
async def start_chat(
    *,
    api_key: ApiKey | UUID | str,
    model: str,
    user: User | UUID | str | None = None,
) -> ChatSession:
    """Open a chat session billed to ``api_key``'s user, for ``model`` (1–50 characters).

    The key must be active and unexpired. With ``user``, the key must belong
    to that user.

    Raises:
        ApiKeyRevoked: the key was revoked.
        ApiKeyExpired: the key expired.
        NotFound: unknown key, or another user's.
        ValidationError: a bad model name or a malformed id.
        DatabaseUnavailable: the database is unreachable, or the connection was lost
            (``.outcome_unknown`` once the write was sent).
    """
    key_id = _args.ref_id(api_key, "api_key", ApiKey)
    model_name = _args.text(model, "model", max_length=50)
    owner = _args.owner(user)
    rows = await _db.write(_START, new_id(), key_id, model_name, owner)
    if rows:
        return to_model(ChatSession, rows[0])
    found = await _db.read(_KEY_STATE, key_id, owner)
    if not found:
        raise NotFound("API key", key_id)
    if not found[0]["is_active"]:
        raise ApiKeyRevoked(found[0]["key_prefix"])
    raise ApiKeyExpired(found[0]["key_prefix"], found[0]["expires_at"])


@translated
async def add_message(
    *,
    session: ChatSession | UUID | str,
    role: MessageRole | str,
    content: str,
    tokens: int,
    user: User | UUID | str | None = None,
    hold: TokenHold | UUID | str | None = None,
) -> ChatMessage:
    """Store a message and bill its ``tokens`` to the session's user, atomically.

    One statement: the message, ``session.tokens_used += tokens`` and a
    ``usage`` row (``reference_id`` = the message id, description naming the
    model). ``tokens == 0`` stores the message without a ledger row. With
    ``user``, the session must belong to that user.

    With ``hold`` (an active hold of the session's user, from
    :func:`tokendb.hold`), the tokens are captured from it, with the
    guarantees of :func:`tokendb.capture`, in the same statement: the hold
    becomes ``captured`` (its ``captured_transaction_id`` is the message's
    usage row) and the rest of it is released; for 0 tokens it is released.
    A repeat (a hold captured by a message of this session with the same
    role, content and tokens) returns that message; another message on a
    used hold raises :class:`HoldNotActive`.

    Through a session whose key has a ``token_limit``, the message is
    refused when the key's window (plus its active holds) cannot take
    ``tokens`` more: decided under the key's row lock, so concurrent
    messages cannot pass the limit together.

    Raises:
        InsufficientTokens: the balance does not cover ``tokens``; nothing stored.
        KeyLimitExceeded: the session's key is past its limit (``.limit``,
            ``.used``, ``.requested``, ``.period``); nothing stored.
        ChatSessionEnded: the session has ended; nothing stored.
        HoldExpired: the hold expired; nothing stored.
        HoldNotActive: the hold was released or captured already (``.status``).
        CaptureExceedsHold: ``tokens`` is more than the hold; nothing stored.
        NotFound: unknown session or hold, or another user's.
        ValidationError: a bad role, content or token count; or, through a key with
            a token limit, a hold not made through that key (``field="hold"``: it was
            never counted against the limit); nothing stored.
        DatabaseUnavailable: the database is unreachable, or the connection was lost
            (``.outcome_unknown`` once the write was sent).
    """
    session_id = _args.ref_id(session, "session", ChatSession)
    member = _args.enum_member(role, MessageRole, "role")
    body = _args.text(content, "content", max_length=MAX_CONTENT_LENGTH, min_length=0, strip=False)
    cost = _args.whole_number(tokens, "tokens", minimum=0)
    owner = _args.owner(user)
    arguments = (new_id(), session_id, member.value, body, cost, new_id(), owner, False)
    if hold is not None:
        hold_id = _args.ref_id(hold, "hold", TokenHold)
        if isinstance(hold, TokenHold) and cost > hold.amount:
            raise CaptureExceedsHold(hold_id, hold.amount, cost, field="tokens")
        async with _heavy_budget(len(body)):
            return await _add_captured(arguments[:-1], hold_id)
    async with _heavy_budget(len(body)):
        with _args.fits_integer_column("tokens"):
            try:
                rows = await _db.write(_ledger_sql.ADD_MESSAGE, *arguments)
            except asyncpg.CheckViolationError as exc:
                if exc.constraint_name not in _SHORT:
                    raise
                rows = await _db.transaction(lambda conn: _add_under_lock(conn, arguments))
            if not rows:
                state = await _db.read(_SESSION_STATE, session_id, owner)
                if not state:
                    raise NotFound("chat session", session_id)
                key_id = state[0]["api_key_id"]
                if state[0]["ended_at"] is None and cost > 0 and key_id is not None:
                    # Open, and refused: its key has a limit (set maybe since the statement).
                    rows = await _db.transaction(lambda conn: _add_limited(conn, arguments, key_id))
    if rows:
        return to_model(ChatMessage, {**rows[0], "content": body})  # not echoed back
    raise ChatSessionEnded(session_id)


HEAVY_MESSAGE = 256_000
"""Characters from which a message counts as heavy (:func:`_heavy_budget`)."""
HEAVY_AT_ONCE = 2
"""Heavy messages one event loop writes at a time."""

_heavy: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


@contextlib.asynccontextmanager
async def _heavy_budget(length: int) -> AsyncIterator[None]:
    """At most :data:`HEAVY_AT_ONCE` heavy messages in flight per event loop; light ones pass.

    A tenant sending messages of megabytes holds a pooled connection for a
    second each (the server writes and logs every byte) and the event loop
    for tens of milliseconds (encoding them): unbounded, a few such callers
    took the pool and the loop from everyone else (issue 13). Bounded, they
    queue behind each other, and the wait is theirs: bounded by
    ``acquire_timeout`` like a wait for a pooled connection (:class:`DatabaseTimeout`).
    """
    if length < HEAVY_MESSAGE:
        yield
        return
    loop = asyncio.get_running_loop()
    budget = _heavy.get(loop)
    if budget is None:
        budget = _heavy[loop] = asyncio.Semaphore(HEAVY_AT_ONCE)
    seconds = _settings.current().acquire_timeout
    try:
        with _waits.Deadline(seconds):
            await budget.acquire()
    except TimeoutError as exc:
        raise DatabaseTimeout(
            f"no slot for a heavy message (≥ {HEAVY_MESSAGE:,} characters) became free "
            f"within {seconds:g} s; nothing was written"
        ) from exc
    try:
        yield
    finally:
        budget.release()


async def _add_captured(arguments: tuple[Any, ...], hold_id: UUID) -> ChatMessage:
    """:data:`_ledger_sql.ADD_MESSAGE_CAPTURE`; when it wrote nothing, why."""
    _, session_id, role, body, cost, _, owner = arguments
    for _ in range(3):
        try:
            rows = await _db.write(_ledger_sql.ADD_MESSAGE_CAPTURE, *arguments, hold_id)
        except asyncpg.CheckViolationError as exc:
            if exc.constraint_name != "token_holds_transition":
                raise
            rows = []  # it expired between the statement's check and its trigger's
        if rows:
            return to_model(ChatMessage, {**rows[0], "content": body})  # not echoed back
        state = await _db.read(_SESSION, session_id, owner)
        if not state:
            raise NotFound("chat session", session_id)
        if state[0]["ended_at"] is not None:
            raise ChatSessionEnded(session_id)
        found, hold_state = await _holds_sql.refused(
            hold_id, cost, user_id=state[0]["user_id"], field="tokens"
        )
        key_id = state[0]["api_key_id"]
        if (
            found.status is HoldStatus.ACTIVE
            and found.api_key_id != key_id
            and await _db.read(_LIMITED_KEY, key_id)
        ):
            raise ValidationError(
                "hold",
                "the session's key has a token limit: capture a hold made through it "
                "(hold(api_key=...)), which counted against the limit",
            )
        if found.status is HoldStatus.CAPTURED:
            earlier = await _db.read(
                _BILLED_BY, hold_state["tx_reference_id"], session_id, cost, role, body
            )
            if not earlier:
                raise HoldNotActive(hold_id, found.status.value)
            return to_model(ChatMessage, earlier[0])
    raise AssertionError("an active hold refused a message three times")  # pragma: no cover


_LIMITED_KEY = f"SELECT 1 FROM api_keys k WHERE k.id = $1 AND {_limits_sql.LIMITED}"

_BILLED_BY = (
    "SELECT * FROM chat_messages"
    " WHERE id = $1 AND session_id = $2 AND tokens = $3 AND role = $4 AND content = $5"
)
"""The message a hold's capture billed, if it is this one again: this session, role, content
and tokens (a repeat). Another message on a used hold is :class:`HoldNotActive`."""

_SHORT = ("users_token_balance_nonnegative", "users_held_tokens_within_balance")
"""The debit went below zero, or into tokens held by holds (maybe expired ones)."""


async def _add_under_lock(conn: asyncpg.Connection, arguments: tuple[Any, ...]) -> list[Any]:
    """:data:`_ledger_sql.ADD_MESSAGE` again after a refusal, deciding with both rows locked.

    The refusal was judged on the balance at lock time; by now a credit may
    have landed, and reading the balance afterwards could report one that
    covers the message. Locking the session then the user (the usual order)
    makes the balance the decision is made on the one that is reported.
    """
    _, session_id, _, _, cost, _, owner, _ = arguments
    user_id = await conn.fetchval(_LOCK_OPEN_SESSION, session_id, owner)
    if user_id is None:
        return []  # ended or gone meanwhile: the caller tells which
    available = await _ledger_sql.available_under_lock(conn, user_id)
    assert available is not None  # the session's user: users with sessions are kept
    if available < cost:
        raise InsufficientTokens(user_id, available, cost)
    return await conn.fetch(_ledger_sql.ADD_MESSAGE, *arguments)


async def _add_limited(
    conn: asyncpg.Connection, arguments: tuple[Any, ...], key_id: UUID
) -> list[Any]:
    """:data:`_ledger_sql.ADD_MESSAGE` through a key with a limit: the key's row
    locked, then the session's and the user's (:func:`_add_under_lock`), the
    window read after the key's lock and the message refused past the limit."""
    cost = arguments[4]
    limit = await _limits_sql.lock_key(conn, key_id, None)
    if limit is not None:
        await _limits_sql.check(conn, key_id, limit, cost)
    return await _add_under_lock(conn, (*arguments[:-1], True))


@translated
async def end_chat(
    *, session: ChatSession | UUID | str, user: User | UUID | str | None = None
) -> ChatSession:
    """End ``session``; idempotent (the first ``ended_at`` stays).

    Raises:
        NotFound: unknown session, or another user's.
        ValidationError: a malformed id.
        DatabaseUnavailable: the database is unreachable, or the connection was lost
            (``.outcome_unknown`` once the write was sent).
    """
    session_id = _args.ref_id(session, "session", ChatSession)
    rows = await _db.write(_END, session_id, _args.owner(user))
    if not rows:
        raise NotFound("chat session", session_id)
    return to_model(ChatSession, rows[0])


@translated
async def get_chat(
    *, session: ChatSession | UUID | str, user: User | UUID | str | None = None
) -> ChatSession:
    """The chat session (with ``user``: only if it is theirs).

    Raises:
        NotFound: unknown session, or another user's.
        ValidationError: a malformed id.
        DatabaseUnavailable: the database is unreachable.
    """
    session_id = _args.ref_id(session, "session", ChatSession)
    rows = await _db.read(_SESSION, session_id, _args.owner(user))
    if not rows:
        raise NotFound("chat session", session_id)
    return to_model(ChatSession, rows[0])


@translated
async def list_chats(
    *,
    user: User | UUID | str,
    limit: int = 50,
    before: ChatSession | UUID | str | None = None,
) -> list[ChatSession]:
    """``user``'s chat sessions, newest first, ``limit`` (1–1000) per page.

    Keyset pagination: ``before`` is the last session of the previous page.
    Like every ``list_*``: an unknown user is :class:`NotFound`, a user
    without sessions an empty list.

    Raises:
        NotFound: unknown user, or a ``before`` that is not this user's.
        ValidationError: a bad ``limit`` or a malformed id.
        DatabaseUnavailable: the database is unreachable.
    """
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
        owner=("users", "user"),
    )


_SESSION_PAGES = _keyset.statements("chat_sessions", "user_id", newest_first=True)
_MESSAGE_PAGES = _keyset.statements("chat_messages", "session_id", newest_first=False)


@translated
async def list_messages(
    *,
    session: ChatSession | UUID | str,
    limit: int = 100,
    after: ChatMessage | UUID | str | None = None,
    user: User | UUID | str | None = None,
) -> list[ChatMessage]:
    """``session``'s messages, oldest first, ``limit`` (1–1000) per page.

    Keyset pagination on ``(created_at, id)``: ``after`` is the last message
    of the previous page. Like every ``list_*``: an unknown session is
    :class:`NotFound`, a session without messages an empty list.

    Raises:
        NotFound: unknown session, another user's session when ``user`` is
            given, or an ``after`` of another session.
        ValidationError: a bad ``limit`` or a malformed id.
        DatabaseUnavailable: the database is unreachable.
    """
    session_id = _args.ref_id(session, "session", ChatSession)
    page = _args.page_limit(limit)
    owner = _args.owner(user)
    exists = await _db.read(_SESSION_STATE, session_id, owner)
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


@translated
async def audit_chats() -> list[ChatDiscrepancy]:
    """Every session where ``tokens_used``, Σ message tokens and Σ billed usage disagree.

    Raises:
        DatabaseUnavailable: the database is unreachable.
    """
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
