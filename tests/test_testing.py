"""tokendb.testing, the pytest plugin, from the outside: tiny downstream suites run by pytester.

Each runs in a child process, as a separate project would: its own ini
file, the plugin loaded through the ``pytest11`` entry point.
"""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

import tokendb
from tests.helpers import CHILD_PYTEST_ADDOPTS
from tokendb import embedded
from tokendb.schema import AUDIT_TABLES
from tokendb.testing import TABLES, _split_apps
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
    # The plugin's cheap argon2 costs reach the tests (a context variable the
    # session fixture sets): production costs would make every user ~100 ms.
    assert "$m=1024,t=1,p=1$" in user.password_hash
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
    monkeypatch.setenv("PYTEST_ADDOPTS", CHILD_PYTEST_ADDOPTS)
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


# --- a host application's own models, on function-scoped loops, under xdist -----------------

SHOP_MODELS = """
from tortoise import fields
from tortoise.models import Model


class Project(Model):
    id = fields.IntField(primary_key=True)
    name = fields.CharField(max_length=100)
    owner = fields.ForeignKeyField("tokendb.User", related_name="projects", on_delete="RESTRICT")

    class Meta:
        table = "shop_projects"
"""

SHOP_CONFTEST = """
import pytest

@pytest.fixture(scope="session")
def tokendb_apps():
    return {"shop": {"models": ["shop.models"]%s}}
"""

SHOP_TESTS = """
import tokendb
from fastapi import FastAPI
from asgi_lifespan import LifespanManager
from tokendb.contrib.fastapi import lifespan
from shop.models import Project

APPS = {"shop": {"models": ["shop.models"]}}


async def test_the_apps_models_work_next_to_tokendbs(tokendb_clean, funded_user):
    user = await funded_user(balance=50)
    project = await Project.create(name="apollo", owner_id=user.id)
    assert (await Project.get(id=project.id).prefetch_related("owner")).owner.email == user.email
    await tokendb.charge(user=user, amount=20)
    assert await tokendb.get_balance(user=user) == 30


async def test_tokendb_clean_empties_the_apps_tables_too(tokendb_clean):
    assert await Project.all().count() == 0


async def test_the_hosts_lifespan_runs_under_the_plugin(tokendb_clean, make_user):
    app = FastAPI(lifespan=lifespan(apps=APPS))
    async with LifespanManager(app):
        user = await make_user()
        await Project.create(name="gemini", owner_id=user.id)
    assert await Project.filter(owner_id=user.id).count() == 1  # the plugin's pool is still open
"""


@pytest.fixture
def shop(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A downstream project with an app of its own whose model has a FK to tokendb.User."""
    pytester.makeini(INI)
    package = pytester.mkpydir("shop")
    package.joinpath("models.py").write_text(SHOP_MODELS)
    pytester.makepyfile(test_shop=SHOP_TESTS)
    for variable in ("DATABASE_URL", "TOKENDB_TEST_DATABASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("PYTEST_ADDOPTS", CHILD_PYTEST_ADDOPTS)
    return pytester


def test_an_apps_tables_are_generated_next_to_tokendbs(
    shop: pytest.Pytester, request: pytest.FixtureRequest
) -> None:
    shop.makeconftest(SHOP_CONFTEST % "")
    result = shop.runpytest_subprocess(
        "--tokendb-url", admin_server_url(request.config), "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=3)


def test_an_apps_tables_come_from_its_aerich_migrations(
    shop: pytest.Pytester, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In a child process: importing the app's models adds relations to tokendb's models.
    write = (
        "import asyncio, pathlib\n"
        "from tokendb.apps import write_app_migration\n"
        "apps = {'shop': {'models': ['shop.models']}}\n"
        "print(asyncio.run(write_app_migration(apps, 'shop', pathlib.Path('migrations'))))\n"
    )
    written = shop.run(sys.executable, "-c", write)
    assert written.ret == 0, written.errlines
    (migration,) = (shop.path / "migrations" / "shop").glob("0_*_init.py")
    assert 'CREATE TABLE "shop_projects"' in migration.read_text()
    shop.makeconftest(SHOP_CONFTEST % ', "migrations": "migrations"')
    # Started from another directory (an IDE, a monorepo): "migrations" is the
    # rootdir's, not the working directory's (where none were found, none applied).
    elsewhere = shop.mkdir("elsewhere")
    monkeypatch.chdir(elsewhere)
    options = ["--tokendb-url", admin_server_url(request.config), "-p", "no:cacheprovider"]
    result = shop.runpytest_subprocess(str(shop.path), "--rootdir", str(shop.path), *options)
    result.assert_outcomes(passed=3)

    # A model added without its migration: the fixture says so, not an UndefinedTableError.
    shop.path.joinpath("shop", "models.py").write_text(
        SHOP_MODELS + "\n\nclass Invoice(Model):\n    id = fields.IntField(primary_key=True)\n"
    )
    unmigrated = shop.runpytest_subprocess(str(shop.path), "--rootdir", str(shop.path), *options)
    unmigrated.assert_outcomes(passed=0, errors=3)
    assert (
        "the migrations of app 'shop' create no table ['invoice']: write the missing "
        "migration with `tokendb app-migration shop`"
    ) in unmigrated.stdout.str()


def test_an_apps_migrations_folder_without_its_migrations_is_refused(tmp_path: Path) -> None:
    apps = {"shop": {"models": ["shop.models"], "migrations": "migrations"}}
    with pytest.raises(tokendb.ConfigurationError, match="holds no shop/ migrations"):
        _split_apps(apps, tmp_path)
    (tmp_path / "migrations" / "shop").mkdir(parents=True)
    (tmp_path / "migrations" / "shop" / "0_20260101000000_init.py").write_text("")
    tortoise_apps, migrations = _split_apps(apps, tmp_path)
    assert tortoise_apps == {"shop": {"models": ["shop.models"]}}
    assert migrations == {"shop": tmp_path / "migrations"}


# pytest-asyncio's defaults: every test and fixture on a loop of its own.
FUNCTION_LOOPS_INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings =
    error::tortoise.warnings.TortoiseLoopSwitchWarning
    error::tokendb.ConfigurationWarning
"""

MANY_TESTS = """
import asyncio
import os
import pathlib

import asyncpg
import pytest
import tokendb


@pytest.mark.parametrize("n", range(int(os.environ.get("MANY_TESTS", "50"))))
async def test_each_test_on_its_own_loop(tokendb_clean, make_user, n):
    users = await asyncio.gather(*(make_user() for _ in range(4)))
    await asyncio.gather(*(tokendb.charge(user=u, amount=1) for u in users))
    conn = await asyncpg.connect(tokendb_clean)
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with pathlib.Path(f"backends-{worker}.txt").open("a") as out:
        out.write(f"{tokendb_clean} {count}\\n")
"""


def backend_counts(pytester: pytest.Pytester) -> dict[str, list[int]]:
    """Per worker: the database it used, and the backends on it after each test."""
    counts: dict[str, list[int]] = {}
    for path in pytester.path.glob("backends-*.txt"):
        for line in path.read_text().splitlines():
            url, count = line.split()
            counts.setdefault(url, []).append(int(count))
    return counts


def test_function_scoped_loops_leak_no_connections(
    downstream: pytest.Pytester, request: pytest.FixtureRequest
) -> None:
    downstream.makeini(FUNCTION_LOOPS_INI)
    downstream.makepyfile(test_many=MANY_TESTS)
    result = downstream.runpytest_subprocess(
        "--tokendb-url", admin_server_url(request.config), "-p", "no:cacheprovider", "-k", "many"
    )
    result.assert_outcomes(passed=50)
    ((_, counts),) = backend_counts(downstream).items()
    # One pool of at most 4 busy connections at a time, whatever the test's number:
    # before, each test's pool stayed open (21 backends grew to 88 over 8 tests).
    assert max(counts) <= 6, counts
    assert max(counts[-10:]) <= max(counts[:10]) + 1, counts


def test_pytest_xdist_workers_get_a_database_each(
    downstream: pytest.Pytester, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    downstream.makeini(FUNCTION_LOOPS_INI)
    downstream.makepyfile(test_many=MANY_TESTS)
    monkeypatch.setenv("MANY_TESTS", "20")
    result = downstream.runpytest_subprocess(
        "--tokendb-url",
        admin_server_url(request.config),
        "-p",
        "no:cacheprovider",
        "-k",
        "many",
        "-n",
        "2",
    )
    result.assert_outcomes(passed=20)
    counts = backend_counts(downstream)
    assert len(counts) == 2  # two workers, two databases
    assert all(max(per_worker) <= 6 for per_worker in counts.values()), counts


async def test_truncate_all_empties_every_table_of_tokendbs(raw: asyncpg.Connection) -> None:
    # TABLES follows tokendb.schema: a table a migration adds is emptied
    # between tests without a hand edit here (it was a list of its own).
    found = await raw.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema "
        "AND tablename <> 'aerich'"
    )
    assert {row["tablename"] for row in found} == {*TABLES, *AUDIT_TABLES}
