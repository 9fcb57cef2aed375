"""tokendb.connection's lifecycle: event loops, Tortoise contexts, hosts that register Tortoise.

Each scenario runs in a child process: Tortoise keeps one global context per
process, and this one's belongs to ``tokendb_db``. The child prints one JSON
line of facts; the test asserts on them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

import tokendb

PRELUDE = """
import asyncio, json, sys, warnings
import asyncpg
import tokendb
from tokendb import connection

URL = sys.argv[1]


def report(**facts):
    print(json.dumps(facts, default=str), flush=True)


def error(exc):
    return [type(exc).__module__ + "." + type(exc).__name__, str(exc)]


async def backends(name):
    conn = await asyncpg.connect(URL)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
            " AND pid <> pg_backend_pid()",
            name,
        )
    finally:
        await conn.close()
"""


def run_child(script: str, url: str, **env: str) -> dict[str, Any]:
    """Run ``PRELUDE + script`` with ``url`` as argv[1]; return its last JSON line."""
    environment = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    environment.update(env)
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(script), url],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    facts: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    facts["stderr"] = done.stderr
    return facts


def with_application_name(url: str, name: str) -> str:
    return url + ("&" if "?" in url else "?") + f"application_name={name}"


def test_a_call_in_a_new_loop_after_close_is_a_configuration_error_with_a_hint(
    tokendb_db: str,
) -> None:
    facts = run_child(
        """
        async def first():
            async with tokendb.connect(URL):
                await tokendb.list_users(limit=1)

        async def second():
            try:
                await tokendb.list_users(limit=1)
            except Exception as exc:
                return error(exc)

        before = connection.is_initialised()
        asyncio.run(first())
        report(before=before, after=connection.is_initialised(), error=asyncio.run(second()))
        """,
        tokendb_db,
    )
    assert facts["before"] is False and facts["after"] is False
    kind, message = facts["error"]
    assert kind == "tokendb.errors.ConfigurationError"
    assert "await tokendb.init()" in message and "event loop" in message


def test_a_call_in_a_new_loop_without_close_works_and_retires_the_old_pool(
    tokendb_db: str,
) -> None:
    """asyncio.run() after asyncio.run(): Tortoise reconnects; tokendb ends the old backends."""
    url = with_application_name(tokendb_db, "tokendb_loops")
    facts = run_child(
        """
        async def first():
            await tokendb.init(URL, min_size=3, max_size=3)
            await tokendb.list_users(limit=1)

        async def again():
            await asyncio.gather(*(tokendb.list_users(limit=1) for _ in range(6)))
            await asyncio.sleep(0.2)  # the server ends the shut-down backends
            return await backends("tokendb_loops")

        asyncio.run(first())
        counts = [asyncio.run(again()) for _ in range(3)]

        async def last():
            await tokendb.close()
            await asyncio.sleep(0.2)
            return await backends("tokendb_loops")

        report(counts=counts, after_close=asyncio.run(last()), inited=connection.is_initialised())
        """,
        url,
    )
    # One pool of 3 at a time: the pools of closed loops are not left to the GC.
    assert facts["counts"] == [3, 3, 3]
    assert facts["after_close"] == 0 and facts["inited"] is False


def test_a_task_that_cannot_see_tortoises_context_gets_a_configuration_error(
    tokendb_db: str,
) -> None:
    """As under Quart's register_tortoise: Tortoise initialised in a hook task of its own."""
    facts = run_child(
        """
        from tortoise import Tortoise

        async def hook():
            await Tortoise.init(config=tokendb.tortoise_orm(URL))

        async def main():
            await asyncio.create_task(hook())  # its context stays in that task
            try:
                await tokendb.get_balance(user="01900000-0000-7000-8000-000000000001")
            except Exception as exc:
                return error(exc)

        report(error=asyncio.run(main()), inited=connection.is_initialised())
        """,
        tokendb_db,
    )
    kind, message = facts["error"]
    assert kind == "tokendb.errors.ConfigurationError"
    assert "register_tortoise" in message and "tokendb.init(" in message
    assert facts["inited"] is False


@pytest.mark.parametrize("inits", [1, 2])
def test_migrate_without_a_url_migrates_the_initialised_database(
    tokendb_db: str, tmp_path: Any, inits: int
) -> None:
    # No DATABASE_URL and no embedded server allowed: only the initialised URL can be used.
    # Initialised twice (the second init closes the first's pool): still that URL.
    facts = run_child(
        f"""
        async def main():
            for _ in range({inits}):
                await tokendb.init(URL)
            try:
                return await tokendb.migrate()
            finally:
                await tokendb.close()

        report(applied=asyncio.run(main()))
        """,
        tokendb_db,
        TOKENDB_EMBEDDED="off",
        HOME=str(tmp_path),
    )
    assert facts["applied"] == []  # up to date: the session's migrated database
    assert not (tmp_path / ".tokendb").exists()


HOST_REGISTRATION = """
from tortoise import Tortoise
from tortoise.transactions import in_transaction

from tokendb import _db


async def main(config):
    # What a framework's register_tortoise does in its startup hook.
    await Tortoise.init(config=config, _enable_global_fallback=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = await _db.read("SHOW statement_timeout")
            async with in_transaction():  # the guard is in place once tokendb ran
                pass
        client = Tortoise.get_connection("default")
        return dict(
            statement_timeout=rows[0][0],
            guarded=type(client._in_transaction()).__name__,
            warnings=[str(w.message) for w in caught if w.category is tokendb.ConfigurationWarning],
        )
    finally:
        await Tortoise.close_connections()
"""


def test_a_host_registering_tokendbs_config_keeps_its_timeouts_and_guard(tokendb_db: str) -> None:
    facts = run_child(
        HOST_REGISTRATION + "report(**asyncio.run(main(tokendb.tortoise_orm(URL))))", tokendb_db
    )
    assert facts["statement_timeout"] == "30s"
    assert facts["guarded"] == "_GuardedTransactionContext"
    assert facts["warnings"] == []


def test_a_host_registering_a_plain_config_is_guarded_and_warned(tokendb_db: str) -> None:
    script = (
        HOST_REGISTRATION
        + "from tokendb.config import tortoise_config\n"
        + "report(**asyncio.run(main(tortoise_config(URL))))"
    )
    facts = run_child(script, tokendb_db)
    assert facts["statement_timeout"] == "0"  # the server's default: unbounded
    assert facts["guarded"] == "_GuardedTransactionContext"
    (warning,) = facts["warnings"]
    assert "timeouts" in warning and "tokendb.tortoise_orm(" in warning


def test_tortoise_app_is_tokendbs_entry_in_a_host_config() -> None:
    assert tokendb.tortoise_app() == {
        "models": ["tokendb.models", "aerich.models"],
        "default_connection": "default",
    }
    assert tokendb.tortoise_app(connection="main")["default_connection"] == "main"


def test_tortoise_orm_puts_the_hosts_apps_first_with_tokendbs_bounds() -> None:
    config = tokendb.tortoise_orm(
        "postgres://h/db", apps={"shop": {"models": ["shop.models"]}}, lock_timeout=2
    )
    assert list(config["apps"]) == ["shop", "tokendb"]  # a plain `aerich` picks the host's app
    assert config["apps"]["shop"] == {"models": ["shop.models"], "default_connection": "default"}
    assert config["apps"]["tokendb"] == tokendb.tortoise_app()
    credentials = config["connections"]["default"]["credentials"]
    assert credentials["server_settings"] == {
        "statement_timeout": "30000ms",
        "lock_timeout": "2000ms",
    }
    assert credentials["command_timeout"] == 35 and credentials["timeout"] == 10


@pytest.mark.parametrize(
    "apps, message",
    [
        ({"tokendb": {"models": ["x"]}}, "tokendb's own"),
        ({"shop": ["shop.models"]}, "list of model modules"),
        ({"shop": {"models": ["shop.models", "aerich.models"]}}, "aerich.models"),
    ],
)
def test_malformed_apps_are_configuration_errors(apps: Any, message: str) -> None:
    with pytest.raises(tokendb.ConfigurationError, match=message):
        tokendb.tortoise_orm("postgres://h/db", apps=apps)
