"""tokendb's migrated schema: what :func:`tokendb.init` checks, and who may do what on it.

Two roles (README, "Guarantees"):

* **the owner** creates the schema: ``tokendb migrate`` (``aerich upgrade``)
  connects as the role that will own tokendb's tables. Only the owner may
  edit or delete ledger rows, delete API keys or TRUNCATE the tables.
* **the application role** is what the gateway connects with: it may run
  DML on the six tables and read Aerich's table, and is neither the owner
  nor a superuser. :func:`grant` (``tokendb grant ROLE``) gives it that.
  Whatever it sends, the database keeps the books.

:func:`check` is one catalog query that tells a migrated schema from one made
otherwise (``Tortoise.generate_schemas()``, a partial upgrade, a host
application's own migration of tokendb's models): Aerich's record of the
newest migration, and every named backstop of :data:`BACKSTOPS`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import asyncpg

from tokendb import _args, _db, _ledger_sql
from tokendb._translate import translated
from tokendb.config import APP_LABEL, resolve_database_async, tortoise_config
from tokendb.errors import ConfigurationError, ValidationError
from tokendb.models import ApiKey, ChatMessage, ChatSession, TokenHold, TokenTransaction, User

__all__ = [
    "AUDIT_FUNCTION",
    "AUDIT_TABLES",
    "BACKSTOPS",
    "CHECK_CONSTRAINTS",
    "READ_ONLY_TABLES",
    "TABLES",
    "check",
    "grant",
    "grant_sql",
    "head_migration",
    "migrations_location",
]

TABLES = tuple(
    model._meta.db_table
    for model in (User, ApiKey, TokenTransaction, ChatSession, ChatMessage, TokenHold)
)
"""tokendb's six tables."""

AUDIT_TABLES = (_ledger_sql.CHECKPOINTS, _ledger_sql.MARKS)
"""Where ``audit_ledger(since_checkpoint=True)`` keeps its checkpoints and each user's mark.
The application role may read them; only :data:`AUDIT_FUNCTION` (the owner's) writes them."""

AUDIT_FUNCTION = "tokendb_audit_since_checkpoint(uuid)"
"""The incremental audit, an owner's ``SECURITY DEFINER`` function: the application role
may run it (:func:`grant_sql`), and it moves a user's mark only past rows it found clean."""

READ_ONLY_TABLES = ("usage_daily",)
"""Tables the application role may read but not write: the database writes them
(``usage_daily``, the rollup of the ledger, by its owner's trigger)."""

CHECK_CONSTRAINTS = (
    "users_token_balance_nonnegative",
    "users_role_valid",
    "users_email_normalised",
    "users_email_shape",
    "users_email_printable",
    "users_held_tokens_nonnegative",
    "users_held_tokens_within_balance",
    "api_keys_permissions_array",
    "api_keys_token_limit_valid",
    "token_transactions_type_valid",
    "token_transactions_amount_nonzero",
    "token_transactions_amount_sign",
    "token_transactions_balance_after_nonnegative",
    "token_transactions_attribution",
    "chat_sessions_tokens_used_nonnegative",
    "chat_messages_tokens_nonnegative",
    "chat_messages_role_valid",
    "token_holds_amount_positive",
    "token_holds_status_valid",
    "token_holds_ttl",
    "token_holds_captured",
)
"""The CHECK constraints the migrations create: every one of the schema's
(``tests/test_schema.py`` checks them against the catalog)."""

BACKSTOPS = (
    *CHECK_CONSTRAINTS,
    # foreign keys of a rule (not just a reference)
    "token_holds_api_key_owner",
    # unique indexes
    "api_keys_id_user_key",
    "users_email_lower_key",
    "token_transactions_idempotency_key",
    "token_transactions_user_seq_key",
    "chat_messages_session_seq_key",
    "usage_daily_group_key",
    # triggers: the ledger
    "token_transactions_chain",
    "token_transactions_refund_within_charge",
    "token_transactions_append_only",
    "token_transactions_no_truncate",
    "token_transactions_books",
    "users_balance_follows_ledger",
    "users_balance_follows_ledger_on_insert",
    "users_no_truncate",
    "users_id_immutable",
    # triggers: the usage rollup
    "token_transactions_usage_rollup",
    "usage_daily_no_truncate",
    # triggers: API keys
    "api_keys_revocation_final",
    "api_keys_expiry_final",
    "api_keys_kept",
    "api_keys_no_truncate",
    "api_keys_id_immutable",
    # triggers: the verify cache's notifications (migration 6)
    "api_keys_notify",
    "api_keys_notify_update",
    "api_keys_notify_truncate",
    "users_notify_update",
    "users_notify_truncate",
    # triggers: chats
    "chat_sessions_key",
    "chat_sessions_immutable",
    "chat_sessions_kept",
    "chat_sessions_tokens_follow_messages",
    "chat_sessions_tokens_follow_messages_on_insert",
    "chat_sessions_no_truncate",
    "chat_messages_chain",
    "chat_messages_immutable",
    "chat_messages_kept",
    "chat_messages_billed",
    "chat_messages_no_truncate",
    # holds (migration 3)
    "token_holds_reference_key",
    "token_holds_captured_transaction_key",
    "token_holds_new",
    "token_holds_transition",
    "token_holds_kept",
    "token_holds_no_truncate",
    "token_holds_books",
    "users_held_tokens_follow_holds",
    "users_held_tokens_follow_holds_on_insert",
)
"""The named constraints, unique indexes and triggers the migrations create, which
:func:`check` requires (``tests/test_schema.py`` checks the list against the catalog)."""


def migrations_location() -> Path:
    """The folder holding tokendb's Aerich migrations (``<location>/tokendb/*.py``).

    An installed wheel carries them as ``tokendb/_migrations``; a source
    checkout (or an editable install) has them in ``migrations/`` beside the
    package.
    """
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / "_migrations", package_dir.parent / "migrations"):
        if (candidate / APP_LABEL).is_dir():
            return candidate
    raise ConfigurationError(
        f"tokendb's migrations are missing (looked in {package_dir / '_migrations'} "
        f"and {package_dir.parent / 'migrations'}); reinstall tokendb"
    )


@functools.cache
def head_migration() -> str:
    """The file name of tokendb's newest migration, as Aerich records it."""
    files = (migrations_location() / APP_LABEL).glob("[0-9]*_*.py")
    return max(files, key=lambda path: int(path.name.split("_", 1)[0])).name


# One statement: which backstops are missing, which triggers are disabled
# (the owner's switch, which leaves a trigger in the catalog), and whether
# Aerich's table records the newest migration. The table may not exist (a schema made
# without Aerich), and a statement naming a missing table fails before it
# runs: the lookup goes through ts_stat(), core PostgreSQL's one function
# that runs a query given as text (it counts the distinct words of a
# tsvector column: here one word per matching row), and only when the
# table is there and readable. (query_to_xml() would do too, but needs a
# server built with libxml, which the embedded server is not.)
_CHECK = f"""
WITH tables AS (
    SELECT oid FROM pg_class
    WHERE oid = ANY (ARRAY[{
    ", ".join(f"to_regclass('{table}')" for table in (*TABLES, *READ_ONLY_TABLES))
}])
), present AS (
    SELECT conname AS name FROM pg_constraint WHERE conrelid IN (SELECT oid FROM tables)
    UNION ALL
    SELECT tgname FROM pg_trigger WHERE tgrelid IN (SELECT oid FROM tables) AND NOT tgisinternal
    UNION ALL
    SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
    WHERE x.indrelid IN (SELECT oid FROM tables)
)
SELECT
    ARRAY(SELECT unnest($1::text[]) EXCEPT SELECT name FROM present ORDER BY 1) AS missing,
    ARRAY(
        SELECT DISTINCT coalesce(c.conname, t.tgname) FROM pg_trigger t
        LEFT JOIN pg_constraint c ON c.oid = t.tgconstraint
        WHERE t.tgrelid IN (SELECT oid FROM tables) AND t.tgenabled NOT IN ('O', 'A')
        ORDER BY 1
    ) AS disabled,
    CASE
        WHEN to_regclass('aerich') IS NULL THEN 'missing'
        WHEN NOT has_table_privilege(to_regclass('aerich'), 'SELECT') THEN 'unreadable'
        WHEN NOT EXISTS (SELECT FROM ts_stat(format(
                'SELECT ''recorded''::tsvector FROM %s WHERE app = %L AND version = %L',
                to_regclass('aerich'), $2::text, $3::text)))
            THEN 'behind'
        ELSE 'ok'
    END AS aerich
"""

_MIGRATE_HINT = "run `tokendb migrate` (as the role that owns tokendb's tables)"


async def check() -> None:
    """Check, in one catalog query, that the connected schema is tokendb's migrated schema.

    Raises :class:`ConfigurationError` naming ``tokendb migrate`` when Aerich
    has not recorded tokendb's newest migration or a backstop of
    :data:`BACKSTOPS` is missing, naming ``tokendb grant`` when the role
    cannot read Aerich's table, and naming the triggers when any trigger on
    tokendb's tables is disabled (``ALTER TABLE … DISABLE TRIGGER``, the
    owner's switch: a disabled foreign key's trigger too).
    """
    head = head_migration()
    rows = await _db.read(_CHECK, list(BACKSTOPS), APP_LABEL, head)
    missing: list[str] = rows[0]["missing"]
    disabled: list[str] = rows[0]["disabled"]
    aerich: str = rows[0]["aerich"]
    if aerich == "unreadable":
        raise ConfigurationError(
            "this role cannot read Aerich's table, where tokendb checks its schema version: "
            "grant the application role what it needs with `tokendb grant ROLE` "
            "(as the role that owns tokendb's tables)"
        )
    problems = []
    if aerich != "ok":
        problems.append(
            f"Aerich has not recorded tokendb's migration {head}"
            + (" (there is no aerich table)" if aerich == "missing" else "")
        )
    if missing:
        problems.append(f"{len(missing)} of its backstops are missing ({_shown(missing)})")
    if problems:
        raise ConfigurationError(
            "the database is not tokendb's migrated schema: " + "; ".join(problems) + "; "
            f"{_MIGRATE_HINT}. (A schema made by Tortoise.generate_schemas() or by another "
            "application's migrations has none of tokendb's constraints and triggers.)"
        )
    if disabled:
        raise ConfigurationError(
            f"{len(disabled)} of the triggers on tokendb's tables are disabled "
            f"({_shown(disabled)}): nothing keeps the books while they are; enable them "
            "(ALTER TABLE … ENABLE TRIGGER ALL, as the role that owns tokendb's tables)"
        )


def _shown(names: list[str]) -> str:
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return ", ".join(names[:5]) + more


def _identifier(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def grant_sql(role: str, *, schema: str = "public") -> list[str]:
    """The statements that let ``role`` run tokendb as the application role.

    USAGE on ``schema``; SELECT, INSERT, UPDATE and DELETE on the six tables
    (TRUNCATE is not needed, and the tables refuse it to everyone but their
    owner); SELECT on the incremental audit's checkpoints and marks
    (:data:`AUDIT_TABLES`) and EXECUTE on the audit that writes them
    (:data:`AUDIT_FUNCTION`: a role that could write a mark could move it
    past a broken row); SELECT on :data:`READ_ONLY_TABLES` (the usage rollup,
    which only the database writes) and on Aerich's table, which
    :func:`check` reads. Nothing else: the tables have no sequences, and the
    role needs no function of its own.
    Raises :class:`~tokendb.errors.ValidationError` for a name PostgreSQL
    would not keep as given (empty, over 63 bytes, a NUL).
    """
    name = _args.text(role, "role", max_length=63, strip=False)
    if len(name.encode()) > 63:
        raise ValidationError("role", "must be at most 63 bytes (PostgreSQL's limit on names)")
    grantee = _identifier(name)
    tables = ", ".join(_identifier(table) for table in TABLES)
    audit_tables = ", ".join(_identifier(table) for table in AUDIT_TABLES)
    return [
        f"GRANT USAGE ON SCHEMA {_identifier(schema)} TO {grantee}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON {tables} TO {grantee}",
        f"GRANT SELECT ON {audit_tables} TO {grantee}",
        f"GRANT EXECUTE ON FUNCTION {AUDIT_FUNCTION} TO {grantee}",
        f"GRANT SELECT ON {', '.join(map(_identifier, READ_ONLY_TABLES))} TO {grantee}",
        f'GRANT SELECT ON "aerich" TO {grantee}',
    ]


@translated
async def grant(*, role: str, database_url: str | None = None) -> list[str]:
    """Grant ``role`` what the application role needs (:func:`grant_sql`); return the statements.

    Connects to ``database_url`` (resolved as by :func:`tokendb.init`) on a
    connection of its own, as the role that owns tokendb's tables (or a
    superuser): run it where you run ``tokendb migrate``. The role must exist.
    Raises :class:`~tokendb.errors.ValidationError` (a bad name, no such
    role) and :class:`~tokendb.errors.DatabaseError` (not the owner).
    """
    database = await resolve_database_async(database_url)
    credentials = tortoise_config(database.url, variable=database.variable)["connections"][
        "default"
    ]["credentials"]
    conn = await asyncpg.connect(
        host=credentials.get("host"),
        port=credentials.get("port"),
        user=credentials.get("user"),
        password=credentials.get("password"),
        database=credentials.get("database"),
        ssl=credentials.get("ssl"),
    )
    try:
        schema: str = await conn.fetchval("SELECT current_schema()")
        statements = grant_sql(role, schema=schema)
        if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
            raise ValidationError(
                "role", f"there is no role {role!r}: create it first (CREATE ROLE … LOGIN)"
            )
        async with conn.transaction():
            for statement in statements:
                await conn.execute(statement)
    finally:
        await conn.close()
    return statements
