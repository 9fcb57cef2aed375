"""tokendb.testing, the pytest plugin, from the outside: tiny downstream suites run by pytester.

Each runs in a child process, as a separate project would: its own ini
file, the plugin loaded through the ``pytest11`` entry point.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from tokendb import embedded
from tokendb.testing import test_server_url as admin_server_url

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = session
asyncio_default_test_loop_scope = session
"""

DOWNSTREAM = """
import pathlib
import tokendb


async def test_factories_go_through_the_public_api(tokendb_clean, make_user, funded_user):
    pathlib.Path("used_url.txt").write_text(tokendb_clean)
    user = await make_user(email="Ada@Example.com")
    assert user.email == "ada@example.com" and user.token_balance == 100
    rich = await funded_user(balance=1234)
    poor = await funded_user(balance=7)
    assert [await tokendb.get_balance(user=u) for u in (rich, poor)] == [1234, 7]
    assert await tokendb.audit_ledger() == []


async def test_keys_and_a_clean_database(tokendb_clean, make_api_key):
    assert len(await tokendb.list_users()) == 0  # emptied before each test
    key, secret = await make_api_key(permissions=["chat"])
    assert (await tokendb.verify_api_key(secret=secret, permission="chat")).id == key.id


def test_unrelated_tests_need_no_database():
    assert True
"""


@pytest.fixture
def downstream(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    pytester.makeini(INI)
    pytester.makepyfile(test_downstream=DOWNSTREAM)
    for variable in ("DATABASE_URL", "TOKENDB_TEST_DATABASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    return pytester


async def database_exists(server_url: str, name: str) -> bool:
    conn = await asyncpg.connect(server_url.replace("asyncpg://", "postgres://", 1))
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


async def test_a_downstream_suite_gets_a_throwaway_database(
    downstream: pytest.Pytester, request: pytest.FixtureRequest
) -> None:
    server = admin_server_url(request.config)
    result = downstream.runpytest_subprocess("--tokendb-url", server, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    used = urlsplit((downstream.path / "used_url.txt").read_text())
    admin = urlsplit(server)
    assert (used.netloc, used.query) == (admin.netloc, admin.query)  # the same server
    assert used.path.startswith("/tokendb_test_")
    assert not await database_exists(server, used.path[1:])  # dropped at the end


def test_no_fixture_is_autouse(downstream: pytest.Pytester) -> None:
    # A server that cannot be reached: any fixture that touched it would fail.
    result = downstream.runpytest_subprocess(
        "--tokendb-url", "postgres://postgres@127.0.0.1:1/postgres", "-k", "unrelated"
    )
    result.assert_outcomes(passed=1, deselected=2)
    fixtures = downstream.runpytest_subprocess("--fixtures")
    fixtures.stdout.fnmatch_lines(["*tokendb_db*", "*make_user*", "*funded_user*"])


def test_without_pytest_asyncio_the_plugin_loads_and_fixtures_fail_clearly(
    downstream: pytest.Pytester,
) -> None:
    # Shadow pytest_asyncio with a module that cannot be imported.
    downstream.mkpydir("pytest_asyncio").joinpath("__init__.py").write_text(
        "raise ImportError('no pytest-asyncio here')\n"
    )
    downstream.makeini("[pytest]\n")
    result = downstream.runpytest_subprocess("-p", "no:asyncio", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(["*tokendb's fixture 'tokendb_db' needs pytest-asyncio >= 1.0*"])


@pytest.mark.skipif(not embedded.is_available(), reason="needs tokendb[embedded]")
def test_with_no_server_configured_the_suite_runs_on_the_embedded_server(
    downstream: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, embedded_data_dir: Path
) -> None:
    # As on a fresh machine: nothing configured, nothing on the default port.
    downstream.makeconftest(
        "import tokendb.testing\n"
        "tokendb.testing.DEFAULT_TEST_DATABASE_URL = 'postgres://postgres@127.0.0.1:1/postgres'\n"
    )
    monkeypatch.setenv("TOKENDB_DATA_DIR", str(embedded_data_dir))
    result = downstream.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    assert "host=" in (downstream.path / "used_url.txt").read_text()  # the Unix socket
    status = embedded.server_status(embedded_data_dir)
    assert status.initialised and not status.running  # stopped when pytest exited
