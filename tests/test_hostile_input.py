"""Hostile input: every public operation, fuzzed with hypothesis; and cross-tenant access.

For every public coroutine of ``tokendb`` (found through ``tokendb.__all__``,
so a new operation is fuzzed without touching this file) each keyword
argument is drawn from a strategy for its name: huge, negative, zero and
non-integer amounts, integers past the column's range, unicode with NUL
bytes and lone surrogates, oversize strings, SQL metacharacters, wrong enum
values, ids of other users' keys/sessions/transactions (and of the wrong kind
of row), malformed and truncated API keys. Whatever comes out:

* the only exceptions are ``TokenDBError`` subclasses, and not the generic
  database ones (a hostile argument is refused by a check, not by luck);
* when the call raised, nothing in the database changed (a digest of every
  tokendb table is compared before and after).

``TOKENDB_FUZZ_EXAMPLES`` sets the examples per operation (default 100).
"""

from __future__ import annotations

import inspect
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, timedelta, timezone
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokendb
from tokendb.testing import TABLES, truncate_all

EXAMPLES = int(os.environ.get("TOKENDB_FUZZ_EXAMPLES", "100"))
NOT_FUZZED = {"init", "close", "connect", "migrate"}  # connection management, not data
OPERATIONS = sorted(
    name
    for name in tokendb.__all__
    if name not in NOT_FUZZED and inspect.iscoroutinefunction(getattr(tokendb, name))
)
TRIED: Counter[str] = Counter()

DIGEST = " || ".join(
    f"(SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM {table} t)"
    for table in TABLES
)


@dataclass
class World:
    """Two users with every kind of row, for ids that are real but not the caller's."""

    alice: tokendb.User
    bob: tokendb.User
    ids: list[uuid.UUID] = field(default_factory=list)
    objects: list[Any] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    emails: list[str] = field(default_factory=list)


async def _populate(user: tokendb.User, world: World, raw: asyncpg.Connection) -> None:
    await tokendb.top_up(user=user, amount=1000, reference_id=uuid.uuid4())
    usage = await tokendb.charge(user=user, amount=50, description="usage")
    key, secret = await tokendb.issue_api_key(user=user, name="live")
    revoked, revoked_secret = await tokendb.issue_api_key(user=user, name="revoked")
    await tokendb.revoke_api_key(api_key=revoked)
    expired, expired_secret = await tokendb.issue_api_key(user=user, name="expired")
    await raw.execute(
        "UPDATE api_keys SET expires_at = now() - interval '1 day' WHERE id = $1", expired.id
    )
    session = await tokendb.start_chat(api_key=key, model="gpt-test")
    message = await tokendb.add_message(session=session, role="user", content="hi", tokens=5)
    ended = await tokendb.start_chat(api_key=key, model="gpt-test")
    await tokendb.end_chat(session=ended)
    held = await tokendb.hold(user=user, amount=10, ttl=3600)
    released = await tokendb.release(
        hold=await tokendb.hold(user=user, amount=10, ttl=3600, reference_id=uuid.uuid4())
    )
    captured = await tokendb.hold(user=user, amount=10, ttl=3600)
    await tokendb.capture(hold=captured, amount=4)
    rows: list[Any] = [user, usage, key, revoked, expired, session, message, ended]
    rows += [held, released, captured]
    world.objects += rows
    world.ids += [row.id for row in rows]
    world.secrets += [secret, revoked_secret, expired_secret]
    world.emails.append(user.email)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(tokendb_db: str) -> AsyncIterator[World]:
    await truncate_all(database_url=tokendb_db)
    alice = await tokendb.create_user(email="alice@example.com", password="alice pass", name="A")
    bob = await tokendb.create_user(email="bob@example.com", password="bob password", name="B")
    world = World(alice, bob)
    raw = await asyncpg.connect(tokendb_db)
    try:
        for user in (alice, bob):
            await _populate(user, world, raw)
    finally:
        await raw.close()
    yield world
    print("\nhypothesis examples per operation:", dict(sorted(TRIED.items())))
    print("hypothesis examples in all:", sum(TRIED.values()))


# -- strategies --------------------------------------------------------------

SQL = [
    "'; DROP TABLE users; --",
    "' OR '1'='1",
    '" OR ""="',
    "$1",
    "%' AND pg_sleep(5) IS NULL --",
    "\\'; SELECT 1; --",
    "_%",
    "users) VALUES (1); --",
    "$$; DROP TABLE token_transactions; $$",
]
SIZES = [0, 1, 8, 12, 32, 50, 51, 64, 100, 101, 129, 255, 256, 1000, 1001, 1025]


def hostile_text() -> st.SearchStrategy[Any]:
    """Text a client could send (and things that are not text at all)."""
    every_character = st.characters(exclude_categories=())  # NUL and lone surrogates too
    return st.one_of(
        st.text(every_character, max_size=40),
        st.text(max_size=20),
        st.sampled_from(SQL),
        st.builds(
            lambda piece, count: piece * count,
            st.sampled_from(["a", "é", "\x00", "😀", " ", "\ud800", "'", "x\x00y"]),
            st.sampled_from([*SIZES, 4_000_001]),
        ),
        st.none(),
        st.integers(),
        st.binary(max_size=8),
        st.lists(st.text(max_size=3), max_size=2),
    )


AMOUNTS = st.one_of(
    st.integers(),
    st.sampled_from([0, -1, 1, 2**31 - 1, 2**31, -(2**31), 2**63, -(2**63) - 1, 2**64, 10**100]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.fractions(),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
    st.complex_numbers(max_magnitude=10),
)


def references(world: World) -> st.SearchStrategy[Any]:
    """Ids of every kind of row of both users, mangled ids, and non-ids."""
    real = st.sampled_from(world.ids)
    return st.one_of(
        real,
        st.sampled_from(world.objects),
        real.map(str),
        real.map(lambda value: str(value).upper()),
        real.map(lambda value: value.hex),
        real.map(lambda value: str(value)[:-1]),
        real.map(lambda value: f"{{{value}}}"),
        st.uuids(),
        st.uuids().map(str),
        hostile_text(),
    )


def secrets(world: World) -> st.SearchStrategy[Any]:
    real = st.sampled_from(world.secrets)
    return st.one_of(
        real,
        st.builds(lambda secret, cut: secret[:cut], real, st.integers(0, 47)),
        st.builds(
            lambda secret, tail: secret + tail,
            real,
            hostile_text().filter(lambda value: isinstance(value, str)),
        ),
        real.map(str.swapcase),
        real.map(lambda secret: f" {secret}\n"),
        st.text(alphabet="sk_live_AZaz09", max_size=60).map(lambda tail: "sk_live_" + tail),
        hostile_text(),
    )


def enum_values(*enums: Any) -> st.SearchStrategy[Any]:
    members = [member for enum in enums for member in enum]
    return st.one_of(
        st.sampled_from(members),
        st.sampled_from([member.value for member in members]),
        st.sampled_from([member.value.upper() for member in members]),
        st.sampled_from(["superuser", "root", "refund", " user", "user\x00"]),
        hostile_text(),
    )


def moments() -> st.SearchStrategy[Any]:
    zones = st.sampled_from([None, UTC, timezone(timedelta(hours=-5)), timezone(timedelta(0))])
    return st.one_of(st.datetimes(timezones=zones), hostile_text(), st.floats())


def parameters(world: World) -> dict[str, st.SearchStrategy[Any]]:
    """A strategy for every keyword argument name of tokendb's public operations."""
    ref, text = references(world), hostile_text()
    return {
        "user": ref,
        "user_id": ref,
        "transaction": ref,
        "api_key": ref,
        "session": ref,
        "before": ref,
        "after": ref,
        "reference_id": ref,
        "amount": AMOUNTS,
        "tokens": AMOUNTS,
        "signup_bonus": AMOUNTS,
        "limit": AMOUNTS,
        "description": text,
        "content": text,
        "name": text,
        "model": text,
        "password": text,
        "new_password": text,
        "current_password": text,
        "permission": text,
        "email": st.one_of(st.sampled_from(world.emails), st.emails(), text),
        "role": enum_values(tokendb.UserRole, tokendb.MessageRole),
        "secret": secrets(world),
        "permissions": st.one_of(
            st.lists(st.sampled_from(["*", "chat", "billing:read", "Chat", "a" * 65]), max_size=3),
            st.lists(text, max_size=70),
            text,
        ),
        "expires_at": moments(),
        "touch_interval": st.one_of(
            st.timedeltas(), st.floats(allow_nan=True, allow_infinity=True), st.integers(), text
        ),
        "include_revoked": st.one_of(st.booleans(), text),
        "since_checkpoint": st.one_of(st.booleans(), text),
        "hold": ref,
        "ttl": st.one_of(
            st.timedeltas(),
            st.floats(allow_nan=True, allow_infinity=True),
            st.integers(),
            st.sampled_from([0, -1, 86_400, 86_401, 10**12, True]),
            text,
        ),
        "status": enum_values(tokendb.HoldStatus, tokendb.UserRole),
        "items": charge_items(ref, text),
        "token_limit": st.one_of(AMOUNTS, st.none(), text),
        "limit_period": st.one_of(enum_values(tokendb.LimitPeriod), st.none()),
        "since": st.one_of(moments(), st.dates()),
        "until": st.one_of(moments(), st.dates()),
        "group_by": st.one_of(
            st.lists(st.sampled_from(["day", "model", "api_key", "week", ""]), max_size=4),
            st.tuples(text),
            text,
            st.none(),
        ),
    }


def charge_items(ref: st.SearchStrategy[Any], text: st.SearchStrategy[Any]) -> Any:
    """charge_many's items: lists of hostile charges (mappings, ChargeItems, junk), non-lists."""
    item = st.one_of(
        st.fixed_dictionaries(
            {"user": ref, "amount": AMOUNTS},
            optional={"description": text, "reference_id": ref, "colour": text},
        ),
        st.builds(tokendb.ChargeItem, user=ref, amount=AMOUNTS, description=text),
        st.dictionaries(text.filter(lambda key: isinstance(key, str)), text, max_size=2),
        text,
        AMOUNTS,
    )
    return st.one_of(st.lists(item, max_size=4), st.tuples(item), item, st.none())


async def digest(raw: asyncpg.Connection) -> str:
    value: str = await raw.fetchval(f"SELECT {DIGEST}")
    return value


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def observer(tokendb_db: str, world: World) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(tokendb_db)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.mark.parametrize("operation", OPERATIONS)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_hostile_arguments_raise_typed_errors_and_write_nothing(
    operation: str, world: World, observer: asyncpg.Connection, data: st.DataObject
) -> None:
    function: Callable[..., Any] = getattr(tokendb, operation)
    strategies = parameters(world)
    arguments: dict[str, Any] = {}
    for name, parameter in inspect.signature(function).parameters.items():
        assert name in strategies, f"{operation}({name}=...) has no hostile strategy yet"
        if parameter.default is inspect.Parameter.empty or data.draw(st.booleans(), label=name):
            arguments[name] = data.draw(strategies[name], label=name)
    TRIED[operation] += 1

    before = await digest(observer)
    try:
        await function(**arguments)
    except tokendb.TokenDBError as exc:
        assert type(exc) not in (tokendb.DatabaseError, tokendb.DatabaseUnavailable), repr(exc)
        assert await digest(observer) == before, f"{operation} raised {exc!r} but wrote"
    except Exception as exc:
        raise AssertionError(f"{operation} raised untyped {exc!r}") from exc


# -- cross-tenant ------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def tenants(tokendb_clean: str, make_user: Any) -> dict[str, Any]:
    """Alice and Bob, each with a key, a session with a message, and a charge."""
    found: dict[str, Any] = {}
    for name in ("alice", "bob"):
        user = await make_user()
        key, secret = await tokendb.issue_api_key(user=user, name=name)
        session = await tokendb.start_chat(api_key=key, model="m")
        message = await tokendb.add_message(session=session, role="user", content=name, tokens=3)
        usage = await tokendb.charge(user=user, amount=20)
        found[name] = {
            "user": user,
            "key": key,
            "secret": secret,
            "session": session,
            "message": message,
            "usage": usage,
        }
    return found


async def test_cross_tenant_calls_are_not_found_and_write_nothing(
    tenants: dict[str, Any], tokendb_db: str
) -> None:
    alice, bob = tenants["alice"], tenants["bob"]
    as_alice = alice["user"]
    attempts: list[tuple[str, Callable[[], Any]]] = [
        ("start_chat", lambda: tokendb.start_chat(api_key=bob["key"], model="m", user=as_alice)),
        (
            "add_message",
            lambda: tokendb.add_message(
                session=bob["session"], role="user", content="x", tokens=1, user=as_alice
            ),
        ),
        ("end_chat", lambda: tokendb.end_chat(session=bob["session"], user=as_alice)),
        ("get_chat", lambda: tokendb.get_chat(session=bob["session"], user=as_alice)),
        ("list_messages", lambda: tokendb.list_messages(session=bob["session"], user=as_alice)),
        ("refund", lambda: tokendb.refund(transaction=bob["usage"], user=as_alice)),
        ("revoke_api_key", lambda: tokendb.revoke_api_key(api_key=bob["key"], user=as_alice)),
        # A session can't take another session's messages, even as a cursor.
        (
            "list_messages after",
            lambda: tokendb.list_messages(
                session=alice["session"], after=bob["message"], user=as_alice
            ),
        ),
        (
            "list_messages after, no owner",
            lambda: tokendb.list_messages(session=alice["session"], after=bob["message"]),
        ),
    ]
    raw = await asyncpg.connect(tokendb_db)
    try:
        before = await digest(raw)
        for name, attempt in attempts:
            with pytest.raises(tokendb.NotFound) as caught:
                await attempt()
            assert caught.value.entity in {"API key", "chat session", "transaction", "chat message"}
            assert await digest(raw) == before, f"{name} wrote"
    finally:
        await raw.close()
    # Bob's things are untouched and still work for Bob.
    assert (await tokendb.verify_api_key(secret=bob["secret"])).is_active
    assert (await tokendb.get_chat(session=bob["session"], user=bob["user"])).ended_at is None
    assert [m.id for m in await tokendb.list_messages(session=alice["session"])] == [
        alice["message"].id
    ]


async def test_a_key_starts_sessions_only_for_its_own_user(tenants: dict[str, Any]) -> None:
    alice, bob = tenants["alice"], tenants["bob"]
    session = await tokendb.start_chat(api_key=bob["key"], model="m")
    assert session.user_id == bob["user"].id
    message = await tokendb.add_message(session=session, role="user", content="x", tokens=4)
    assert await tokendb.get_balance(user=alice["user"]) == 100 - 3 - 20
    assert await tokendb.get_balance(user=bob["user"]) == 100 - 3 - 20 - 4
    assert [m.id for m in await tokendb.list_messages(session=bob["session"])] == [
        bob["message"].id
    ]
    assert [m.id for m in await tokendb.list_messages(session=session)] == [message.id]


async def test_the_database_refuses_a_refund_of_another_users_charge(
    tenants: dict[str, Any], raw: asyncpg.Connection
) -> None:
    """The backstop behind refund(user=...): around the Python layer, the trigger fires."""
    alice, bob = tenants["alice"], tenants["bob"]
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await raw.execute(
            "INSERT INTO token_transactions (id, user_id, amount, type, reference_id, "
            "balance_after) VALUES ($1, $2, 5, 'refund', $3, 82)",
            uuid.uuid4(),
            alice["user"].id,
            bob["usage"].id,
        )
    assert caught.value.constraint_name == "token_transactions_refund_target"
    refund = await tokendb.refund(transaction=bob["usage"], amount=5)
    assert refund.user_id == bob["user"].id
