"""Tests for tokendb.chats: sessions, billed messages, pagination, ownership."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
import weakref
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

import tokendb
from tests.helpers import (
    after_statement,
    blocked_backends,
    holding_row_lock,
    row_is_locked,
    table_counts,
    tamper,
)
from tokendb import _db, _ledger_sql, chats
from tokendb._args import INT4_MAX
from tokendb.models import MessageRole, TransactionType


@pytest.fixture
def chat(make_api_key):
    """``await chat(model=..., **key_options)`` → (session, api_key, user)."""

    async def factory(model: str = "gpt-4o", **key_options):
        api_key, _ = await make_api_key(**key_options)
        session = await tokendb.start_chat(api_key=api_key, model=model)
        return session, api_key, await tokendb.get_user(user_id=api_key.user_id)

    return factory


async def test_start_chat_bills_the_keys_user(tokendb_clean: str, chat) -> None:
    session, api_key, user = await chat(model="claude-3")
    assert session.user_id == user.id and session.api_key_id == api_key.id
    assert (session.tokens_used, session.model, session.ended_at) == (0, "claude-3", None)


async def test_add_message_stores_counts_and_charges_atomically(tokendb_clean: str, chat) -> None:
    session, _, user = await chat()
    message = await tokendb.add_message(session=session, role="user", content="Hi!", tokens=12)
    assert (message.role, message.content, message.tokens) == (MessageRole.USER, "Hi!", 12)
    assert message.session_id == session.id
    assert (await tokendb.get_chat(session=session)).tokens_used == 12
    [usage, _bonus] = await tokendb.list_transactions(user=user)
    assert (usage.type, usage.amount, usage.balance_after) == (TransactionType.USAGE, -12, 88)
    assert usage.reference_id == message.id
    assert usage.description == "chat message (gpt-4o)"


async def test_zero_token_messages_write_no_ledger_row(tokendb_clean: str, chat) -> None:
    session, _, user = await chat()
    await tokendb.add_message(session=session.id, role=MessageRole.SYSTEM, content="", tokens=0)
    assert len(await tokendb.list_transactions(user=user)) == 1  # only the signup bonus
    assert (await tokendb.get_chat(session=session)).tokens_used == 0
    assert len(await tokendb.list_messages(session=session)) == 1


async def test_insufficient_tokens_stores_nothing(tokendb_clean: str, chat) -> None:
    session, _, user = await chat()
    await tokendb.add_message(session=session, role="user", content="a", tokens=90)
    before = await table_counts()
    with pytest.raises(tokendb.InsufficientTokens) as info:
        await tokendb.add_message(session=session, role="assistant", content="b", tokens=11)
    assert (info.value.user_id, info.value.balance, info.value.requested) == (user.id, 10, 11)
    assert await table_counts() == before
    await tokendb.add_message(session=session, role="assistant", content="b", tokens=10)
    assert await tokendb.get_balance(user=user) == 0


async def test_ended_session_takes_no_messages(tokendb_clean: str, chat) -> None:
    session, _, _ = await chat()
    ended = await tokendb.end_chat(session=session)
    assert ended.ended_at is not None
    again = await tokendb.end_chat(session=session.id)
    assert again.ended_at == ended.ended_at  # idempotent: the first end stays
    before = await table_counts()
    with pytest.raises(tokendb.ChatSessionEnded) as info:
        await tokendb.add_message(session=session, role="user", content="late", tokens=1)
    assert info.value.session_id == session.id
    assert await table_counts() == before


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"role": "robot"}, "role"),
        ({"role": None}, "role"),
        ({"content": None}, "content"),
        ({"content": "nul\x00"}, "content"),
        ({"content": "\ud800"}, "content"),
        ({"tokens": -1}, "tokens"),
        ({"tokens": 1.0}, "tokens"),
        ({"tokens": True}, "tokens"),
        ({"tokens": 2**31}, "tokens"),
        ({"session": "not-a-uuid"}, "session"),
    ],
)
async def test_add_message_rejects_bad_input_before_writing(
    tokendb_clean: str, chat, changes: dict[str, object], field: str
) -> None:
    session, _, _ = await chat()
    arguments: dict[str, object] = {"session": session, "role": "user", "content": "x", "tokens": 1}
    arguments.update(changes)
    before = await table_counts()
    with pytest.raises(tokendb.ValidationError) as info:
        await tokendb.add_message(**arguments)  # type: ignore[arg-type]
    assert info.value.field == field
    assert await table_counts() == before


async def test_unknown_session(tokendb_clean: str) -> None:
    missing = uuid.uuid4()
    with pytest.raises(tokendb.NotFound):
        await tokendb.add_message(session=missing, role="user", content="x", tokens=1)
    with pytest.raises(tokendb.NotFound):
        await tokendb.end_chat(session=missing)
    with pytest.raises(tokendb.NotFound):
        await tokendb.list_messages(session=missing)
    with pytest.raises(tokendb.NotFound):
        await tokendb.get_chat(session=missing)


async def test_start_chat_needs_a_valid_key(tokendb_clean: str, make_api_key) -> None:
    revoked, _ = await make_api_key()
    await tokendb.revoke_api_key(api_key=revoked)
    expiring, _ = await make_api_key(expires_at=datetime.now(UTC) + timedelta(minutes=1))
    await _db.write(
        "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1", expiring.id
    )
    before = await table_counts()
    with pytest.raises(tokendb.ApiKeyRevoked):
        await tokendb.start_chat(api_key=revoked, model="m")
    with pytest.raises(tokendb.ApiKeyExpired) as info:
        await tokendb.start_chat(api_key=expiring.id, model="m")
    assert info.value.expired_at is not None
    with pytest.raises(tokendb.NotFound):
        await tokendb.start_chat(api_key=uuid.uuid4(), model="m")
    valid, _ = await make_api_key()
    for model in ("", "m" * 51, None, "nul\x00"):
        with pytest.raises(tokendb.ValidationError) as bad:
            await tokendb.start_chat(api_key=valid, model=model)  # type: ignore[arg-type]
        assert bad.value.field == "model"
    assert (await table_counts())["chat_sessions"] == before["chat_sessions"]


async def test_ownership_checks(tokendb_clean: str, chat, make_user) -> None:
    session, api_key, owner = await chat()
    stranger = await make_user()
    before = await table_counts()
    with pytest.raises(tokendb.NotFound):
        await tokendb.start_chat(api_key=api_key, model="m", user=stranger)
    with pytest.raises(tokendb.NotFound):
        await tokendb.add_message(
            session=session, role="user", content="x", tokens=1, user=stranger
        )
    with pytest.raises(tokendb.NotFound):
        await tokendb.end_chat(session=session, user=stranger)
    with pytest.raises(tokendb.NotFound):
        await tokendb.list_messages(session=session, user=stranger)
    with pytest.raises(tokendb.NotFound):
        await tokendb.get_chat(session=session, user=stranger.id)
    assert await table_counts() == before
    await tokendb.add_message(session=session, role="user", content="x", tokens=1, user=owner)


async def test_messages_page_oldest_first(tokendb_clean: str, chat) -> None:
    session, _, _ = await chat()
    sent = [
        await tokendb.add_message(session=session, role="user", content=str(i), tokens=1)
        for i in range(7)
    ]
    pages, after = [], None
    while page := await tokendb.list_messages(session=session, limit=3, after=after):
        pages.append(page)
        after = page[-1]
    assert [m.content for page in pages for m in page] == [str(i) for i in range(7)]
    assert [len(p) for p in pages] == [3, 3, 1]
    other, _, _ = await chat()
    with pytest.raises(tokendb.NotFound):  # a cursor from another session
        await tokendb.list_messages(session=other, after=sent[0])


async def test_list_chats_newest_first(tokendb_clean: str, make_api_key) -> None:
    api_key, _ = await make_api_key()
    sessions = [await tokendb.start_chat(api_key=api_key, model=f"m{i}") for i in range(5)]
    first = await tokendb.list_chats(user=api_key.user_id, limit=2)
    rest = await tokendb.list_chats(user=api_key.user_id, limit=10, before=first[-1])
    assert [s.id for s in first + rest] == [s.id for s in reversed(sessions)]


async def test_chat_invariant_holds(tokendb_clean: str, chat) -> None:
    session, _, _ = await chat()
    for tokens in (3, 0, 5, 9):
        await tokendb.add_message(session=session, role="assistant", content="t", tokens=tokens)
    assert (await tokendb.get_chat(session=session)).tokens_used == 17
    assert await tokendb.audit_chats() == []


# Regression tests from the independent review.


async def test_a_cursor_from_another_users_chats_is_not_found(
    tokendb_clean: str, make_api_key, make_user
) -> None:
    alices_key, _ = await make_api_key()
    alices_session = await tokendb.start_chat(api_key=alices_key, model="m")
    bob = await make_user()
    with pytest.raises(tokendb.NotFound):
        await tokendb.list_chats(user=bob, before=alices_session.id)


async def test_audit_chats_finds_a_session_whose_counters_disagree(
    tokendb_clean: str, chat
) -> None:
    session, _, _ = await chat()
    await tokendb.add_message(session=session, role="user", content="x", tokens=5)
    bump = "UPDATE chat_sessions SET tokens_used = tokens_used + $2 WHERE id = $1"
    try:
        await tamper(tokendb_clean, bump, session.id, 1)
        assert await tokendb.audit_chats() == [
            tokendb.ChatDiscrepancy(
                session_id=session.id, tokens_used=6, message_tokens=5, billed_tokens=5
            )
        ]
    finally:
        await tamper(tokendb_clean, bump, session.id, -1)
    assert await tokendb.audit_chats() == []


async def test_a_session_total_past_the_integer_column_is_a_validation_error(
    tokendb_clean: str, chat
) -> None:
    session, _, user = await chat()
    await tokendb.top_up(user=user, amount=INT4_MAX - 100)  # balance: INT4_MAX
    await tokendb.add_message(session=session, role="user", content="a", tokens=INT4_MAX - 50)
    await tokendb.top_up(user=user, amount=100)  # balance 150: it could pay for 100 more
    before = await table_counts()
    with pytest.raises(tokendb.ValidationError) as info:
        await tokendb.add_message(session=session, role="user", content="b", tokens=100)
    assert info.value.field == "tokens"
    assert await table_counts() == before


@pytest.fixture
def late_credit(monkeypatch: pytest.MonkeyPatch):
    """``late_credit(user, amount)``: a top-up lands after add_message's statement was
    refused, before the decision is made again with the rows locked."""

    def arrange(user: tokendb.User, amount: int) -> None:
        decide_under_lock = chats._add_under_lock

        async def credit_lands_first(conn, arguments):
            await tokendb.top_up(user=user, amount=amount, description="late credit")
            return await decide_under_lock(conn, arguments)

        monkeypatch.setattr(chats, "_add_under_lock", credit_lands_first)

    return arrange


async def test_a_refused_message_that_a_late_credit_covers_is_stored(
    tokendb_clean: str, chat, late_credit
) -> None:
    """The statement refused 101 tokens on a balance of 100; by the time the refusal is
    explained, a credit of 1 has landed. The decision is made again with the rows
    locked, on the balance that now covers the message exactly: it is stored."""
    session, _, user = await chat()
    late_credit(user, 1)
    message = await tokendb.add_message(session=session, role="user", content="x", tokens=101)
    assert message.tokens == 101
    assert (await tokendb.get_chat(session=session)).tokens_used == 101
    assert await tokendb.get_balance(user=user) == 0


async def test_a_refused_message_that_a_late_credit_does_not_cover_stores_nothing(
    tokendb_clean: str, chat, late_credit
) -> None:
    """A late credit that still falls short: InsufficientTokens, reporting the balance
    the locked decision was made on (the credit included), and nothing stored."""
    session, _, user = await chat()
    late_credit(user, 1)
    with pytest.raises(tokendb.InsufficientTokens) as info:
        await tokendb.add_message(session=session, role="user", content="x", tokens=102)
    assert (info.value.balance, info.value.requested) == (101, 102)
    assert await tokendb.list_messages(session=session) == []
    assert (await tokendb.get_chat(session=session)).tokens_used == 0
    assert await tokendb.get_balance(user=user) == 101


async def test_the_locked_decision_locks_the_session_then_the_user(
    tokendb_clean: str, chat
) -> None:
    """After a refusal, add_message decides again holding both rows, taken in the one
    order every chat statement uses (session, then user), so it cannot deadlock."""
    session, _, user = await chat()
    observer = await asyncpg.connect(tokendb_clean)
    seen: list[tuple[str, bool, bool]] = []

    def probe(step: str):
        async def check() -> None:
            locked = (
                await row_is_locked(observer, "chat_sessions", session.id),
                await row_is_locked(observer, "users", user.id),
            )
            seen.append((step, *locked))

        return check

    try:
        with (
            after_statement(chats._LOCK_OPEN_SESSION, probe("session")),
            after_statement(_ledger_sql.LOCK_USER, probe("user")),
            pytest.raises(tokendb.InsufficientTokens),
        ):
            await tokendb.add_message(session=session, role="user", content="x", tokens=101)
    finally:
        await observer.close()
    assert seen == [("session", True, False), ("user", True, True)]


async def test_message_content_is_stored_as_given(tokendb_clean: str, chat) -> None:
    session, _, _ = await chat()
    message = await tokendb.add_message(session=session, role="user", content="  hi\n", tokens=0)
    assert message.content == "  hi\n"
    assert (await tokendb.list_messages(session=session))[0].content == "  hi\n"


async def test_content_is_at_most_4_000_000_characters(tokendb_clean: str, chat) -> None:
    session, _, _ = await chat()
    stored = await tokendb.add_message(
        session=session, role="user", content="c" * 4_000_000, tokens=0
    )
    assert len(stored.content) == 4_000_000
    with pytest.raises(tokendb.ValidationError) as info:
        await tokendb.add_message(session=session, role="user", content="c" * 4_000_001, tokens=0)
    assert info.value.field == "content"


async def test_a_model_name_is_at_most_50_characters(tokendb_clean: str, make_api_key) -> None:
    api_key, _ = await make_api_key()
    assert (await tokendb.start_chat(api_key=api_key, model="m" * 50)).model == "m" * 50


async def test_pages_are_50_sessions_and_100_messages_by_default(
    tokendb_clean: str, chat, make_api_key
) -> None:
    api_key, _ = await make_api_key()
    for _ in range(51):
        await tokendb.start_chat(api_key=api_key, model="m")
    assert len(await tokendb.list_chats(user=api_key.user_id)) == 50
    session, _, _ = await chat()
    for _ in range(101):
        await tokendb.add_message(session=session, role="user", content="x", tokens=0)
    assert len(await tokendb.list_messages(session=session)) == 100


async def test_audit_chats_finds_a_message_billed_to_nothing(tokendb_clean: str, chat) -> None:
    """Counters and messages agree; only the usage row is missing (it bills another
    reference): found, as billed_tokens disagreeing."""
    session, _, _ = await chat()
    message = await tokendb.add_message(session=session, role="user", content="x", tokens=5)
    move = "UPDATE token_transactions SET reference_id = $2 WHERE reference_id = $1"
    elsewhere = uuid.uuid4()
    try:
        await tamper(tokendb_clean, move, message.id, elsewhere)
        [found] = await tokendb.audit_chats()
        assert (found.tokens_used, found.message_tokens, found.billed_tokens) == (5, 5, 0)
        with pytest.raises(dataclasses.FrozenInstanceError):
            found.billed_tokens = 5  # type: ignore[misc]
    finally:
        await tamper(tokendb_clean, move, elsewhere, message.id)
    assert await tokendb.audit_chats() == []


async def test_a_session_ends_after_its_last_message(tokendb_clean: str, chat) -> None:
    """end_chat waits for a message being stored; the session's end is stamped once
    it holds the row, so no message of the session is newer than its end."""
    session, _, _ = await chat()
    holder = await asyncpg.connect(tokendb_clean)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM chat_sessions WHERE id = $1 FOR UPDATE", session.id)
        ending = asyncio.ensure_future(tokendb.end_chat(session=session))
        await blocked_backends(holder, like="UPDATE chat_sessions%")
        arguments = (uuid.uuid4(), session.id, "user", "late", 0, uuid.uuid4(), None, False)
        await holder.execute(_ledger_sql.ADD_MESSAGE, *arguments)
        await tx.commit()
        ended = await asyncio.wait_for(ending, 10)
    finally:
        await holder.close()
    [message] = await tokendb.list_messages(session=session)
    assert ended.ended_at is not None and ended.ended_at >= message.created_at


@pytest.mark.parametrize("size", [10, 20], ids=["exactly-HEAVY_MESSAGE", "more"])
async def test_heavy_messages_queue_behind_each_other_not_in_front_of_others(
    tokendb_clean: str, chat, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """A tenant sending huge messages holds at most ``HEAVY_AT_ONCE`` connections: its next
    heavy message waits in the process (not sent), a light message of another goes on,
    and each message comes back with its content (which the statement no longer echoes).
    A message of exactly ``HEAVY_MESSAGE`` characters is heavy."""
    monkeypatch.setattr(chats, "HEAVY_MESSAGE", 10)
    monkeypatch.setattr(chats, "HEAVY_AT_ONCE", 1)
    monkeypatch.setattr(chats, "_heavy", weakref.WeakKeyDictionary())  # budgets made anew
    heavy_session, _, heavy_user = await chat()
    light_session, _, _ = await chat()
    big = "ü" * size
    async with holding_row_lock(tokendb_clean, heavy_user.id) as lock:
        first = asyncio.ensure_future(
            tokendb.add_message(session=heavy_session, role="user", content=big, tokens=1)
        )
        await blocked_backends(lock)
        second = asyncio.ensure_future(
            tokendb.add_message(session=heavy_session, role="user", content=big + "!", tokens=1)
        )
        light = await asyncio.wait_for(
            tokendb.add_message(session=light_session, role="user", content="hi", tokens=1), 30
        )
        assert light.content == "hi"
        await lock.execute("SELECT pg_stat_clear_snapshot()")
        waiting = await lock.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND state = 'active'"
        )
        assert waiting == 1, "the second heavy message was sent while the first held a slot"
    assert [(await first).content, (await second).content] == [big, big + "!"]
    stored = await tokendb.list_messages(session=heavy_session)
    assert [m.content for m in stored] == [big, big + "!"]
