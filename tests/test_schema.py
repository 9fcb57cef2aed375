"""The migrated schema, read from the catalog, and proof that every constraint bites.

Every statement here goes around the Python layer (raw SQL on the ``raw``
connection, rolled back afterwards), so a constraint missing from the
migrations fails a test even though the Python checks would have caught the
bad input first.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.strategies import emails

import tokendb
from tokendb.schema import BACKSTOPS, CHECK_CONSTRAINTS, READ_ONLY_TABLES, TABLES
from tokendb.users import normalize_email

# table -> column -> (data_type, nullable, default or None)
COLUMNS: dict[str, dict[str, tuple[str, bool, str | None]]] = {
    "users": {
        "id": ("uuid", False, "gen_random_uuid()"),
        "email": ("character varying(255)", False, None),
        "password_hash": ("character varying(255)", False, None),
        "name": ("character varying(100)", False, None),
        "role": ("character varying(5)", False, "'user'::character varying"),
        "token_balance": ("integer", False, "0"),
        "created_at": ("timestamp with time zone", False, "now()"),
        "updated_at": ("timestamp with time zone", False, "now()"),
        "held_tokens": ("integer", False, "0"),
    },
    "api_keys": {
        "id": ("uuid", False, "gen_random_uuid()"),
        "user_id": ("uuid", False, None),
        "key_hash": ("character varying(255)", False, None),
        "key_prefix": ("character varying(20)", False, None),
        "name": ("character varying(100)", False, None),
        "permissions": ("jsonb", False, "'[]'::jsonb"),
        "is_active": ("boolean", False, "true"),
        "last_used_at": ("timestamp with time zone", True, None),
        "expires_at": ("timestamp with time zone", True, None),
        "created_at": ("timestamp with time zone", False, "now()"),
        "token_limit": ("bigint", True, None),
        "limit_period": ("character varying(5)", True, None),
    },
    "token_transactions": {
        "id": ("uuid", False, "gen_random_uuid()"),
        "user_id": ("uuid", False, None),
        "amount": ("integer", False, None),
        "type": ("character varying(6)", False, None),
        "description": ("text", True, None),
        "reference_id": ("uuid", True, None),
        "balance_after": ("integer", False, None),
        "created_at": ("timestamp with time zone", False, "clock_timestamp()"),
        "seq": ("integer", False, None),
        "model": ("character varying(50)", True, None),
        "api_key_id": ("uuid", True, None),
    },
    "chat_sessions": {
        "id": ("uuid", False, "gen_random_uuid()"),
        "user_id": ("uuid", False, None),
        "api_key_id": ("uuid", False, None),
        "tokens_used": ("integer", False, "0"),
        "model": ("character varying(50)", False, None),
        "created_at": ("timestamp with time zone", False, "now()"),
        "ended_at": ("timestamp with time zone", True, None),
    },
    "chat_messages": {
        "id": ("uuid", False, "gen_random_uuid()"),
        "session_id": ("uuid", False, None),
        "role": ("character varying(9)", False, None),
        "content": ("text", False, None),
        "tokens": ("integer", False, None),
        "created_at": ("timestamp with time zone", False, "clock_timestamp()"),
        "tokens_used_after": ("integer", False, None),
        "seq": ("integer", False, None),
    },
    "token_holds": {
        "id": ("uuid", False, "gen_random_uuid()"),
        "amount": ("integer", False, None),
        "status": ("character varying(8)", False, "'active'::character varying"),
        "reference_id": ("uuid", True, None),
        "description": ("text", True, None),
        "expires_at": ("timestamp with time zone", False, None),
        "created_at": ("timestamp with time zone", False, "clock_timestamp()"),
        "resolved_at": ("timestamp with time zone", True, None),
        "captured_amount": ("integer", True, None),
        "captured_transaction_id": ("uuid", True, None),
        "user_id": ("uuid", False, None),
        "api_key_id": ("uuid", True, None),
        "model": ("character varying(50)", True, None),
    },
}

# (table, column) -> (referenced table, ON DELETE rule)
FOREIGN_KEYS = {
    ("api_keys", "user_id"): ("users", "CASCADE"),
    ("chat_sessions", "user_id"): ("users", "CASCADE"),
    ("chat_sessions", "api_key_id"): ("api_keys", "RESTRICT"),
    ("chat_messages", "session_id"): ("chat_sessions", "CASCADE"),
    ("token_transactions", "user_id"): ("users", "RESTRICT"),
    ("token_holds", "user_id"): ("users", "RESTRICT"),
    ("token_holds", "captured_transaction_id"): ("token_transactions", "RESTRICT"),
    ("token_transactions", "api_key_id"): ("api_keys", "RESTRICT"),
    ("token_holds", "api_key_id"): ("api_keys", "RESTRICT"),
    ("usage_daily", "user_id"): ("users", "RESTRICT"),
    ("usage_daily", "api_key_id"): ("api_keys", "RESTRICT"),
    # The incremental audit's marks go with their user (who has no ledger rows then).
    ("tokendb_audit_marks", "user_id"): ("users", "CASCADE"),
}


# index name -> (unique, definition fragment)
INDEXES = {
    "users_email_lower_key": (True, "(lower((email)::text))"),
    "token_transactions_idempotency_key": (
        True,
        "(user_id, type, reference_id) WHERE ((reference_id IS NOT NULL) "
        "AND ((type)::text <> 'refund'::text))",
    ),
    "api_keys_user_id_idx": (False, "(user_id)"),
    "token_transactions_user_created_idx": (False, "(user_id, created_at DESC, id DESC)"),
    "chat_sessions_user_created_idx": (False, "(user_id, created_at)"),
    "chat_messages_session_created_idx": (False, "(session_id, created_at, id)"),
    "token_transactions_refunds_idx": (
        False,
        "(reference_id) WHERE ((type)::text = 'refund'::text)",
    ),
    "token_transactions_user_seq_key": (True, "(user_id, seq)"),
    "chat_messages_session_seq_key": (True, "(session_id, seq)"),
    "token_holds_reference_key": (
        True,
        "(user_id, reference_id) WHERE (reference_id IS NOT NULL)",
    ),
    "token_holds_captured_transaction_key": (
        True,
        "(captured_transaction_id) WHERE (captured_transaction_id IS NOT NULL)",
    ),
    "token_holds_user_created_idx": (False, "(user_id, created_at DESC, id DESC)"),
    "token_holds_active_idx": (
        False,
        "(user_id, expires_at) WHERE ((status)::text = 'active'::text)",
    ),
    "usage_daily_group_key": (True, "(user_id, day, api_key_id, model) NULLS NOT DISTINCT"),
    "usage_daily_key_day_idx": (False, "(api_key_id, day) WHERE (api_key_id IS NOT NULL)"),
    "api_keys_id_user_key": (True, "(id, user_id)"),
    "token_holds_active_key_idx": (
        False,
        "(api_key_id) WHERE (((status)::text = 'active'::text) AND (api_key_id IS NOT NULL))",
    ),
}

# Foreign keys over several columns: name -> (table, columns, referenced table, its columns).
COMPOSITE_FOREIGN_KEYS = {
    # A hold's key is its user's (migration 9).
    "token_holds_api_key_owner": (
        "token_holds",
        "{api_key_id,user_id}",
        "api_keys",
        "{id,user_id}",
    ),
}


async def test_all_six_tables_exist(raw: asyncpg.Connection) -> None:
    rows = await raw.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
    )
    assert {row["table_name"] for row in rows} >= set(TABLES)


@pytest.mark.parametrize("table", sorted(COLUMNS))
async def test_columns_types_nullability_and_defaults(raw: asyncpg.Connection, table: str) -> None:
    rows = await raw.fetch(
        """
        SELECT a.attname AS name,
               format_type(a.atttypid, a.atttypmod) AS type,
               NOT a.attnotnull AS nullable,
               pg_get_expr(d.adbin, d.adrelid) AS default
        FROM pg_attribute a
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
        """,
        table,
    )
    actual = {row["name"]: (row["type"], row["nullable"], row["default"]) for row in rows}
    assert actual == COLUMNS[table]


async def test_foreign_keys_and_on_delete_rules(raw: asyncpg.Connection) -> None:
    rows = await raw.fetch(
        """
        SELECT c.conrelid::regclass::text AS table_name, a.attname AS column_name,
               c.confrelid::regclass::text AS target,
               CASE c.confdeltype WHEN 'c' THEN 'CASCADE' WHEN 'r' THEN 'RESTRICT'
                    WHEN 'a' THEN 'NO ACTION' WHEN 'n' THEN 'SET NULL' ELSE 'SET DEFAULT' END
                   AS on_delete
        FROM pg_constraint c
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
        WHERE c.contype = 'f' AND c.connamespace = 'public'::regnamespace
          AND cardinality(c.conkey) = 1
        """
    )
    actual = {
        (row["table_name"], row["column_name"]): (row["target"], row["on_delete"]) for row in rows
    }
    assert actual == FOREIGN_KEYS
    composite = await raw.fetch(
        """
        SELECT c.conname, c.conrelid::regclass::text AS table_name,
               (SELECT array_agg(a.attname ORDER BY k.n) FROM unnest(c.conkey) WITH ORDINALITY
                    AS k(attnum, n) JOIN pg_attribute a
                    ON a.attrelid = c.conrelid AND a.attnum = k.attnum)::text AS columns,
               c.confrelid::regclass::text AS target,
               (SELECT array_agg(a.attname ORDER BY k.n) FROM unnest(c.confkey) WITH ORDINALITY
                    AS k(attnum, n) JOIN pg_attribute a
                    ON a.attrelid = c.confrelid AND a.attnum = k.attnum)::text AS target_columns
        FROM pg_constraint c
        WHERE c.contype = 'f' AND c.connamespace = 'public'::regnamespace
          AND cardinality(c.conkey) > 1
        """
    )
    assert {
        row["conname"]: (row["table_name"], row["columns"], row["target"], row["target_columns"])
        for row in composite
    } == COMPOSITE_FOREIGN_KEYS


@pytest.mark.catalog
async def test_every_check_constraint_exists(raw: asyncpg.Connection) -> None:
    rows = await raw.fetch(
        "SELECT conname FROM pg_constraint WHERE contype = 'c' "
        "AND connamespace = 'public'::regnamespace"
    )
    assert {row["conname"] for row in rows} == set(CHECK_CONSTRAINTS)


@pytest.mark.catalog
@pytest.mark.parametrize("name", sorted(INDEXES))
async def test_index_exists_with_its_definition(raw: asyncpg.Connection, name: str) -> None:
    definition = await raw.fetchval(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = 'public' AND indexname = $1", name
    )
    unique, fragment = INDEXES[name]
    assert definition is not None, f"index {name} is missing"
    assert definition.startswith("CREATE UNIQUE INDEX" if unique else "CREATE INDEX")
    assert definition.endswith(fragment)


# --- the constraints reject bad rows ---------------------------------------------------


async def insert_user(
    raw: asyncpg.Connection, email: str | None = None, **columns: object
) -> uuid.UUID:
    """Insert a user with raw SQL relying on the DB defaults; return its id."""
    values = {
        "email": email or f"{uuid.uuid4().hex[:8]}@example.com",
        "password_hash": "x",
        "name": "n",
        **columns,
    }
    names = ", ".join(values)
    params = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    user_id: uuid.UUID = await raw.fetchval(
        f"INSERT INTO users ({names}) VALUES ({params}) RETURNING id", *values.values()
    )
    return user_id


async def insert_key(raw: asyncpg.Connection, user_id: uuid.UUID) -> uuid.UUID:
    key_id: uuid.UUID = await raw.fetchval(
        "INSERT INTO api_keys (user_id, key_hash, key_prefix, name) "
        "VALUES ($1, $2, 'sk_live_abcd', 'k') RETURNING id",
        user_id,
        uuid.uuid4().hex,
    )
    return key_id


async def insert_session(raw: asyncpg.Connection, user_id: uuid.UUID) -> uuid.UUID:
    key_id = await insert_key(raw, user_id)
    session_id: uuid.UUID = await raw.fetchval(
        "INSERT INTO chat_sessions (user_id, api_key_id, model) VALUES ($1, $2, 'm') RETURNING id",
        user_id,
        key_id,
    )
    return session_id


async def assert_rejected(
    raw: asyncpg.Connection,
    error: type[asyncpg.PostgresError],
    constraint: str,
    sql: str,
    *args: object,
) -> None:
    """``sql`` fails with ``error`` naming ``constraint``; the transaction stays usable."""
    with pytest.raises(error) as info:
        async with raw.transaction():  # a savepoint, rolled back by the error
            await raw.execute(sql, *args)
    assert info.value.constraint_name == constraint


async def test_db_defaults_fill_raw_inserts(raw: asyncpg.Connection) -> None:
    user_id = await insert_user(raw)
    (user,) = await raw.fetch("SELECT * FROM users WHERE id = $1", user_id)
    assert user["token_balance"] == 0  # what a user without ledger rows has
    assert user["role"] == "user"
    assert user["created_at"] is not None and user["updated_at"] is not None
    key_id = await insert_key(raw, user_id)
    (key,) = await raw.fetch("SELECT * FROM api_keys WHERE id = $1", key_id)
    assert key["permissions"] == "[]"
    assert key["is_active"] is True
    assert key["created_at"] is not None
    session_id = await insert_session(raw, user_id)
    assert (
        await raw.fetchval("SELECT tokens_used FROM chat_sessions WHERE id = $1", session_id) == 0
    )


async def test_balance_cannot_go_negative(raw: asyncpg.Connection) -> None:
    user_id = await insert_user(raw)
    await assert_rejected(
        raw,
        asyncpg.CheckViolationError,
        "users_token_balance_nonnegative",
        "UPDATE users SET token_balance = -1 WHERE id = $1",
        user_id,
    )


async def test_role_only_takes_its_values(raw: asyncpg.Connection) -> None:
    await insert_user(raw, role="admin")
    await assert_rejected(
        raw,
        asyncpg.CheckViolationError,
        "users_role_valid",
        "INSERT INTO users (email, password_hash, name, role) VALUES ('r@x.io', 'x', 'n', 'root')",
    )


@pytest.mark.parametrize(
    ("email", "constraint"),
    [
        ("Ada@X.io", "users_email_normalised"),
        (" ada@x.io", "users_email_normalised"),
        ("ada@x.io ", "users_email_normalised"),
        (" not an email ", "users_email_normalised"),
        ("not an email", "users_email_shape"),
        ("ada@localhost", "users_email_shape"),
        ("ada@@x.io", "users_email_shape"),
        ("@x.io", "users_email_shape"),
        ("", "users_email_shape"),
        ("a\u00a0da@x.io", "users_email_printable"),
        ("ada\x01@x.io", "users_email_printable"),
    ],
)
async def test_emails_are_stored_normalised_and_shaped_like_an_address(
    raw: asyncpg.Connection, email: str, constraint: str
) -> None:
    await assert_rejected(
        raw,
        asyncpg.CheckViolationError,
        constraint,
        "INSERT INTO users (email, password_hash, name) VALUES ($1, 'x', 'n')",
        email,
    )
    user_id = await insert_user(raw)
    await assert_rejected(
        raw,
        asyncpg.CheckViolationError,
        constraint,
        "UPDATE users SET email = $2 WHERE id = $1",
        user_id,
        email,
    )


@given(email=emails())
@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
async def test_every_email_tokendb_accepts_fits_the_database_checks(
    raw: asyncpg.Connection, email: str
) -> None:
    """What :func:`tokendb.users.normalize_email` stores, the CHECKs accept (their
    lower() follows the database's locale; the Python side is the stricter)."""
    try:
        normalized = normalize_email(email)
    except tokendb.ValidationError:
        return
    assert await raw.fetchval(
        r"SELECT $1 = lower(btrim($1)) AND $1 ~ '^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$'",
        normalized,
    ), normalized


async def test_email_unique_case_insensitively(raw: asyncpg.Connection) -> None:
    email = f"ada-{uuid.uuid4().hex[:8]}@example.com"
    await insert_user(raw, email=email)
    await assert_rejected(
        raw,
        asyncpg.UniqueViolationError,
        "users_email_key",
        "INSERT INTO users (email, password_hash, name) VALUES ($1, 'x', 'n')",
        email,
    )
    # Behind users_email_normalised (which refuses capitals first), the
    # case-insensitive index still holds.
    await raw.execute("SET CONSTRAINTS ALL IMMEDIATE")  # no pending events: ALTER TABLE may run
    await raw.execute("ALTER TABLE users DROP CONSTRAINT users_email_normalised")  # rolled back
    await assert_rejected(
        raw,
        asyncpg.UniqueViolationError,
        "users_email_lower_key",
        "INSERT INTO users (email, password_hash, name) VALUES ($1, 'x', 'n')",
        email.upper(),
    )


async def test_key_hash_unique_and_permissions_an_array(raw: asyncpg.Connection) -> None:
    user_id = await insert_user(raw)
    key_hash = uuid.uuid4().hex
    await raw.execute(
        "INSERT INTO api_keys (user_id, key_hash, key_prefix, name) VALUES ($1, $2, 'p', 'k')",
        user_id,
        key_hash,
    )
    await assert_rejected(
        raw,
        asyncpg.UniqueViolationError,
        "api_keys_key_hash_key",
        "INSERT INTO api_keys (user_id, key_hash, key_prefix, name) VALUES ($1, $2, 'p', 'k')",
        user_id,
        key_hash,
    )
    await assert_rejected(
        raw,
        asyncpg.CheckViolationError,
        "api_keys_permissions_array",
        "INSERT INTO api_keys (user_id, key_hash, key_prefix, name, permissions) "
        "VALUES ($1, gen_random_uuid()::text, 'p', 'k', '{\"a\": 1}')",
        user_id,
    )


LEDGER_INSERT = (
    "INSERT INTO token_transactions (user_id, amount, type, balance_after, reference_id) "
    "VALUES ($1, $2, $3, $4, $5)"
)
# A movement as tokendb writes one: the balance, and the row that continues the chain.
LEDGER_APPEND = (
    "WITH moved AS (UPDATE users SET token_balance = token_balance + $2 WHERE id = $1 "
    "RETURNING id, token_balance) "
    "INSERT INTO token_transactions (user_id, amount, type, balance_after, reference_id) "
    "SELECT id, $2, $3, token_balance, $4 FROM moved RETURNING id"
)


async def append(
    raw: asyncpg.Connection,
    user_id: uuid.UUID,
    amount: int,
    kind: str,
    reference: uuid.UUID | None = None,
) -> uuid.UUID:
    """A ledger row that continues ``user_id``'s chain; its id."""
    row_id: uuid.UUID = await raw.fetchval(LEDGER_APPEND, user_id, amount, kind, reference)
    return row_id


async def reject_ledger_row(
    raw: asyncpg.Connection,
    error: type[asyncpg.PostgresError],
    constraint: str,
    row: tuple[object, ...],
) -> None:
    """The ledger ``row`` ``(user_id, amount, type, balance_after, reference_id)`` is refused."""
    await assert_rejected(raw, error, constraint, LEDGER_INSERT, *row)


@pytest.mark.parametrize(
    ("amount", "kind", "balance_after", "constraint"),
    [  # each row continues an empty ledger, so only the CHECK named can refuse it
        (0, "topup", 0, "token_transactions_amount_nonzero"),
        (-5, "topup", -5, "token_transactions_amount_sign"),
        (-5, "bonus", -5, "token_transactions_amount_sign"),
        (5, "usage", 5, "token_transactions_amount_sign"),
        (5, "gift", 5, "token_transactions_type_valid"),
        (-1, "usage", -1, "token_transactions_balance_after_nonnegative"),
    ],
)
async def test_ledger_row_checks(
    raw: asyncpg.Connection, amount: int, kind: str, balance_after: int, constraint: str
) -> None:
    user_id = await insert_user(raw)
    await reject_ledger_row(
        raw, asyncpg.CheckViolationError, constraint, (user_id, amount, kind, balance_after, None)
    )


async def test_valid_signs_are_accepted(raw: asyncpg.Connection) -> None:
    user_id = await insert_user(raw)
    for amount, kind in [(5, "topup"), (5, "bonus"), (-5, "usage")]:
        await append(raw, user_id, amount, kind)


async def test_each_ledger_row_continues_its_users_chain(raw: asyncpg.Connection) -> None:
    user_id = await insert_user(raw)
    first = await append(raw, user_id, 10, "topup")
    for balance_after in (10, 25):  # made up; or of an amount not sent
        await assert_rejected(
            raw,
            asyncpg.CheckViolationError,
            "token_transactions_chain",
            "INSERT INTO token_transactions (user_id, amount, type, balance_after) "
            "VALUES ($1, 10, 'topup', $2)",
            user_id,
            balance_after,
        )
    second = await append(raw, user_id, 10, "topup")
    chain = await raw.fetch(
        "SELECT id, seq, balance_after FROM token_transactions WHERE user_id = $1 ORDER BY seq",
        user_id,
    )
    assert [tuple(row) for row in chain] == [(first, 1, 10), (second, 2, 20)]


async def test_the_database_dates_chained_rows(raw: asyncpg.Connection) -> None:
    """A row dated in the future is dated now; one dated before its predecessor
    (in (created_at, id)) right after it: the chain's order is (created_at, id)."""
    user_id = await insert_user(raw)
    session_id = await insert_session(raw, user_id)
    for table, insert in [
        (
            "token_transactions",
            "WITH moved AS (UPDATE users SET token_balance = token_balance + 1 WHERE id = $1 "
            "RETURNING id, token_balance) "
            "INSERT INTO token_transactions (user_id, amount, type, balance_after, created_at) "
            "SELECT id, 1, 'topup', token_balance, $2 FROM moved RETURNING created_at",
        ),
        (
            "chat_messages",
            "INSERT INTO chat_messages (session_id, role, content, tokens, tokens_used_after, "
            "created_at) VALUES ($1, 'user', 'x', 0, 0, $2) RETURNING created_at",
        ),
    ]:
        owner = session_id if table == "chat_messages" else user_id
        before = await raw.fetchval("SELECT clock_timestamp()")
        future = await raw.fetchval(insert, owner, datetime(2999, 1, 1, tzinfo=UTC))
        after = await raw.fetchval("SELECT clock_timestamp()")
        assert before <= future <= after
        past = await raw.fetchval(insert, owner, datetime(2000, 1, 1, tzinfo=UTC))
        assert past == future + timedelta(microseconds=1)


async def test_a_multi_row_insert_continues_the_chain_row_by_row(raw: asyncpg.Connection) -> None:
    """A BEFORE ROW trigger sees the rows its own statement inserted before (as the
    coalesced batch relies on): rows in chain order pass, the same rows reversed do not."""
    user_id = await insert_user(raw)
    insert = (
        "WITH moved AS (UPDATE users SET token_balance = $3 WHERE id = $1 RETURNING id) "
        "INSERT INTO token_transactions (id, user_id, amount, type, balance_after, created_at) "
        "SELECT gen_random_uuid(), moved.id, 1, 'topup', g, clock_timestamp() "
        "FROM moved, generate_series($2::int, $3::int) AS g ORDER BY g {direction}"
    )
    await raw.execute(insert.format(direction="ASC"), user_id, 1, 5)
    await assert_rejected(
        raw,
        asyncpg.CheckViolationError,
        "token_transactions_chain",
        insert.format(direction="DESC"),
        user_id,
        6,
        10,
    )


async def test_seq_is_the_databases_to_set(raw: asyncpg.Connection) -> None:
    """Whatever seq a writer sends, the chain trigger sets the next one."""
    user_id = await insert_user(raw)
    await raw.execute(
        "WITH moved AS (UPDATE users SET token_balance = 7 WHERE id = $1 RETURNING id) "
        "INSERT INTO token_transactions (user_id, amount, type, balance_after, seq) "
        "SELECT id, 7, 'topup', 7, 99 FROM moved",
        user_id,
    )
    assert await raw.fetchval("SELECT seq FROM token_transactions WHERE user_id = $1", user_id) == 1


async def test_a_refund_is_a_credit(raw: asyncpg.Connection) -> None:
    """A negative refund would debit through the refund path (within its charge as far
    as the refund trigger can tell): the amount-sign CHECK refuses it."""
    user_id = await insert_user(raw)
    await append(raw, user_id, 100, "topup")
    charge_id = await append(raw, user_id, -10, "usage")
    await reject_ledger_row(
        raw,
        asyncpg.CheckViolationError,
        "token_transactions_amount_sign",
        (user_id, -5, "refund", 85, charge_id),
    )


async def test_idempotency_index_rejects_a_second_movement(raw: asyncpg.Connection) -> None:
    user_id = await insert_user(raw)
    reference = uuid.uuid4()
    await append(raw, user_id, 100, "topup")
    await append(raw, user_id, -5, "usage", reference)
    await reject_ledger_row(
        raw,
        asyncpg.UniqueViolationError,
        "token_transactions_idempotency_key",
        (user_id, -5, "usage", 90, reference),
    )
    # The same reference is fine for another type and for another user.
    await append(raw, user_id, 5, "topup", reference)
    other = await insert_user(raw)
    await append(raw, other, 100, "topup")
    await append(raw, other, -5, "usage", reference)
    # Without a reference there is no idempotency key at all.
    await append(raw, user_id, -5, "usage")
    await append(raw, user_id, -5, "usage")


async def test_refunds_share_their_charge_reference(raw: asyncpg.Connection) -> None:
    user_id = await insert_user(raw)
    await append(raw, user_id, 100, "topup")
    charge_id = await append(raw, user_id, -10, "usage")
    await append(raw, user_id, 4, "refund", charge_id)
    await append(raw, user_id, 6, "refund", charge_id)
    await reject_ledger_row(
        raw,
        asyncpg.CheckViolationError,
        "token_transactions_refund_within_charge",
        (user_id, 1, "refund", 101, charge_id),
    )


async def test_refund_must_target_a_usage_row_of_the_same_user(raw: asyncpg.Connection) -> None:
    owner = await insert_user(raw)
    other = await insert_user(raw)
    await append(raw, owner, 100, "topup")
    charge_id = await append(raw, owner, -10, "usage")
    topup_id = await append(raw, owner, 10, "topup")
    for user_id, reference, after in [
        (other, charge_id, 1),
        (owner, topup_id, 101),
        (owner, uuid.uuid4(), 101),
    ]:
        await reject_ledger_row(
            raw,
            asyncpg.CheckViolationError,
            "token_transactions_refund_target",
            (user_id, 1, "refund", after, reference),
        )


async def test_ledger_is_append_only_for_all_but_the_owner(
    raw: asyncpg.Connection, app_raw: asyncpg.Connection
) -> None:
    user_id = await insert_user(app_raw)
    tx_id = await append(app_raw, user_id, 5, "topup")
    for sql in (
        "UPDATE token_transactions SET description = 'edited' WHERE id = $1",
        "DELETE FROM token_transactions WHERE id = $1",
    ):
        await assert_rejected(
            app_raw, asyncpg.RestrictViolationError, "token_transactions_append_only", sql, tx_id
        )
    # The owner (here: the server's admin role, which created the tables) may.
    other = await insert_user(raw)
    mine = await append(raw, other, 5, "topup")
    await raw.execute("UPDATE token_transactions SET description = 'fixed' WHERE id = $1", mine)


async def test_ledger_rows_are_never_removed_by_a_cascade(raw: asyncpg.Connection) -> None:
    user_id = await insert_user(raw)
    await append(raw, user_id, 5, "topup")
    await assert_rejected(
        raw,
        asyncpg.ForeignKeyViolationError,
        "token_transactions_user_id_fkey",
        "DELETE FROM users WHERE id = $1",
        user_id,
    )


async def test_sessions_keep_their_api_key(raw: asyncpg.Connection) -> None:
    user_id = await insert_user(raw)
    session_id = await insert_session(raw, user_id)
    key_id = await raw.fetchval("SELECT api_key_id FROM chat_sessions WHERE id = $1", session_id)
    await assert_rejected(
        raw,
        asyncpg.ForeignKeyViolationError,
        "chat_sessions_api_key_id_fkey",
        "DELETE FROM api_keys WHERE id = $1",
        key_id,
    )


MESSAGE_INSERT = (
    "INSERT INTO chat_messages (session_id, role, content, tokens, tokens_used_after) "
    "VALUES ($1, 'user', 'hi', 0, 0)"
)


async def test_the_owner_may_delete_a_user_without_ledger_rows(raw: asyncpg.Connection) -> None:
    user_id = await insert_user(raw)
    session_id = await insert_session(raw, user_id)
    await raw.execute(MESSAGE_INSERT, session_id)
    # Sessions (and their messages) go first, so the RESTRICT on api keys does not fire.
    await raw.execute("DELETE FROM chat_sessions WHERE user_id = $1", user_id)
    await raw.execute("DELETE FROM users WHERE id = $1", user_id)
    assert await raw.fetchval("SELECT count(*) FROM api_keys WHERE user_id = $1", user_id) == 0
    assert (
        await raw.fetchval("SELECT count(*) FROM chat_messages WHERE session_id = $1", session_id)
        == 0
    )


async def test_api_keys_are_kept_for_all_but_the_owner(app_raw: asyncpg.Connection) -> None:
    """Also through ON DELETE CASCADE, which runs as the table's owner: the
    session's role must be the owner too."""
    user_id = await insert_user(app_raw)
    key_id = await insert_key(app_raw, user_id)
    for sql, target in [
        ("DELETE FROM api_keys WHERE id = $1", key_id),
        ("DELETE FROM users WHERE id = $1", user_id),
    ]:
        await assert_rejected(app_raw, asyncpg.RestrictViolationError, "api_keys_kept", sql, target)


async def test_sessions_are_deleted_by_the_owner_alone_with_their_messages(
    raw: asyncpg.Connection, app_raw: asyncpg.Connection
) -> None:
    session_id = await insert_session(app_raw, await insert_user(app_raw))
    await app_raw.execute(MESSAGE_INSERT, session_id)
    await assert_rejected(
        app_raw,
        asyncpg.RestrictViolationError,
        "chat_sessions_kept",
        "DELETE FROM chat_sessions WHERE id = $1",
        session_id,
    )
    mine = await insert_session(raw, await insert_user(raw))
    await raw.execute(MESSAGE_INSERT, mine)
    await raw.execute("DELETE FROM chat_sessions WHERE id = $1", mine)
    await raw.execute("SET CONSTRAINTS ALL IMMEDIATE")  # the deferred checks, now
    assert await raw.fetchval("SELECT count(*) FROM chat_messages WHERE session_id = $1", mine) == 0


async def test_a_message_leaves_only_with_its_session(app_raw: asyncpg.Connection) -> None:
    session_id = await insert_session(app_raw, await insert_user(app_raw))
    await app_raw.execute(MESSAGE_INSERT, session_id)
    await app_raw.execute("SET CONSTRAINTS chat_messages_kept IMMEDIATE")
    await assert_rejected(
        app_raw,
        asyncpg.RestrictViolationError,
        "chat_messages_kept",
        "DELETE FROM chat_messages WHERE session_id = $1",
        session_id,
    )


@pytest.mark.parametrize(
    ("sql", "constraint"),
    [
        (
            "UPDATE chat_sessions SET tokens_used = -1 WHERE id = $1",
            "chat_sessions_tokens_used_nonnegative",
        ),
        (
            "INSERT INTO chat_messages (session_id, role, content, tokens, tokens_used_after) "
            "VALUES ($1, 'user', 'x', -1, -1)",
            "chat_messages_tokens_nonnegative",
        ),
        (
            "INSERT INTO chat_messages (session_id, role, content, tokens, tokens_used_after) "
            "VALUES ($1, 'robot', 'x', 1, 1)",
            "chat_messages_role_valid",
        ),
        (
            "INSERT INTO chat_messages (session_id, role, content, tokens, tokens_used_after) "
            "VALUES ($1, 'user', 'x', 5, 3)",
            "chat_messages_chain",
        ),
    ],
)
async def test_chat_checks(raw: asyncpg.Connection, sql: str, constraint: str) -> None:
    session_id = await insert_session(raw, await insert_user(raw))
    await assert_rejected(raw, asyncpg.CheckViolationError, constraint, sql, session_id)


NO_TRUNCATE = {
    table: "token_transactions_append_only"
    if table == "token_transactions"
    else f"{table}_no_truncate"
    for table in TABLES
}


@pytest.mark.parametrize("table", sorted(TABLES))
async def test_truncate_is_the_owners_alone(app_raw: asyncpg.Connection, table: str) -> None:
    """Even for a role granted TRUNCATE. The named table's trigger fires first (the
    tables a CASCADE reaches come after it, and refuse it too), but where the
    cascade reaches the usage rollup, which the role may only read: that
    privilege check comes before any trigger."""
    if table in ("users", "api_keys"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="usage_daily"):
            async with app_raw.transaction():
                await app_raw.execute(f"TRUNCATE {table} CASCADE")
        return
    await assert_rejected(
        app_raw, asyncpg.RestrictViolationError, NO_TRUNCATE[table], f"TRUNCATE {table} CASCADE"
    )


async def test_a_balance_only_changes_with_its_ledger_row(raw: asyncpg.Connection) -> None:
    user_id = await insert_user(raw, token_balance=0)
    # Deferred to COMMIT; made immediate here so the savepoint sees it.
    await raw.execute("SET CONSTRAINTS users_balance_follows_ledger IMMEDIATE")
    await assert_rejected(
        raw,
        asyncpg.CheckViolationError,
        "users_balance_follows_ledger",
        "UPDATE users SET token_balance = 50 WHERE id = $1",
        user_id,
    )
    # The same change with its ledger row in the same statement is accepted.
    await raw.execute(
        "WITH moved AS (UPDATE users SET token_balance = 50 WHERE id = $1 RETURNING id) "
        "INSERT INTO token_transactions (user_id, amount, type, balance_after) "
        "SELECT id, 50, 'topup', 50 FROM moved",
        user_id,
    )
    # Other columns stay freely editable.
    await raw.execute("UPDATE users SET name = 'renamed' WHERE id = $1", user_id)


async def test_every_message_role_is_accepted(raw: asyncpg.Connection) -> None:
    session_id = await insert_session(raw, await insert_user(raw))
    for role in ("user", "assistant", "system"):
        await raw.execute(
            "INSERT INTO chat_messages (session_id, role, content, tokens, tokens_used_after) "
            "VALUES ($1, $2, 'x', 0, 0)",
            session_id,
            role,
        )


async def test_refunds_of_one_charge_do_not_count_against_another(
    raw: asyncpg.Connection,
) -> None:
    user_id = await insert_user(raw)
    await append(raw, user_id, 100, "topup")
    charges = [await append(raw, user_id, -10, "usage") for _ in range(2)]
    await append(raw, user_id, 10, "refund", charges[0])
    await append(raw, user_id, 10, "refund", charges[1])


async def test_revocation_is_final(raw: asyncpg.Connection) -> None:
    user_id = await insert_user(raw)
    key_id = await insert_key(raw, user_id)
    await raw.execute("UPDATE api_keys SET is_active = false, name = 'old' WHERE id = $1", key_id)
    for sql in (
        "UPDATE api_keys SET is_active = true WHERE id = $1",
        "UPDATE api_keys SET key_hash = 'other' WHERE id = $1",
    ):
        await assert_rejected(
            raw, asyncpg.CheckViolationError, "api_keys_revocation_final", sql, key_id
        )
    await raw.execute("UPDATE api_keys SET name = 'renamed' WHERE id = $1", key_id)


async def test_a_key_never_changes_hands(raw: asyncpg.Connection) -> None:
    """An API key's owner is fixed, active or revoked: moving a key to another user
    would hand them its holder's access and bill them for it."""
    owner, other = await insert_user(raw), await insert_user(raw)
    key_id = await insert_key(raw, owner)
    move = "UPDATE api_keys SET user_id = $2 WHERE id = $1"
    await assert_rejected(
        raw, asyncpg.CheckViolationError, "api_keys_revocation_final", move, key_id, other
    )
    await raw.execute("UPDATE api_keys SET is_active = false WHERE id = $1", key_id)
    await assert_rejected(
        raw, asyncpg.CheckViolationError, "api_keys_revocation_final", move, key_id, other
    )


async def test_an_expired_keys_expiry_is_final(raw: asyncpg.Connection) -> None:
    user_id = await insert_user(raw)
    live, expired = await insert_key(raw, user_id), await insert_key(raw, user_id)
    await raw.execute(
        "UPDATE api_keys SET expires_at = now() + interval '1 day' WHERE id = $1", live
    )
    await raw.execute(
        "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1", expired
    )
    for value in ("NULL", "now() + interval '1 day'"):
        await assert_rejected(
            raw,
            asyncpg.CheckViolationError,
            "api_keys_expiry_final",
            f"UPDATE api_keys SET expires_at = {value} WHERE id = $1",
            expired,
        )
    # A key that has not expired may still be extended, or made permanent.
    await raw.execute(
        "UPDATE api_keys SET expires_at = now() + interval '2 days' WHERE id = $1", live
    )
    await raw.execute("UPDATE api_keys SET expires_at = NULL WHERE id = $1", live)


# --- the schema as tokendb.schema describes it --------------------------------------------


async def named_objects(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        """
        SELECT conname AS name FROM pg_constraint WHERE conrelid = ANY($1::regclass[])
        UNION SELECT tgname FROM pg_trigger
            WHERE tgrelid = ANY($1::regclass[]) AND NOT tgisinternal
        UNION SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
            WHERE x.indrelid = ANY($1::regclass[])
        """,
        [*TABLES, *READ_ONLY_TABLES],
    )
    return {row["name"] for row in rows}


async def test_backstops_are_the_named_checks_triggers_and_unique_indexes_of_the_schema(
    raw: asyncpg.Connection,
) -> None:
    """init() requires exactly what the migrations create: every name in
    BACKSTOPS exists, and every CHECK, trigger and unique index (but the
    ones PostgreSQL names itself) is in BACKSTOPS."""
    present = await named_objects(raw)
    assert set(BACKSTOPS) <= present
    generated = {name for name in present if name.endswith(("_pkey", "_fkey", "_idx"))}
    generated |= {"users_email_key", "api_keys_key_hash_key"}  # UNIQUE columns of the init
    assert present - generated == set(BACKSTOPS)


async def test_each_change_a_cached_verification_depends_on_is_notified(
    tokendb_clean: str,
) -> None:
    """Migration 6: whoever changes a key or its user (raw SQL here), the verify
    caches hear it at commit on ``tokendb_api_keys``: a changed or deleted key
    by its hash, a changed user as ``u:<id>``, a TRUNCATE as ``*``; verify's
    touch of ``last_used_at`` alone sends nothing. (TRUNCATE users always
    cascades to api_keys, whose trigger sends the same ``*``.) Each change is
    committed: a rolled-back one notifies nobody. On emptied tables: the
    TRUNCATE ... CASCADE would take an earlier test's ledger rows and leave
    its users' balances, which the audit after each test reports."""
    tokendb_db = tokendb_clean
    heard: asyncio.Queue[str] = asyncio.Queue()
    listener, raw = await asyncpg.connect(tokendb_db), await asyncpg.connect(tokendb_db)
    await listener.add_listener("tokendb_api_keys", lambda *args: heard.put_nowait(args[3]))
    try:

        async def next_heard() -> str:
            return await asyncio.wait_for(heard.get(), 10)

        user_id = await insert_user(raw)
        key_id = await insert_key(raw, user_id)
        key_hash = await raw.fetchval("SELECT key_hash FROM api_keys WHERE id = $1", key_id)
        await raw.execute("UPDATE api_keys SET last_used_at = now() WHERE id = $1", key_id)
        await raw.execute("SELECT pg_notify('tokendb_api_keys', 'then')")
        assert await next_heard() == "then"  # the touch sent nothing before it
        await raw.execute("UPDATE api_keys SET is_active = false WHERE id = $1", key_id)
        assert await next_heard() == key_hash
        await raw.execute("UPDATE users SET role = 'admin' WHERE id = $1", user_id)
        assert await next_heard() == f"u:{user_id}"
        other = await insert_key(raw, user_id)
        other_hash = await raw.fetchval("SELECT key_hash FROM api_keys WHERE id = $1", other)
        await raw.execute("DELETE FROM api_keys WHERE id = $1", other)
        assert await next_heard() == other_hash
        await raw.execute("TRUNCATE api_keys CASCADE")
        assert await next_heard() == "*"
    finally:
        await listener.close()
        await raw.close()
