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
from tokendb.connection import migrations_location, run_aerich
from tokendb.testing import test_server_url as admin_server_url
from tokendb.testing import throwaway_database

MIGRATIONS = sorted(p.name for p in (migrations_location() / "tokendb").glob("*.py"))

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
        assert kinds == {"constraint", "index", "default", "trigger"}


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
                result: list[str] = await command.downgrade(version=1, delete=False)
                return result

            assert await run_aerich(url, downgrade) == [MIGRATIONS[-1]]
            between = await catalog(url)
            names = {name for _, name, _ in between}
            assert "users_token_balance_nonnegative" not in names
            assert "token_transactions_idempotency_key" not in names
            assert "users.token_balance" not in names  # the DB default is gone too
            # With the backstop gone, the database accepts what it refused before.
            await conn.execute(
                "UPDATE users SET token_balance = -1 WHERE email = 'kept@example.com'"
            )
            await conn.execute("UPDATE users SET token_balance = 0")

            assert await tokendb.migrate(url) == [MIGRATIONS[-1]]
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
