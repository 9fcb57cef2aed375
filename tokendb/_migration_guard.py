"""Each of tokendb's migrations applies and is recorded once, also under concurrent upgrades.

``aerich upgrade`` asks whether a migration is recorded *before* it opens the
migration's transaction, without a lock, so two upgrades started together
(several app workers, two deploy jobs) both find it missing and both run it:
the second fails halfway, or records it twice, after which ``aerich
downgrade`` no longer finds what to undo. Aerich then awaits the migration's
``upgrade(db)`` inside that transaction and records the file in its
``aerich`` table, in the same transaction. So each migration starts with
:func:`apply_once`, which

1. takes a transaction-scoped advisory lock, so upgrades of this database
   apply migrations one at a time (the lock is released at the migration's
   commit);
2. installs, once, a trigger on Aerich's table that drops an exact
   duplicate record (same app and version), as Aerich's own insert of the
   record would be when the file was applied meanwhile;
3. says whether the migration still has to be applied: when another upgrade
   recorded it while this one waited for the lock, the migration returns no
   SQL, and Aerich's record of it becomes a no-op.

:func:`tokendb.migrate` serialises whole upgrades with a session-level lock
on a key of its own (:data:`tokendb.connection._MIGRATION_LOCK`), held on
another connection of the same process: the key here must differ from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokendb.config import APP_LABEL

__all__ = ["ALREADY_APPLIED", "MIGRATION_STEP_LOCK", "apply_once", "current_schema"]

MIGRATION_STEP_LOCK = 0x746F6B656E6432
"""The advisory lock key one migration's transaction holds (not tokendb.migrate()'s)."""

ALREADY_APPLIED = "SELECT 'applied meanwhile by a concurrent upgrade'"
"""What a migration's ``upgrade`` returns when :func:`apply_once` says no (Aerich
cannot run an empty script)."""

# Aerich's table exactly as Aerich (and the init migration) creates it, so
# that the trigger can be installed before the first migration ran.
_RECORD_ONCE = """
CREATE TABLE IF NOT EXISTS "aerich" (
    "id" SERIAL NOT NULL PRIMARY KEY,
    "version" VARCHAR(255) NOT NULL,
    "app" VARCHAR(100) NOT NULL,
    "content" JSONB NOT NULL
);
CREATE OR REPLACE FUNCTION "tokendb_aerich_record_once"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM "aerich" WHERE "app" = NEW."app" AND "version" = NEW."version") THEN
        RETURN NULL;  -- recorded already, by an upgrade that ran concurrently
    END IF;
    RETURN NEW;
END
$$;
CREATE OR REPLACE TRIGGER "aerich_record_once"
    BEFORE INSERT ON "aerich"
    FOR EACH ROW EXECUTE FUNCTION "tokendb_aerich_record_once"();
"""


async def apply_once(db: Any, migration_file: str) -> bool:
    """Lock this database's migrations for ``db``'s transaction; False when
    ``migration_file`` (the migration's ``__file__``) is recorded already.

    ``db`` is the connection Aerich hands the migration's ``upgrade``: the
    migration's own transaction.
    """
    await db.execute_query("SELECT pg_advisory_xact_lock($1)", [MIGRATION_STEP_LOCK])
    await db.execute_script(_RECORD_ONCE)
    _, rows = await db.execute_query(
        'SELECT 1 FROM "aerich" WHERE "app" = $1 AND "version" = $2',
        [APP_LABEL, Path(migration_file).name],
    )
    return not rows


async def current_schema(db: Any) -> str:
    """The schema the migration runs in (where its tables are), quoted for SQL."""
    _, rows = await db.execute_query("SELECT quote_ident(current_schema()) AS name")
    name: str = rows[0]["name"]
    return name
