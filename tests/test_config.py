"""Configuration: DATABASE_URL → Tortoise config, pool sizing, clear errors."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import re
import sys
from pathlib import Path

import asyncpg
import pytest

import tokendb
from tokendb import config
from tokendb.connection import InitOptions
from tokendb.errors import ConfigurationError


def test_builder_passes_url_parameters_through() -> None:
    built = config.tortoise_config("postgres://u:pw@db.internal:6543/app?minsize=16&maxsize=16")
    connection = built["connections"]["default"]
    assert connection["engine"] == "tortoise.backends.asyncpg"
    credentials = connection["credentials"]
    assert (credentials["host"], credentials["port"], credentials["database"]) == (
        "db.internal",
        6543,
        "app",
    )
    assert (credentials["user"], credentials["password"]) == ("u", "pw")
    assert (credentials["minsize"], credentials["maxsize"]) == (16, 16)
    assert built["apps"]["tokendb"]["models"] == ["tokendb.models", "aerich.models"]
    assert built["use_tz"] is True and built["timezone"] == "UTC"


def test_pool_is_sized_explicitly() -> None:
    credentials = config.tortoise_config("postgres://h/db")["connections"]["default"]["credentials"]
    assert credentials["maxsize"] == config.DEFAULT_POOL_MAX_SIZE > 5
    sized = config.tortoise_config("postgres://h/db?maxsize=8", min_size=2, max_size=30)
    assert sized["connections"]["default"]["credentials"]["maxsize"] == 30
    assert sized["connections"]["default"]["credentials"]["minsize"] == 2


def test_postgresql_scheme_and_socket_host_are_accepted() -> None:
    config.tortoise_config("postgresql://postgres@localhost/tokendb")
    built = config.tortoise_config("postgres://postgres@/tokendb?host=/tmp/pg")
    assert built["connections"]["default"]["credentials"]["host"] == "/tmp/pg"


@pytest.mark.parametrize(
    "url",
    [
        "",
        "   ",
        "not a url",
        "mysql://root@localhost/db",
        "postgres://localhost",
        "postgres://localhost:notaport/db",
        "postgres:///db",
        "postgres://h/db?minsize=9&maxsize=3",
        "postgres://h/db?maxsize=lots",
    ],
)
def test_malformed_urls_name_the_variable(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        config.tortoise_config(url)
    assert info.value.variable == "DATABASE_URL"
    assert "DATABASE_URL" in str(info.value)


def test_passwords_are_masked_in_errors() -> None:
    with pytest.raises(ConfigurationError) as info:
        config.tortoise_config("mysql://root:hunter2@localhost/db")
    assert "hunter2" not in str(info.value)
    assert config.mask_url("postgres://u:hunter2@h/db") == "postgres://u:***@h/db"


def test_missing_database_url_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("TOKENDB_EMBEDDED", "off")  # else the embedded server is the fallback
    monkeypatch.chdir(tmp_path)  # no .env here
    with pytest.raises(ConfigurationError) as info:
        config.resolve_database(None)
    assert info.value.variable == "DATABASE_URL"
    with pytest.raises(ConfigurationError):
        _ = config.TORTOISE_ORM


def test_env_file_is_read_without_overriding_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pytest.TempPathFactory
) -> None:
    from pathlib import Path

    directory = Path(str(tmp_path))
    (directory / ".env").write_text(
        "DATABASE_URL=postgres://from-file/db\nTOKENDB_POOL_MAX_SIZE=7\n"
    )
    monkeypatch.chdir(directory)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("TOKENDB_POOL_MAX_SIZE", raising=False)
    orm = importlib.reload(config).TORTOISE_ORM
    assert orm["connections"]["default"]["credentials"]["host"] == "from-file"
    assert orm["connections"]["default"]["credentials"]["maxsize"] == 7
    monkeypatch.setenv("DATABASE_URL", "postgres://from-env/db")
    orm = config.TORTOISE_ORM
    assert orm["connections"]["default"]["credentials"]["host"] == "from-env"


def test_an_explicit_url_reads_nothing_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pytest.TempPathFactory
) -> None:
    """Neither the pool variables nor .env: the URL given is the whole configuration."""
    from pathlib import Path

    directory = Path(str(tmp_path))
    (directory / ".env").write_text("TOKENDB_POOL_MIN_SIZE=3\nTOKENDB_FROM_DOTENV=1\n")
    monkeypatch.chdir(directory)
    monkeypatch.delenv("TOKENDB_POOL_MIN_SIZE", raising=False)
    monkeypatch.delenv("TOKENDB_FROM_DOTENV", raising=False)
    monkeypatch.setenv("TOKENDB_POOL_MAX_SIZE", "not a number")
    explicit = config.resolve_database("postgres://given/db")
    credentials = config.config_for(explicit)["connections"]["default"]["credentials"]
    assert (credentials["minsize"], credentials["maxsize"]) == (
        config.DEFAULT_POOL_MIN_SIZE,
        config.DEFAULT_POOL_MAX_SIZE,
    )
    assert "TOKENDB_FROM_DOTENV" not in os.environ  # .env was not even read
    monkeypatch.setenv("DATABASE_URL", "postgres://from-env/db")
    with pytest.raises(ConfigurationError) as info:  # from the environment: its pool sizes too
        config.config_for(config.resolve_database(None))
    assert info.value.variable == "TOKENDB_POOL_MAX_SIZE"


def test_aerich_reads_tortoise_orm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/anything")
    assert config.TORTOISE_ORM["apps"]["tokendb"]["default_connection"] == "default"


async def test_init_with_a_malformed_url_raises_before_connecting() -> None:
    with pytest.raises(ConfigurationError) as info:
        await tokendb.init("http://example.com/db")
    assert "database_url" in str(info.value)


async def test_unreachable_server_is_database_unavailable(tokendb_app_url: str) -> None:
    # Port 1 on loopback refuses connections. init() replaces the process-wide
    # configuration, so the session's is restored afterwards.
    try:
        with pytest.raises(tokendb.DatabaseUnavailable) as info:
            await tokendb.init("postgres://postgres@127.0.0.1:1/nowhere", acquire_timeout=5)
        assert info.value.outcome_unknown is False
        with pytest.raises(ConfigurationError):  # the failed init left nothing half-open
            await tokendb.get_balance(user="00000000-0000-0000-0000-000000000000")
    finally:
        await tokendb.init(tokendb_app_url, min_size=1, max_size=20)
    assert await tokendb.audit_ledger() == []


# Regression tests from the independent review.


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("postgres://app:s3cr/et@db.internal:5432/tokendb", "s3cr"),
        ("postgres://app:pa#ss@db.internal:5432/tokendb", "pa#ss"),
        ("postgres://app:pa?ss@db.internal:5432/tokendb", "pa?ss"),
    ],
)
async def test_a_malformed_url_error_never_shows_the_password(url: str, secret: str) -> None:
    """Unencoded '/', '#', '?' in a password: urlsplit finds no password there,
    so mask_url masks by text (everything between ``user:`` and the last ``@``)."""
    with pytest.raises(tokendb.ConfigurationError) as info:
        await tokendb.init(url)
    assert secret not in str(info.value)


@pytest.mark.parametrize(
    "sizes", [{"min_size": 5, "max_size": 2}, {"max_size": 0}, {"min_size": 30}]
)
async def test_init_with_bad_pool_sizes_is_a_configuration_error(
    tokendb_app_url: str, make_user, sizes: InitOptions
) -> None:
    """init() validates the sizes with the URL's before it touches Tortoise, so a
    bad size is a ConfigurationError and the working session is left as it was."""
    user = await make_user()
    try:
        with pytest.raises(tokendb.ConfigurationError):
            await tokendb.init(tokendb_app_url, **sizes)
        # Unusable afterwards is acceptable; a raw ValueError is not.
        with contextlib.suppress(tokendb.TokenDBError):
            await tokendb.get_balance(user=user)
    finally:
        await tokendb.init(tokendb_app_url, min_size=1, max_size=20)


async def test_a_schema_gone_after_init_is_a_configuration_error(
    request: pytest.FixtureRequest, tokendb_app_url: str
) -> None:
    """init() refuses an unmigrated database (tests/test_integrity.py, attack 10);
    a table that goes missing afterwards names `tokendb migrate` too."""
    from tests.pgcluster import isolated_tokendb
    from tokendb.testing import test_server_url as admin_url

    async with isolated_tokendb(admin_url(request.config), tokendb_app_url) as url:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("DROP TABLE chat_messages")
        finally:
            await conn.close()
        with pytest.raises(ConfigurationError, match="run `tokendb migrate`"):
            await tokendb.add_message(
                session="00000000-0000-0000-0000-000000000001", role="user", content="x", tokens=1
            )


def test_libpqs_sslmode_becomes_asyncpgs_ssl() -> None:
    """Hosted PostgreSQL URLs carry ?sslmode=require; asyncpg.connect() has no sslmode."""
    built = config.tortoise_config("postgres://u:pw@db.internal/app?sslmode=require")
    credentials = built["connections"]["default"]["credentials"]
    assert credentials["ssl"] == "require" and "sslmode" not in credentials


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgres://u:pw@h/db?sslmode=sometimes", "sslmode must be one of"),
        ("postgres://u:pw@h/db?statment_timeout=5", "unknown URL parameter(s) statment_timeout"),
        ("postgres://u:pw@h/db?dsn=x", "unknown URL parameter(s) dsn"),
    ],
)
def test_url_parameters_asyncpg_would_refuse_are_configuration_errors(
    url: str, message: str
) -> None:
    """Tortoise hands them to asyncpg, which raised TypeError on the first connection."""
    with pytest.raises(ConfigurationError, match=re.escape(message)) as info:
        config.tortoise_config(url)
    assert info.value.variable == "DATABASE_URL" and "pw" not in str(info.value)


async def test_a_url_with_sslmode_connects(tokendb_db: str) -> None:
    """The CLI on a URL with ?sslmode=disable (the local server has no TLS): it works,
    where asyncpg's TypeError used to escape as a traceback."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokendb",
        "--database-url",
        tokendb_db + ("&" if "?" in tokendb_db else "?") + "sslmode=disable",
        "audit",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, errors = await process.communicate()
    assert process.returncode == 0, errors.decode()
    assert json.loads(out)["books_balance"] is True
