"""Aerich migrations: upgrade from empty, downgrade + upgrade round trip, drift gate."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import tokendb
from tests.helpers import migrations_copy
from tokendb.connection import _upgrade, migrations_location, run_aerich
from tokendb.testing import test_server_url as admin_server_url
from tokendb.testing import throwaway_database

MIGRATIONS = sorted(
    (p.name for p in (migrations_location() / "tokendb").glob("*.py")),
    key=lambda name: int(name.split("_", 1)[0]),  # in Aerich's order: 10_ after 9_
)
REPO = Path(__file__).parent.parent

CATALOG = """
SELECT 'constraint' AS kind, conname AS name, pg_get_constraintdef(oid) AS definition
FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'index', indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL
SELECT 'default', c.relname || '.' || a.attname, pg_get_expr(d.adbin, d.adrelid)
FROM pg_attrdef d
JOIN pg_class c ON c.oid = d.adrelid
JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
WHERE c.relnamespace = 'public'::regnamespace AND c.relname <> 'aerich'
UNION ALL
SELECT 'trigger', tgname, pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal
UNION ALL
SELECT 'function', p.oid::regprocedure::text, pg_get_functiondef(p.oid)
FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace
UNION ALL
SELECT 'column', table_name || '.' || column_name,
       data_type || CASE WHEN is_nullable = 'YES' THEN ' null' ELSE ' not null' END
FROM information_schema.columns WHERE table_schema = 'public' AND table_name <> 'aerich'
ORDER BY 1, 2
"""


async def catalog(url: str) -> list[tuple[str, str, str]]:
    conn = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await conn.fetch(CATALOG)]
    finally:
        await conn.close()


@pytest.fixture
def server_url(request: pytest.FixtureRequest) -> str:
    return admin_server_url(request.config)


async def test_upgrade_on_an_empty_database_applies_every_migration(server_url: str) -> None:
    async with throwaway_database(server_url, prefix="tokendb_mig") as url:
        assert await tokendb.migrate(url) == MIGRATIONS
        assert await tokendb.migrate(url) == []  # nothing left to apply
        kinds = {kind for kind, _, _ in await catalog(url)}
        assert kinds == {"column", "constraint", "index", "default", "trigger", "function"}


async def test_downgrade_and_upgrade_restore_the_schema_and_keep_rows(server_url: str) -> None:
    async with throwaway_database(server_url, prefix="tokendb_mig") as url:
        await tokendb.migrate(url)
        before = await catalog(url)
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                "INSERT INTO users (id, email, password_hash, name, role, token_balance, "
                "created_at, updated_at) VALUES (gen_random_uuid(), 'kept@example.com', 'h', "
                "'Kept', 'user', 0, now(), now())"
            )

            async def downgrade(command: Any) -> list[str]:
                # Everything above the generated init migration, newest first.
                result: list[str] = await command.downgrade(version=1, delete=False)
                return result

            assert await run_aerich(url, downgrade) == MIGRATIONS[:0:-1]
            between = await catalog(url)
            names = {(kind, name) for kind, name, _ in between}
            assert ("constraint", "users_token_balance_nonnegative") not in names
            assert ("index", "token_transactions_idempotency_key") not in names
            assert ("default", "users.token_balance") not in names  # the DB default is gone too
            assert ("column", "token_transactions.seq") not in names
            # With the backstop gone, the database accepts what it refused before.
            await conn.execute(
                "UPDATE users SET token_balance = -1 WHERE email = 'kept@example.com'"
            )
            await conn.execute("UPDATE users SET token_balance = 0")

            assert await tokendb.migrate(url) == MIGRATIONS[1:]
            assert await catalog(url) == before
            assert await conn.fetchval("SELECT count(*) FROM users") == 1
        finally:
            await conn.close()


async def test_models_and_migrations_agree(server_url: str, tmp_path: Path) -> None:
    """Drift gate: `aerich migrate` on the migrated database finds nothing to do."""
    repo = Path(__file__).parent.parent
    shutil.copytree(migrations_location(), tmp_path / "migrations")
    shutil.copy(repo / "pyproject.toml", tmp_path / "pyproject.toml")
    before = sorted((tmp_path / "migrations" / "tokendb").glob("*.py"))
    async with throwaway_database(server_url, prefix="tokendb_mig") as url:
        await tokendb.migrate(url)
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "aerich", "migrate", "--name", "drift_check"],
            cwd=tmp_path,
            env={**os.environ, "DATABASE_URL": url},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr
    assert "No changes detected" in result.stdout
    assert sorted((tmp_path / "migrations" / "tokendb").glob("*.py")) == before


async def test_concurrent_migrations_apply_each_file_once(server_url: str) -> None:
    async with throwaway_database(server_url, prefix="tokendb_mig") as url:
        results = await asyncio.gather(*(tokendb.migrate(url) for _ in range(4)))
        assert sorted(map(tuple, results)) == [(), (), (), tuple(MIGRATIONS)]
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM aerich") == len(MIGRATIONS)
        finally:
            await conn.close()


RACE_TRIES = int(os.environ.get("TOKENDB_MIGRATION_RACE_TRIES", "3"))
RACE_PROCESSES = 4


async def aerich_cli(url: str, *arguments: str) -> tuple[int, str]:
    """The real ``aerich`` command (``python -m aerich …``) on ``url``; (exit code, output)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aerich",
        *arguments,
        cwd=REPO,
        env={**os.environ, "DATABASE_URL": url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 180)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def recorded(url: str) -> list[tuple[str, int]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT version, count(*) AS n FROM aerich WHERE app = 'tokendb' "
            "GROUP BY version ORDER BY split_part(version, '_', 1)::int"
        )
        return [(row["version"], row["n"]) for row in rows]
    finally:
        await conn.close()


async def test_concurrent_aerich_upgrade_processes_apply_and_record_each_migration_once(
    server_url: str,
) -> None:
    """Several `aerich upgrade` CLI processes at once on a fresh database (issue 9, attack 11).

    Aerich asks whether a migration is recorded before it opens the
    migration's transaction, without a lock; each migration therefore takes
    a transaction lock and skips itself when it was applied meanwhile
    (tokendb._migration_guard). Without that, 2 runs in 11 recorded the init
    migration twice, after which `aerich downgrade` found nothing to undo.
    ``TOKENDB_MIGRATION_RACE_TRIES`` sets the number of fresh databases.
    """
    async with throwaway_database(server_url, prefix="tokendb_mig") as reference:
        await tokendb.migrate(reference)
        expected = await catalog(reference)
    for _ in range(RACE_TRIES):
        async with throwaway_database(server_url, prefix="tokendb_mig") as url:
            results = await asyncio.gather(
                *(aerich_cli(url, "upgrade") for _ in range(RACE_PROCESSES))
            )
            assert [code for code, _ in results] == [0] * RACE_PROCESSES, results
            assert await recorded(url) == [(name, 1) for name in MIGRATIONS]
            assert await catalog(url) == expected
            # Aerich's history is intact: the newest migration downgrades, and comes back.
            code, output = await aerich_cli(url, "downgrade", "--yes")
            assert code == 0, output
            assert await recorded(url) == [(name, 1) for name in MIGRATIONS[:-1]]
            assert await tokendb.migrate(url) == MIGRATIONS[-1:]
            assert await catalog(url) == expected


@pytest.mark.parametrize("number", range(1, len(MIGRATIONS)))
async def test_each_downgrade_restores_the_schema_before_its_upgrade(
    server_url: str, tmp_path: Path, number: int
) -> None:
    """Migration ``number``'s downgrade gives back exactly the schema of the
    migrations below it: columns, defaults, constraints, indexes, triggers and
    functions (their bodies and pinned settings included)."""
    async with throwaway_database(server_url, prefix="tokendb_mig") as url:
        await _upgrade(url, migrations_copy(tmp_path, upto=number - 1))
        expected = await catalog(url)
    async with throwaway_database(server_url, prefix="tokendb_mig") as url:
        await tokendb.migrate(url)

        async def downgrade(command: Any) -> list[str]:
            result: list[str] = await command.downgrade(version=number, delete=False)
            return result

        assert await run_aerich(url, downgrade) == MIGRATIONS[: number - 1 : -1]
        assert await catalog(url) == expected
