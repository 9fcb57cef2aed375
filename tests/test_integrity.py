"""Integrity against every client (issue 9): each attack, as the application role.

tokendb runs as a DML-only application role in this suite (``tokendb_app_role``
in pyproject.toml), and so do the exported Tortoise models. Every attack of
the issue is sent twice around tokendb's operations: through the models and
as raw SQL on a connection of that role (granted TRUNCATE too, as the threat
model allows), committed. Each is refused (by the constraint named) or made
harmless, and then the books are checked in SQL (:mod:`tests.books`).
Attack 11 (concurrent ``aerich upgrade`` processes) is in ``test_migrations.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from tortoise import Tortoise
from tortoise.transactions import in_transaction

import tokendb
from tests import books
from tests.helpers import blocked_backends, migrations_copy, tamper
from tokendb import _db
from tokendb._translate import translated
from tokendb.connection import _upgrade, run_aerich
from tokendb.models import (
    ApiKey,
    ChatMessage,
    ChatSession,
    MessageRole,
    TokenTransaction,
    TransactionType,
    User,
)
from tokendb.schema import BACKSTOPS
from tokendb.testing import application_role, throwaway_database
from tokendb.testing import test_server_url as admin_url


@pytest_asyncio.fixture(loop_scope="session")
async def owner(tokendb_clean: str) -> AsyncIterator[asyncpg.Connection]:
    """The owner's connection, to read the books."""
    conn = await asyncpg.connect(tokendb_clean)
    try:
        yield conn
    finally:
        await conn.close()


def constraint_of(exc: BaseException) -> str | None:
    """The constraint an error (asyncpg's, Tortoise's wrapping it, tokendb's) names."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        error = todo.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        name = getattr(error, "constraint_name", None) or getattr(error, "constraint", None)
        if name:
            return str(name)
        todo += [e for e in (error.__cause__, error.__context__) if e is not None]
        todo += [arg for arg in error.args if isinstance(arg, BaseException)]
    return None


@contextlib.contextmanager
def refused(constraint: str) -> Iterator[None]:
    """The block fails, and the error names ``constraint``."""
    with pytest.raises(Exception) as info:
        yield
    assert constraint_of(info.value) == constraint, repr(info.value)


async def assert_books_balance(owner: asyncpg.Connection) -> None:
    assert await books.problems(owner) == []
    assert await tokendb.audit_ledger() == []
    assert await tokendb.audit_chats() == []


def email() -> str:
    return f"user-{uuid.uuid4().hex[:10]}@example.com"


# --- 1. a balance no ledger row gave ------------------------------------------------------


async def test_attack_1_a_user_created_with_a_balance_via_the_model(
    owner: asyncpg.Connection,
) -> None:
    rich = email()
    with refused("users_balance_follows_ledger"):
        await User.create(email=rich, password_hash="x", name="n", token_balance=10**9)
    assert not await User.filter(email=rich).exists()
    # With the model's default, a valid user without tokens: nothing to spend.
    plain = await User.create(email=email(), password_hash="x", name="n")
    assert plain.token_balance == 0 == await tokendb.get_balance(user=plain)
    with pytest.raises(tokendb.InsufficientTokens):
        await tokendb.charge(user=plain, amount=1)
    await assert_books_balance(owner)


async def test_attack_1_a_user_inserted_with_a_balance_as_raw_sql(
    app: asyncpg.Connection, owner: asyncpg.Connection
) -> None:
    with refused("users_balance_follows_ledger"):
        await app.execute(
            "INSERT INTO users (email, password_hash, name, token_balance) "
            "VALUES ($1, 'x', 'n', 1000000000)",
            email(),
        )
    user = await tokendb.create_user(email=email(), password="long enough", name="n")
    with refused("users_balance_follows_ledger"):
        await app.execute("UPDATE users SET token_balance = 1000000000 WHERE id = $1", user.id)
    assert await tokendb.get_balance(user=user) == 100
    await assert_books_balance(owner)


# --- 2. a balance with one ledger row that does not add up --------------------------------


async def test_attack_2_a_balance_and_a_row_that_do_not_add_up_via_the_models(
    owner: asyncpg.Connection,
) -> None:
    user = await tokendb.create_user(email=email(), password="long enough", name="n")
    with refused("token_transactions_chain"):
        async with in_transaction():
            await User.filter(id=user.id).update(token_balance=1_000_000)
            await TokenTransaction.create(
                user_id=user.id, amount=1, type=TransactionType.TOPUP, balance_after=1_000_000
            )
    assert await tokendb.get_balance(user=user) == 100
    await assert_books_balance(owner)


async def test_attack_2_a_balance_and_a_row_that_do_not_add_up_as_raw_sql(
    app: asyncpg.Connection, owner: asyncpg.Connection
) -> None:
    user = await tokendb.create_user(email=email(), password="long enough", name="n")
    with refused("token_transactions_chain"):
        async with app.transaction():
            await app.execute("UPDATE users SET token_balance = 1000000 WHERE id = $1", user.id)
            await app.execute(
                "INSERT INTO token_transactions (user_id, amount, type, balance_after) "
                "VALUES ($1, 1, 'topup', 1000000)",
                user.id,
            )
    # The same balance written as what it is, a top-up of the difference, is a
    # movement like tokendb.top_up's: the books balance, nothing to refuse.
    async with app.transaction():
        await app.execute("UPDATE users SET token_balance = 1000000 WHERE id = $1", user.id)
        await app.execute(
            "INSERT INTO token_transactions (user_id, amount, type, balance_after) "
            "VALUES ($1, 999900, 'topup', 1000000)",
            user.id,
        )
    assert await tokendb.get_balance(user=user) == 1_000_000
    await assert_books_balance(owner)


# --- 3. made-up balance_after -------------------------------------------------------------


async def test_attack_3_made_up_rows_via_the_models(owner: asyncpg.Connection) -> None:
    user = await tokendb.create_user(email=email(), password="long enough", name="n")
    with refused("token_transactions_chain"):
        await TokenTransaction.create(
            user_id=user.id, amount=5, type=TransactionType.TOPUP, balance_after=5_000
        )
    with refused("token_transactions_chain"):
        await TokenTransaction.bulk_create(
            [
                TokenTransaction(
                    user_id=user.id, amount=5, type=TransactionType.TOPUP, balance_after=after
                )
                for after in (5_000, 999)
            ]
        )
    # A row that continues the chain, without the balance it gives: refused.
    with refused("users_balance_follows_ledger"):
        await TokenTransaction.create(
            user_id=user.id, amount=5, type=TransactionType.TOPUP, balance_after=105
        )
    assert [tx.balance_after for tx in await tokendb.list_transactions(user=user)] == [100]
    await assert_books_balance(owner)


async def test_attack_3_made_up_rows_as_raw_sql(
    app: asyncpg.Connection, owner: asyncpg.Connection
) -> None:
    user = await tokendb.create_user(email=email(), password="long enough", name="n")
    insert = (
        "INSERT INTO token_transactions (user_id, amount, type, balance_after) "
        "VALUES ($1, $2, $3, $4)"
    )
    for amount, kind, after, constraint in [
        (5, "topup", 5_000, "token_transactions_chain"),
        (-5, "usage", 100, "token_transactions_chain"),
        (5, "topup", 105, "users_balance_follows_ledger"),
    ]:
        with refused(constraint):
            await app.execute(insert, user.id, amount, kind, after)
    await assert_books_balance(owner)


# --- 4. a row dated in the future -----------------------------------------------------------


async def test_attack_4_a_row_dated_in_the_future_is_dated_now(
    app: asyncpg.Connection, owner: asyncpg.Connection
) -> None:
    """Harmless: the database dates the row when it is written, so the user's
    next movements continue after it."""
    user = await tokendb.create_user(email=email(), password="long enough", name="n")
    async with app.transaction():
        await app.execute("UPDATE users SET token_balance = 110 WHERE id = $1", user.id)
        dated = await app.fetchval(
            "INSERT INTO token_transactions (user_id, amount, type, balance_after, created_at) "
            "VALUES ($1, 10, 'topup', 110, '2999-01-01') RETURNING created_at",
            user.id,
        )
    assert dated <= await owner.fetchval("SELECT clock_timestamp()")
    # Through the model too.
    async with in_transaction():
        await User.filter(id=user.id).update(token_balance=120)
        row = await TokenTransaction.create(
            user_id=user.id,
            amount=10,
            type=TransactionType.TOPUP,
            balance_after=120,
            created_at=datetime(2999, 1, 1, tzinfo=UTC),
        )
    stored = await owner.fetchval("SELECT created_at FROM token_transactions WHERE id = $1", row.id)
    assert dated < stored <= await owner.fetchval("SELECT clock_timestamp()")
    charged = await tokendb.charge(user=user, amount=30)
    assert (charged.balance_after, charged.created_at > stored) == (90, True)
    await assert_books_balance(owner)


# --- 5. emptying the ledger -----------------------------------------------------------------


async def test_attack_5_the_ledger_cannot_be_emptied_or_edited(
    app: asyncpg.Connection, owner: asyncpg.Connection
) -> None:
    user = await tokendb.create_user(email=email(), password="long enough", name="n")
    with refused("token_transactions_append_only"):
        async with app.transaction():
            await app.execute("SET LOCAL tokendb.allow_truncate = on")
            # CASCADE: token_holds refers to the ledger (without it, the foreign key refuses)
            await app.execute("TRUNCATE token_transactions CASCADE")
    with refused("token_transactions_append_only"):
        await TokenTransaction.all().delete()
    with refused("token_transactions_append_only"):
        await TokenTransaction.filter(user_id=user.id).update(amount=1_000)
    with refused("token_transactions_append_only"):
        await app.execute("DELETE FROM token_transactions WHERE user_id = $1", user.id)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):  # the cascade reaches usage_daily
        await app.execute("TRUNCATE users CASCADE")
    charged = await tokendb.charge(user=user, amount=40)
    assert charged.balance_after == 60
    assert len(await tokendb.list_transactions(user=user)) == 2
    await assert_books_balance(owner)


# --- 6. chats: a message nobody paid for, a stale session saved back --------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def session(tokendb_clean: str) -> ChatSession:
    user = await tokendb.create_user(email=email(), password="long enough", name="n")
    key, _ = await tokendb.issue_api_key(user=user, name="k")
    return await tokendb.start_chat(api_key=key, model="m")


async def test_attack_6_a_message_without_its_charge_via_the_models(
    session: ChatSession, owner: asyncpg.Connection
) -> None:
    with refused("chat_sessions_tokens_follow_messages"):
        await ChatMessage.create(
            session_id=session.id,
            role=MessageRole.USER,
            content="free?",
            tokens=50,
            tokens_used_after=50,
        )
    with refused("chat_messages_billed"):
        async with in_transaction():
            await ChatSession.filter(id=session.id).update(tokens_used=50)
            await ChatMessage.create(
                session_id=session.id,
                role=MessageRole.USER,
                content="free?",
                tokens=50,
                tokens_used_after=50,
            )
    assert await ChatMessage.filter(session_id=session.id).count() == 0
    await assert_books_balance(owner)


async def test_attack_6_a_stale_session_saved_back(
    session: ChatSession, owner: asyncpg.Connection
) -> None:
    stale = await ChatSession.get(id=session.id)
    await tokendb.add_message(session=session, role="user", content="hi", tokens=7)
    with refused("chat_sessions_tokens_follow_messages"):
        await stale.save()  # tokens_used back to 0
    assert (await tokendb.get_chat(session=session)).tokens_used == 7
    await tokendb.end_chat(session=session)
    stale = await ChatSession.get(id=session.id)
    stale.ended_at = None
    with refused("chat_sessions_ended_final"):
        await stale.save()
    with pytest.raises(tokendb.ChatSessionEnded):
        await tokendb.add_message(session=session, role="user", content="again", tokens=3)
    await assert_books_balance(owner)


async def test_attack_6_chats_as_raw_sql(
    session: ChatSession, app: asyncpg.Connection, owner: asyncpg.Connection
) -> None:
    message = await tokendb.add_message(session=session, role="user", content="hi", tokens=7)
    insert = (
        "INSERT INTO chat_messages (session_id, role, content, tokens, tokens_used_after) "
        "VALUES ($1, 'user', 'x', $2, $3)"
    )
    for sql, args, constraint in [
        (insert, (50, 57), "chat_sessions_tokens_follow_messages"),
        (insert, (50, 50), "chat_messages_chain"),
        (
            "UPDATE chat_sessions SET tokens_used = 0 WHERE id = $1",
            (),
            "chat_sessions_tokens_follow_messages",
        ),
        (
            "INSERT INTO chat_sessions (user_id, api_key_id, model, tokens_used) "
            "SELECT user_id, api_key_id, 'm', $2 FROM chat_sessions WHERE id = $1",
            (50,),
            "chat_sessions_tokens_follow_messages",
        ),
        (
            "UPDATE chat_messages SET tokens = 0 WHERE session_id = $1",
            (),
            "chat_messages_immutable",
        ),
        ("DELETE FROM chat_messages WHERE session_id = $1", (), "chat_messages_kept"),
        ("DELETE FROM chat_sessions WHERE id = $1", (), "chat_sessions_kept"),
    ]:
        with refused(constraint):
            await app.execute(sql, session.id, *args)
    # A second usage row for the message: one per message (the idempotency index).
    with refused("token_transactions_idempotency_key"):
        async with app.transaction():
            await app.execute(
                "UPDATE users SET token_balance = token_balance - 7 WHERE id = $1", session.user_id
            )
            await app.execute(
                "INSERT INTO token_transactions (user_id, amount, type, balance_after, "
                "reference_id) SELECT $1, -7, 'usage', token_balance, $2 FROM users WHERE id = $1",
                session.user_id,
                message.id,
            )
    # Redacting a message's text is allowed; its numbers are not touched.
    await app.execute("UPDATE chat_messages SET content = '[redacted]' WHERE id = $1", message.id)
    await tokendb.end_chat(session=session)
    with refused("chat_sessions_ended_final"):
        await app.execute("UPDATE chat_sessions SET ended_at = NULL WHERE id = $1", session.id)
    with refused("chat_messages_session_open"):
        await app.execute(insert, session.id, 0, 7)
    await assert_books_balance(owner)


# --- 7. revived keys ------------------------------------------------------------------------


async def test_attack_7_a_revoked_key_never_verifies_again(
    app: asyncpg.Connection, owner: asyncpg.Connection
) -> None:
    user = await tokendb.create_user(
        email=email(), password="long enough", name="n", signup_bonus=0
    )
    key, secret = await tokendb.issue_api_key(user=user, name="k", permissions=["admin"])
    await tokendb.revoke_api_key(api_key=key)
    (row,) = await owner.fetch("SELECT * FROM api_keys WHERE id = $1", key.id)
    with refused("api_keys_kept"):
        await ApiKey.filter(id=key.id).delete()
    with refused("api_keys_kept"):
        await app.execute("DELETE FROM api_keys WHERE id = $1", key.id)
    with refused("api_keys_kept"):  # ON DELETE CASCADE runs as the owner: refused all the same
        await app.execute("DELETE FROM users WHERE id = $1", user.id)
    # A new key with the revoked key's hash: the hash is taken for good.
    with refused("api_keys_key_hash_key"):
        await app.execute(
            "INSERT INTO api_keys (user_id, key_hash, key_prefix, name, permissions) "
            "VALUES ($1, $2, $3, 'again', '[\"admin\"]')",
            user.id,
            row["key_hash"],
            row["key_prefix"],
        )
    with refused("api_keys_revocation_final"):
        await ApiKey.filter(id=key.id).update(is_active=True)
    for permission in (None, "admin"):
        with pytest.raises(tokendb.ApiKeyRevoked):
            await tokendb.verify_api_key(secret=secret, permission=permission)
    await assert_books_balance(owner)


async def test_attack_7_an_expired_key_never_verifies_again(
    app: asyncpg.Connection, owner: asyncpg.Connection
) -> None:
    user = await tokendb.create_user(email=email(), password="long enough", name="n")
    key, secret = await tokendb.issue_api_key(
        user=user, name="k", expires_at=datetime.now(UTC) + timedelta(days=1)
    )
    # Its expiry arrives (the owner moves it; a key that has not expired may change).
    await owner.execute(
        "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1", key.id
    )
    stale = await ApiKey.get(id=key.id)
    stale.expires_at = None
    with refused("api_keys_expiry_final"):
        await stale.save()
    with refused("api_keys_expiry_final"):
        await app.execute(
            "UPDATE api_keys SET expires_at = now() + interval '1 year' WHERE id = $1", key.id
        )
    with pytest.raises(tokendb.ApiKeyExpired):
        await tokendb.verify_api_key(secret=secret)
    with pytest.raises(tokendb.ApiKeyExpired):
        await tokendb.start_chat(api_key=key, model="m")
    with refused("chat_sessions_key_valid"):
        await app.execute(
            "INSERT INTO chat_sessions (user_id, api_key_id, model) VALUES ($1, $2, 'm')",
            user.id,
            key.id,
        )
    await assert_books_balance(owner)


# --- 8. emails ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "constraint"),
    [
        ("Ada@X.io", "users_email_normalised"),
        (" ada@x.io ", "users_email_normalised"),
        (" not an email ", "users_email_normalised"),
        ("not an email", "users_email_shape"),
        # Invisible characters btrim() and [:space:] miss: the address tokendb
        # looks up ("ada@x.io") is then never the one stored, and it would
        # not be unique either. tokendb's own normalize_email() refuses them.
        ("\u00a0ada@x.io", "users_email_printable"),
        ("a\u00a0da@x.io", "users_email_printable"),
        ("ada@x.io\u200b", "users_email_printable"),
        ("a\u00adda@x.io", "users_email_printable"),
        ("ada@x.io\ufeff", "users_email_printable"),
        ("ada@x\u3000.io", "users_email_printable"),
    ],
)
async def test_attack_8_emails_stay_normalised(
    app: asyncpg.Connection, owner: asyncpg.Connection, value: str, constraint: str
) -> None:
    user = await tokendb.create_user(email="ada@x.io", password="long enough", name="Ada")
    with refused(constraint):
        await User.filter(id=user.id).update(email=value)
    with refused(constraint):
        await app.execute("UPDATE users SET email = $2 WHERE id = $1", user.id, value)
    with refused(constraint):
        await app.execute(
            "INSERT INTO users (email, password_hash, name) VALUES ($1, 'x', 'n')", value
        )
    assert (await tokendb.authenticate(email="Ada@X.io ", password="long enough")).id == user.id
    assert (await tokendb.get_user(email="ADA@x.io")).id == user.id
    await assert_books_balance(owner)


async def test_attack_8_non_ascii_capitals_as_the_servers_locale_folds_them(
    app: asyncpg.Connection, owner: asyncpg.Connection
) -> None:
    """lower() follows the database's locale: under C.UTF-8 (this server) it folds
    Ä, under the C locale ASCII only. What tokendb stores is folded by Python."""
    folds = await owner.fetchval("SELECT lower('ÄDA@X.IO') = 'äda@x.io'")
    user = await tokendb.create_user(email="ÄDA@X.IO", password="long enough", name="Äda")
    assert user.email == "äda@x.io"
    if folds:
        with refused("users_email_normalised"):
            await app.execute("UPDATE users SET email = 'ÄDA@x.io' WHERE id = $1", user.id)
    await assert_books_balance(owner)


# --- 9. lying ints, DETAIL in error texts --------------------------------------------------------


class LyingInt(int):
    """An int whose comparisons always pass and whose __index__/__int__ say ``told``."""

    told: int = 0

    def __new__(cls, value: int, told: int) -> LyingInt:
        self = super().__new__(cls, value)
        self.told = told
        return self

    def __index__(self) -> int:
        return self.told

    def __int__(self) -> int:
        return self.told

    def __lt__(self, other: object) -> bool:
        return False

    def __gt__(self, other: object) -> bool:
        return False

    def __le__(self, other: object) -> bool:
        return True

    def __ge__(self, other: object) -> bool:
        return True


class Indexable:
    """An integer type that is not an int (as numpy's are): it counts for its __index__."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


async def test_attack_9_lying_ints_are_checked_as_the_number_sent(
    owner: asyncpg.Connection,
) -> None:
    """An int subclass counts for the digits it holds, which is what asyncpg
    encodes, whatever its methods say; that number is checked and sent."""
    user = await tokendb.create_user(email=email(), password="long enough", name="n")
    for liar in (LyingInt(-5, told=5), LyingInt(10**12, told=5), LyingInt(0, told=5)):
        with pytest.raises(tokendb.ValidationError) as info:
            await tokendb.charge(user=user, amount=liar)
        assert info.value.field == "amount"
    for liar in (LyingInt(-5, told=5), LyingInt(10**12, told=5)):
        with pytest.raises(tokendb.ValidationError):
            await tokendb.create_user(
                email=email(), password="long enough", name="n", signup_bonus=liar
            )
    charged = await tokendb.charge(user=user, amount=LyingInt(3, told=10**9))
    assert (charged.amount, charged.balance_after) == (-3, 97)
    charged = await tokendb.charge(user=user, amount=Indexable(4))  # type: ignore[arg-type]
    assert (charged.amount, charged.balance_after) == (-4, 93)
    not_numbers: tuple[Any, ...] = (True, 3.0, "3", Indexable(-1), Indexable(2**31))
    for not_a_number in not_numbers:
        with pytest.raises(tokendb.ValidationError):
            await tokendb.charge(user=user, amount=not_a_number)
    await assert_books_balance(owner)


class LyingStr(str):
    def __len__(self) -> int:
        return 1

    def strip(self, chars: str | None = None) -> str:
        return "ok"


async def test_attack_9_lying_strings_are_checked_as_the_text_sent(tokendb_clean: str) -> None:
    user = await tokendb.create_user(email=email(), password="long enough", name="n")
    with pytest.raises(tokendb.ValidationError) as info:
        await tokendb.issue_api_key(user=user, name=LyingStr("x" * 101))
    assert info.value.field == "name"
    with pytest.raises(tokendb.ValidationError):
        await tokendb.change_password(user=user, new_password=LyingStr("x" * 5000))


async def test_attack_9_database_errors_carry_no_detail(
    app: asyncpg.Connection, tokendb_clean: str
) -> None:
    """A CHECK that fires on a row with a password hash: PostgreSQL's DETAIL
    quotes the row; tokendb's error says what was refused, not the row."""
    password_hash = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNo"

    @translated
    async def write() -> None:
        await _db.write(
            "INSERT INTO users (email, password_hash, name, role) VALUES ($1, $2, 'n', 'root')",
            email(),
            password_hash,
        )

    with pytest.raises(tokendb.DatabaseError) as info:
        await write()
    cause = info.value.__cause__
    assert isinstance(cause, asyncpg.CheckViolationError) and password_hash in str(cause)
    assert info.value.constraint == "users_role_valid"
    assert password_hash not in str(info.value)
    assert "c2FsdHNhbHRzYWx0" not in str(info.value) and "DETAIL" not in str(info.value)


# --- 10. a schema tokendb migrate did not make ---------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def server(request: pytest.FixtureRequest, tokendb_app_url: str) -> AsyncIterator[str]:
    """The test server; tokendb is initialised on the session's database again afterwards."""
    try:
        yield admin_url(request.config)
    finally:
        await tokendb.init(tokendb_app_url, min_size=1, max_size=20)


async def refused_by_init(url: str, *fragments: str) -> None:
    with pytest.raises(tokendb.ConfigurationError) as info:
        await tokendb.init(url)
    for fragment in ("tokendb migrate", *fragments):
        assert fragment in str(info.value), str(info.value)
    assert not tokendb.connection.is_initialised()


async def test_attack_10_init_refuses_a_schema_tokendb_migrate_did_not_make(
    server: str, tmp_path: Any
) -> None:
    async with throwaway_database(server, prefix="tokendb_init") as url:
        await refused_by_init(url, "no aerich table")
        # Tortoise.generate_schemas(): the tables, none of the backstops.
        await Tortoise.init(db_url=url, modules={"tokendb": ["tokendb.models"]})
        await Tortoise.generate_schemas()
        await Tortoise.close_connections()
        await refused_by_init(url, f"{len(BACKSTOPS)} of its backstops are missing")
        # A host application's own Aerich migration of tokendb's models: its
        # app's records, not tokendb's.
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                "CREATE TABLE aerich (id SERIAL PRIMARY KEY, version VARCHAR(255) NOT NULL, "
                "app VARCHAR(100) NOT NULL, content JSONB NOT NULL);"
                "INSERT INTO aerich (version, app, content) VALUES ('0_init.py', 'models', '{}')"
            )
        finally:
            await conn.close()
        await refused_by_init(url, "has not recorded tokendb's migration")
    async with throwaway_database(server, prefix="tokendb_init") as url:
        await _upgrade(url, migrations_copy(tmp_path, upto=0))  # the init migration alone
        await refused_by_init(url, "has not recorded tokendb's migration", "backstops are missing")


async def test_attack_10_init_refuses_a_schema_missing_one_backstop(server: str) -> None:
    async with throwaway_database(server, prefix="tokendb_init") as url:
        await tokendb.migrate(url)
        conn = await asyncpg.connect(url)
        try:
            await conn.execute('DROP TRIGGER "chat_messages_billed" ON "chat_messages"')
        finally:
            await conn.close()
        await refused_by_init(url, "1 of its backstops are missing (chat_messages_billed)")


@pytest.mark.parametrize(
    ("disable", "expected"),
    [
        ("token_transactions_chain", "1 of the triggers"),
        # ALL: tokendb's five and PostgreSQL's own trigger of the foreign key to sessions
        ("ALL", "6 of the triggers"),
    ],
)
async def test_attack_10_init_refuses_a_schema_with_a_disabled_trigger(
    server: str, disable: str, expected: str
) -> None:
    """A disabled trigger is still in the catalog under its name: the backstop
    check alone took it for present, and nothing kept the books."""
    table = "token_transactions" if disable != "ALL" else "chat_messages"
    async with throwaway_database(server, prefix="tokendb_init") as url:
        await tokendb.migrate(url)
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER {disable}")
        finally:
            await conn.close()
        with pytest.raises(tokendb.ConfigurationError) as info:
            await tokendb.init(url)
        message = str(info.value)
        assert expected in message and "disabled" in message, message
        assert "ENABLE TRIGGER" in message, message
        assert not tokendb.connection.is_initialised()


async def test_attack_10_an_application_role_that_cannot_read_aerich_is_told_to_grant(
    server: str,
) -> None:
    async with throwaway_database(server, prefix="tokendb_init") as url:
        await tokendb.migrate(url)
        async with application_role(url) as role_url:
            await tokendb.init(role_url)  # granted: fine
            await tokendb.close()
            conn = await asyncpg.connect(url)
            try:
                role = role_url.split("//", 1)[1].split(":", 1)[0]
                await conn.execute(f'REVOKE SELECT ON aerich FROM "{role}"')
            finally:
                await conn.close()
            with pytest.raises(tokendb.ConfigurationError, match="tokendb grant"):
                await tokendb.init(role_url)


# --- around the triggers: what else the application role can send -------------------------------


async def test_a_temp_type_named_record_does_not_change_the_books_refusal(
    app: asyncpg.Connection,
) -> None:
    """The books trigger's own refusal, not a type error from a TEMP ``record``
    (found by review: migration 14 declared ``bad record``)."""
    user = await tokendb.create_user(email=email(), password="long enough", name="n")
    with refused("users_balance_follows_ledger"):
        async with app.transaction():
            await app.execute("CREATE TYPE pg_temp.record AS (x int)")
            await app.execute(  # a ledger row without its balance
                "INSERT INTO token_transactions (user_id, amount, type, balance_after) "
                "VALUES ($1, 5, 'topup', 105)",
                user.id,
            )


async def test_temp_objects_do_not_stand_in_for_tokendbs_in_the_triggers(
    app: asyncpg.Connection, owner: asyncpg.Connection
) -> None:
    """A TEMP table or type is what unqualified names find first in the session
    that made it. The trigger functions name tokendb's tables with their schema and
    their variables' types with pg_catalog (or pin their search_path)."""
    user = await tokendb.create_user(email=email(), password="long enough", name="n")
    with refused("token_transactions_chain"):
        async with app.transaction():
            for name in ("uuid", "int4", "timestamptz", "record", "text"):
                await app.execute(f"CREATE TYPE pg_temp.{name} AS (x int)")
            for table in ("users", "token_transactions", "chat_sessions", "chat_messages"):
                await app.execute(
                    f"CREATE TEMP TABLE {table} (id pg_catalog.uuid, user_id pg_catalog.uuid, "
                    "session_id pg_catalog.uuid, seq int, balance_after int, token_balance int, "
                    "tokens_used int, tokens_used_after int, created_at timestamp with time zone, "
                    "ended_at timestamp with time zone) ON COMMIT DROP"
                )
            await app.execute(
                "INSERT INTO pg_temp.token_transactions (user_id, seq, balance_after, created_at, "
                "id) VALUES ($1, 1, 999999, '2000-01-01', gen_random_uuid())",
                user.id,
            )
            await app.execute(
                "UPDATE public.users SET token_balance = 1000004 WHERE id = $1", user.id
            )
            await app.execute(
                "INSERT INTO public.token_transactions (user_id, amount, type, balance_after) "
                "VALUES ($1, 5, 'topup', 1000004)",
                user.id,
            )
            # What a check at commit reading the TEMP table would find: all consistent.
            await app.execute(
                "INSERT INTO pg_temp.token_transactions (user_id, seq, balance_after, created_at, "
                "id) VALUES ($1, 2, 1000004, now(), gen_random_uuid())",
                user.id,
            )
    # The same session's legitimate movement is accepted: its checks read tokendb's tables.
    async with app.transaction():
        for name in ("uuid", "int4", "timestamptz", "record"):
            await app.execute(f"CREATE TYPE pg_temp.{name} AS (x int)")
        await app.execute("CREATE TEMP TABLE users (token_balance int) ON COMMIT DROP")
        await app.execute("UPDATE public.users SET token_balance = 105 WHERE id = $1", user.id)
        await app.execute(
            "INSERT INTO public.token_transactions (user_id, amount, type, balance_after) "
            "VALUES ($1, 5, 'topup', 105)",
            user.id,
        )
    assert await tokendb.get_balance(user=user) == 105
    await assert_books_balance(owner)


async def test_the_switches_of_the_owner_are_out_of_reach(app: asyncpg.Connection) -> None:
    for sql in (
        "SET session_replication_role = replica",
        "ALTER TABLE token_transactions DISABLE TRIGGER token_transactions_chain",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app.execute(sql)


async def test_two_repeatable_read_writers_cannot_fork_a_users_chain(
    app_role: str, owner: asyncpg.Connection, tokendb_clean: str
) -> None:
    """A REPEATABLE READ snapshot cannot see rows committed after it. One
    writer adds a +5/-5 pair (the balance does not change, so the user's row
    is not updated and no serialization failure stops the other); the other,
    whose snapshot predates the pair, adds a row after what it sees. Both
    rows would claim the same predecessor: token_transactions_user_seq_key
    refuses the second."""
    user = await tokendb.create_user(email=email(), password="long enough", name="n")
    first, second = await asyncpg.connect(app_role), await asyncpg.connect(app_role)
    try:
        late = second.transaction(isolation="repeatable_read")
        await late.start()
        await second.fetchval(
            "SELECT balance_after FROM token_transactions WHERE user_id = $1", user.id
        )
        async with first.transaction(isolation="repeatable_read"):
            await first.execute(  # one statement: at its end the balance is the newest row's
                "INSERT INTO token_transactions (user_id, amount, type, balance_after) "
                "VALUES ($1, 5, 'topup', 105), ($1, -5, 'usage', 100)",
                user.id,
            )
        with refused("token_transactions_user_seq_key"):
            await second.execute(
                "INSERT INTO token_transactions (user_id, amount, type, balance_after) "
                "VALUES ($1, 7, 'topup', 107)",
                user.id,
            )
        await late.rollback()
    finally:
        await first.close()
        await second.close()
    await assert_books_balance(owner)


async def test_a_session_opens_on_its_own_users_live_key(
    app: asyncpg.Connection, owner: asyncpg.Connection
) -> None:
    alice = await tokendb.create_user(email=email(), password="long enough", name="a")
    bob = await tokendb.create_user(email=email(), password="long enough", name="b")
    key, _ = await tokendb.issue_api_key(user=alice, name="k")
    insert = "INSERT INTO chat_sessions (user_id, api_key_id, model) VALUES ($1, $2, 'm')"
    with refused("chat_sessions_key_owner"):
        await app.execute(insert, bob.id, key.id)
    session_id = await app.fetchval(insert + " RETURNING id", alice.id, key.id)
    for sql, args in [
        ("UPDATE chat_sessions SET user_id = $2 WHERE id = $1", (bob.id,)),
        ("UPDATE chat_sessions SET created_at = '2000-01-01' WHERE id = $1", ()),
    ]:
        with refused("chat_sessions_immutable"):
            await app.execute(sql, session_id, *args)
    await tokendb.revoke_api_key(api_key=key)
    with refused("chat_sessions_key_valid"):
        await app.execute(insert, alice.id, key.id)
    await assert_books_balance(owner)


async def test_a_usage_row_bills_exactly_its_message(
    session: ChatSession, app: asyncpg.Connection, owner: asyncpg.Connection
) -> None:
    """A usage row referencing a message of its user bills that message's tokens:
    none for a message of 0 tokens."""
    free = await tokendb.add_message(session=session, role="user", content="hi", tokens=0)
    with refused("chat_messages_billed"):
        await tokendb.charge(user=session.user_id, amount=5, reference_id=free.id)
    with refused("chat_messages_billed"):
        async with app.transaction():
            await app.execute(
                "UPDATE users SET token_balance = token_balance - 5 WHERE id = $1",
                session.user_id,
            )
            await app.execute(
                "INSERT INTO token_transactions (user_id, amount, type, balance_after, "
                "reference_id) SELECT $1, -5, 'usage', token_balance, $2 FROM users WHERE id = $1",
                session.user_id,
                free.id,
            )
    await assert_books_balance(owner)


async def test_concurrent_messages_and_end_chat_keep_the_session_books(
    session: ChatSession, owner: asyncpg.Connection
) -> None:
    """The message trigger locks its session: ending it waits for messages in flight."""
    results = await asyncio.gather(
        *(
            tokendb.add_message(session=session, role="user", content=str(i), tokens=1)
            for i in range(20)
        ),
        tokendb.end_chat(session=session),
        return_exceptions=True,
    )
    assert all(
        not isinstance(r, Exception) or isinstance(r, tokendb.ChatSessionEnded) for r in results
    )
    await assert_books_balance(owner)


async def test_a_message_and_a_usage_row_for_it_cannot_pass_each_other(
    session: ChatSession, app_role: str, owner: asyncpg.Connection
) -> None:
    """Write skew: one transaction bills message X (a usage row referencing it, here
    as a +5/-5 pair that leaves the balance alone), another inserts X with 0 tokens.
    Each check, alone, would find nothing of the other. The message's check waits for
    the user's row, which the usage row's foreign key holds until it commits, and then
    sees it."""
    message_id = uuid.uuid4()
    first, second = await asyncpg.connect(app_role), await asyncpg.connect(app_role)
    try:
        billing = first.transaction()
        await billing.start()
        await first.execute(
            "INSERT INTO token_transactions (user_id, amount, type, balance_after, reference_id) "
            "SELECT $1, 5, 'topup', token_balance + 5, NULL::uuid FROM users WHERE id = $1 "
            "UNION ALL SELECT $1, -5, 'usage', token_balance, $2 FROM users WHERE id = $1",
            session.user_id,
            message_id,
        )

        async def message() -> None:
            async with second.transaction():
                await second.execute(
                    "INSERT INTO chat_messages (id, session_id, role, content, tokens, "
                    "tokens_used_after) SELECT $1, id, 'user', 'x', 0, tokens_used "
                    "FROM chat_sessions WHERE id = $2",
                    message_id,
                    session.id,
                )

        racing = asyncio.ensure_future(message())
        await blocked_backends(owner, like="%COMMIT%")  # the message's check waits at commit
        await billing.commit()
        with refused("chat_messages_billed"):
            await asyncio.wait_for(racing, 10)
    finally:
        await first.close()
        await second.close()
    await assert_books_balance(owner)


async def test_two_repeatable_read_writers_cannot_fork_a_sessions_chain(
    session: ChatSession, app_role: str, owner: asyncpg.Connection
) -> None:
    """As for the ledger: a 0-token message changes nothing on its session (whose row
    it only locks), so a REPEATABLE READ snapshot older than it does not stop the
    next writer, whose message would follow the same predecessor."""
    first, second = await asyncpg.connect(app_role), await asyncpg.connect(app_role)
    insert = (
        "INSERT INTO chat_messages (session_id, role, content, tokens, tokens_used_after) "
        "VALUES ($1, 'user', 'x', 0, 0)"
    )
    try:
        late = second.transaction(isolation="repeatable_read")
        await late.start()
        await second.fetchval(
            "SELECT count(*) FROM chat_messages WHERE session_id = $1", session.id
        )
        await first.execute(insert, session.id)
        with refused("chat_messages_session_seq_key"):
            await second.execute(insert, session.id)
        await late.rollback()
    finally:
        await first.close()
        await second.close()
    await assert_books_balance(owner)


# --- identities: an id never changes (review of issue 9) ------------------------------------


async def test_a_users_id_never_changes_so_no_balance_slips_past_its_check(
    app: asyncpg.Connection, owner: asyncpg.Connection
) -> None:
    """The balance checks look the user up by the id the row had when the check
    was queued: renamed before commit, the check found no user and passed, and
    the renamed user kept a balance no ledger row gave. (Tortoise itself refuses
    to update a primary key: the models cannot send this.)"""
    user = await tokendb.create_user(
        email=email(), password="long enough", name="n", signup_bonus=0
    )
    with refused("users_id_immutable"):
        async with app.transaction():
            await app.execute("UPDATE users SET token_balance = 1000000 WHERE id = $1", user.id)
            await app.execute("UPDATE users SET id = $1 WHERE id = $2", uuid.uuid4(), user.id)
    with refused("users_id_immutable"):
        async with app.transaction():
            inserted = await app.fetchval(
                "INSERT INTO users (email, password_hash, name, token_balance) "
                "VALUES ($1, 'x', 'n', 777) RETURNING id",
                email(),
            )
            await app.execute("UPDATE users SET id = $1 WHERE id = $2", uuid.uuid4(), inserted)
    assert await tokendb.get_balance(user=user) == 0
    await assert_books_balance(owner)


async def test_two_users_cannot_trade_ids_and_with_them_ledger_and_keys(
    app: asyncpg.Connection, owner: asyncpg.Connection
) -> None:
    """One UPDATE renames A and gives B A's id: the foreign keys (NO ACTION)
    still find id A at the statement's end, so A's ledger rows, API keys and
    chats would belong to B, and A's balance would go with no row behind it."""
    rich = await tokendb.create_user(email=email(), password="long enough", name="a")
    _, secret = await tokendb.issue_api_key(user=rich, name="k", permissions=["admin"])
    other = await tokendb.create_user(
        email=email(), password="long enough", name="b", signup_bonus=0
    )
    with refused("users_id_immutable"):
        await app.execute(
            "UPDATE users SET id = CASE id WHEN $1 THEN $3 ELSE $1 END WHERE id IN ($1, $2)",
            rich.id,
            other.id,
            uuid.uuid4(),
        )
    assert (await tokendb.verify_api_key(secret=secret)).user.email == rich.email
    assert await tokendb.get_balance(user=rich) == 100
    await assert_books_balance(owner)


async def test_an_api_keys_id_never_changes(
    app: asyncpg.Connection, owner: asyncpg.Connection
) -> None:
    """A session names the key it was opened on: trading ids of a revoked and
    a live key would move sessions between keys."""
    user = await tokendb.create_user(email=email(), password="long enough", name="n")
    live, _ = await tokendb.issue_api_key(user=user, name="live")
    dead, _ = await tokendb.issue_api_key(user=user, name="dead")
    session = await tokendb.start_chat(api_key=dead, model="m")
    await tokendb.revoke_api_key(api_key=dead)
    with refused("api_keys_id_immutable"):
        await app.execute(
            "UPDATE api_keys SET id = CASE id WHEN $1 THEN $3 ELSE $1 END WHERE id IN ($1, $2)",
            dead.id,
            live.id,
            uuid.uuid4(),
        )
    assert (await ChatSession.get(id=session.id)).api_key_id == dead.id
    await assert_books_balance(owner)


async def test_the_application_role_cannot_move_an_audit_mark_past_a_broken_row(
    app: asyncpg.Connection, tokendb_clean: str
) -> None:
    """The incremental audit (``tokendb audit``'s default) trusts each user's mark:
    a role that could write marks could move one past a row the owner broke, and
    the audit would report clean books. Only the audit itself moves them."""
    user = await tokendb.create_user(email=email(), password="long enough", name="n")
    await tokendb.top_up(user=user, amount=10)
    assert await tokendb.audit_ledger(since_checkpoint=True) == []
    broken = uuid.uuid4()
    append = (
        "INSERT INTO token_transactions (id, user_id, amount, type, balance_after, seq, created_at)"
        " SELECT $2, $1, 10, 'topup', 10, max(seq) + 1, clock_timestamp()"
        " FROM token_transactions WHERE user_id = $1"
    )
    shift = "UPDATE users SET token_balance = token_balance + $2 WHERE id = $1"
    await tamper(tokendb_clean, append, user.id, broken)  # restarts the balance: a broken link
    await tamper(tokendb_clean, shift, user.id, 10)
    try:
        forged: list[tuple[Any, ...]] = [
            (
                "UPDATE tokendb_audit_marks SET seq = seq + 1, balance_after = 10,"
                " transaction_id = $2 WHERE user_id = $1",
                user.id,
                broken,
            ),
            (
                "INSERT INTO tokendb_audit_marks"
                " (user_id, seq, balance_after, transaction_id, checkpoint_id)"
                " VALUES ($1, 3, 10, $2, $2)",
                uuid.uuid4(),
                broken,
            ),
            ("DELETE FROM tokendb_audit_marks WHERE user_id = $1", user.id),
            (
                "INSERT INTO tokendb_audit_checkpoints (id, rows_audited, users_advanced)"
                " VALUES ($1, 0, 0)",
                uuid.uuid4(),
            ),
        ]
        for statement, *args in forged:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await app.execute(statement, *args)
        [found] = await tokendb.audit_ledger(since_checkpoint=True)
        assert found.user_id == user.id and found.first_broken_transaction == broken
    finally:
        await tamper(tokendb_clean, "DELETE FROM token_transactions WHERE id = $1", broken)
        await tamper(tokendb_clean, shift, user.id, -10)
    assert await tokendb.audit_ledger(since_checkpoint=True) == []


async def _granted(conn: asyncpg.Connection, sql: str, role: str) -> tuple[Any, ...]:
    row = await conn.fetchrow(sql, role)
    assert row is not None
    return tuple(row)


async def test_a_role_granted_before_migration_12_loses_the_marks_and_gains_the_audit(
    tmp_path: Path,
) -> None:
    """``tokendb grant`` used to give INSERT and UPDATE on the audit's tables:
    migration 12 takes them back from every role that has them and lets those
    roles run the audit instead; its downgrade gives them back."""
    role = f"tokendb_old_app_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url())
    await admin.execute(f'CREATE ROLE "{role}"')
    tables = (
        "SELECT has_table_privilege($1, 'tokendb_audit_marks', 'INSERT'),"
        " has_table_privilege($1, 'tokendb_audit_checkpoints', 'UPDATE'),"
        " has_table_privilege($1, 'tokendb_audit_marks', 'SELECT')"
    )
    audit = "SELECT has_function_privilege($1, 'tokendb_audit_since_checkpoint(uuid)', 'EXECUTE')"
    try:
        async with throwaway_database(admin_url(), prefix="tokendb_grant") as url:
            await _upgrade(url, migrations_copy(tmp_path, upto=11))
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(
                    "GRANT SELECT, INSERT, UPDATE"
                    f' ON tokendb_audit_marks, tokendb_audit_checkpoints TO "{role}"'
                )
                await tokendb.migrate(url)
                assert await _granted(conn, tables, role) == (False, False, True)
                assert await conn.fetchval(audit, role)
                await conn.execute(f'SET ROLE "{role}"')
                assert (
                    await conn.fetch(
                        "SELECT * FROM tokendb_audit_since_checkpoint($1)", uuid.uuid4()
                    )
                    == []
                )
                await conn.execute("RESET ROLE")
                missing = f"tokendb_never_granted_{uuid.uuid4().hex[:8]}"
                await conn.execute(f'CREATE ROLE "{missing}"')
                try:
                    assert await _granted(conn, tables, missing) == (False, False, False)
                    assert not await conn.fetchval(audit, missing)
                finally:
                    await conn.execute(f'DROP ROLE "{missing}"')

                async def downgrade(command: Any) -> list[str]:
                    result: list[str] = await command.downgrade(version=12, delete=False)
                    return result

                await run_aerich(url, downgrade)
                assert await _granted(conn, tables, role) == (True, True, True)
            finally:
                await conn.close()
    finally:
        await admin.execute(f'DROP ROLE "{role}"')
        await admin.close()


@pytest.mark.parametrize(
    ("key", "model"), [("same", "other"), (None, "m"), ("another", "m")], ids=str
)
async def test_a_capture_is_billed_to_its_holds_key_and_model(
    app: asyncpg.Connection,
    owner: asyncpg.Connection,
    funded_user: Any,
    make_api_key: Any,
    key: str | None,
    model: str,
) -> None:
    """A hold counts against its key's limit and names a model (both immutable,
    migration 11): a capture by a usage row billed to another key or model (or to
    none) would free the key's hold and book the tokens elsewhere."""
    user = await funded_user(balance=100)
    held_key, _ = await make_api_key(user=user)
    other_key, _ = await make_api_key(user=user)
    held = await tokendb.hold(user=user, amount=30, ttl=60, api_key=held_key, model="m")
    billed_key = {"same": held_key, "another": other_key, None: None}[key]
    charged = await tokendb.charge(user=user, amount=5, api_key=billed_key, model=model)
    with refused("token_holds_books"):
        async with app.transaction():
            await app.execute(
                "UPDATE token_holds SET status = 'captured', captured_amount = 5, "
                "captured_transaction_id = $2 WHERE id = $1",
                held.id,
                charged.id,
            )
            await app.execute(
                "UPDATE users SET held_tokens = held_tokens - 30 WHERE id = $1", user.id
            )
    assert await tokendb.get_available_balance(user=user) == 65
    await assert_books_balance(owner)
