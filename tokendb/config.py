"""Configuration: turning a PostgreSQL URL into a Tortoise config.

This is one of the two places that read the environment (the other is the
CLI). Everything else takes the database URL as an argument.

``TORTOISE_ORM`` is what Aerich loads (``[tool.aerich] tortoise_orm =
"tokendb.config.TORTOISE_ORM"``). It is computed on first access, from
``DATABASE_URL`` (a ``.env`` file in the working directory is read first and
never overrides the real environment), or from the embedded server when
``DATABASE_URL`` is unset (:func:`resolve_database` is the one place that
rule lives). Importing this module never fails; a missing setting is
reported as a :class:`~tokendb.errors.ConfigurationError` naming it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from dotenv import find_dotenv, load_dotenv

from tokendb import _pool
from tokendb.errors import ConfigurationError

__all__ = [
    "APP_LABEL",
    "DEFAULT_POOL_MAX_SIZE",
    "DEFAULT_POOL_MIN_SIZE",
    "PGBOUNCER_PARAMETER",
    "ResolvedDatabase",
    "behind_pgbouncer",
    "config_for",
    "config_from_env",
    "data_dir_from_env",
    "database_url_from_env",
    "direct_url_from_env",
    "embedded_allowed_from_env",
    "listen_connect_args",
    "listen_url_from_env",
    "mask_url",
    "resolve_database",
    "resolve_database_async",
    "tortoise_app",
    "tortoise_config",
    "verify_cache_from_env",
]

APP_LABEL = "tokendb"
"""The Tortoise app the models live in; also the folder under ``migrations/``."""

MODEL_MODULES = ["tokendb.models", "aerich.models"]

DEFAULT_POOL_MIN_SIZE = 1
DEFAULT_POOL_MAX_SIZE = 20
"""Tortoise's own default is 5 connections, too few for a gateway: 64 concurrent
requests would queue behind five connections."""

PGBOUNCER_PARAMETER = "pgbouncer"
"""The URL parameter that says the URL goes through PgBouncer in transaction (or statement)
pooling mode: ``postgres://app@pgbouncer:6432/tokendb?pgbouncer=true``."""

_SCHEMES = {"postgres", "postgresql", "asyncpg"}
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_URL_EXAMPLE = "postgres://user:password@127.0.0.1:5432/tokendb"


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for error messages and logs.

    Works on text rather than on ``urlsplit``: a password with an unencoded
    ``/``, ``#`` or ``?`` does not parse as a password, and must be hidden all
    the same. Everything between ``user:`` and the last ``@`` is masked.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        return "<redacted>" if "@" in url else url
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def tortoise_app(*, connection: str = "default") -> dict[str, Any]:
    """tokendb's entry in a host application's ``TORTOISE_ORM["apps"]``, on ``connection``.

    ``{"models": ["tokendb.models", "aerich.models"], "default_connection": connection}``:
    it carries Aerich's model too (every app's migration history lives in
    Aerich's one table, created by ``tokendb migrate``), so the host's own app
    must not list ``aerich.models``. The app label must be ``tokendb``
    (:data:`APP_LABEL`): ``ForeignKeyField("tokendb.User")``. Raises nothing.
    """
    return {"models": list(MODEL_MODULES), "default_connection": connection}


def _with_apps(
    apps: Mapping[str, Mapping[str, Any]] | None, connection_name: str
) -> dict[str, Any]:
    """The ``apps`` section: the host's apps first (a plain ``aerich`` command picks the
    first app), then tokendb's."""
    merged: dict[str, Any] = {}
    for label, app in (apps or {}).items():
        if label == APP_LABEL:
            raise ConfigurationError(
                f"the app label {APP_LABEL!r} is tokendb's own; name your app otherwise"
            )
        if not isinstance(app, Mapping) or not isinstance(app.get("models"), (list, tuple)):
            raise ConfigurationError(
                f"app {label!r} must be a mapping with a list of model modules: "
                f'{{"{label}": {{"models": ["{label}.models"]}}}}'
            )
        if "aerich.models" in app["models"]:
            raise ConfigurationError(
                f"app {label!r} lists aerich.models, which tokendb's app already carries; "
                "remove it from your app"
            )
        merged[label] = {"default_connection": connection_name, **app}
    merged[APP_LABEL] = tortoise_app(connection=connection_name)
    return merged


def _pgbouncer_flag(value: object, variable: str) -> bool:
    if value is None:
        return False
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigurationError(
        f"{variable}: {PGBOUNCER_PARAMETER} must be true or false, got {value!r}",
        variable=variable,
    )


def behind_pgbouncer(url: str, *, variable: str = "DATABASE_URL") -> bool:
    """True when ``url`` says it goes through PgBouncer (``?pgbouncer=true``).

    Raises :class:`ConfigurationError` naming ``variable`` for a value that is
    neither true nor false.
    """
    try:
        values = parse_qs(urlsplit(url.strip()).query).get(PGBOUNCER_PARAMETER)
    except ValueError:
        return False  # not a URL at all: tortoise_config says so
    return _pgbouncer_flag(values[-1] if values else None, variable)


def _parse_pool_size(value: str, name: str, variable: str) -> int:
    try:
        size = int(value)
    except ValueError:
        raise ConfigurationError(
            f"{variable}: {name} must be a whole number, got {value!r}", variable=variable
        ) from None
    is_max = name.endswith("max_size") or name == "maxsize"
    if size < 0 or (is_max and size < 1) or size > 10_000:
        raise ConfigurationError(f"{variable}: {name} out of range: {size}", variable=variable)
    return size


def tortoise_config(
    database_url: str,
    *,
    min_size: int | None = None,
    max_size: int | None = None,
    connection_name: str = "default",
    variable: str = "DATABASE_URL",
    apps: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Build the Tortoise config dict for tokendb's models (and ``apps``) on ``database_url``.

    ``database_url`` is a ``postgres://`` (or ``postgresql://``) URL. Tortoise
    URL parameters pass through to asyncpg (libpq's ``sslmode`` as ``ssl``; an unknown
    one is a :class:`ConfigurationError`), so ``?minsize=16&maxsize=16`` sizes the pool;
    ``?pgbouncer=true`` (:data:`PGBOUNCER_PARAMETER`) says the URL goes through
    PgBouncer in transaction pooling mode: asyncpg's statement cache is turned
    off (``statement_cache_size=0``) and the parameter is not sent to the server.
    The pool's connections are :class:`tokendb._pool.Connection`: asyncpg's,
    skipping the reset query after tokendb's own statements.
    ``min_size``/``max_size`` given here win over the URL, and the defaults
    (:data:`DEFAULT_POOL_MIN_SIZE`, :data:`DEFAULT_POOL_MAX_SIZE`) apply when
    neither says. ``variable`` names the setting the URL came from, for errors.
    ``apps`` are the host application's own Tortoise apps, put before
    tokendb's on the same connection.

    Raises :class:`ConfigurationError` (naming ``variable``) for a URL that is
    not a usable PostgreSQL URL, and for malformed ``apps``.
    """
    from tortoise.backends.base.config_generator import expand_db_url
    from tortoise.exceptions import ConfigurationError as TortoiseConfigurationError

    if not isinstance(database_url, str) or not database_url.strip():
        raise ConfigurationError(
            f"{variable} is empty; set it to a PostgreSQL URL like {_URL_EXAMPLE}",
            variable=variable,
        )
    database_url = database_url.strip()
    problem: str | None = None
    try:
        parts = urlsplit(database_url)
        query = parse_qs(parts.query)
        if parts.scheme not in _SCHEMES:
            problem = "the scheme must be postgres:// or postgresql://"
        elif not (parts.hostname or query.get("host")):
            problem = "it names no host"
        elif not parts.path.strip("/"):
            problem = "it names no database"
        else:
            _ = parts.port  # raises ValueError for a non-numeric port
    except ValueError:
        # Not str(exc): it can quote part of the password back.
        problem = (
            "its host or port does not parse; percent-encode special characters "
            "(/ # ? @ :) in the user name and password"
        )
    if problem is not None:
        raise ConfigurationError(
            f"{variable} is not a usable PostgreSQL URL ({problem}): {mask_url(database_url)!r}; "
            f"expected something like {_URL_EXAMPLE}",
            variable=variable,
        )
    try:
        connection = expand_db_url(database_url)
    except (TortoiseConfigurationError, ValueError):
        raise ConfigurationError(
            f"{variable} is not a usable PostgreSQL URL: {mask_url(database_url)!r}",
            variable=variable,
        ) from None

    credentials: dict[str, Any] = connection["credentials"]
    if _pgbouncer_flag(credentials.pop(PGBOUNCER_PARAMETER, None), variable):
        # PgBouncer hands each transaction any server connection: a statement
        # prepared (named) on one is unknown on the next. asyncpg without a
        # statement cache sends the unnamed statement with each query instead.
        credentials["statement_cache_size"] = 0
    _asyncpg_parameters(credentials, variable)
    # No reset round trip when a connection goes back to the pool after
    # tokendb's own statements (tokendb._pool); the full reset after any other.
    credentials["connection_class"] = _pool.Connection
    for key, given, default in (
        ("minsize", min_size, DEFAULT_POOL_MIN_SIZE),
        ("maxsize", max_size, DEFAULT_POOL_MAX_SIZE),
    ):
        value = given if given is not None else credentials.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigurationError(
                f"{variable}: pool {key} must be a whole number, got {value!r}", variable=variable
            )
        credentials[key] = _parse_pool_size(str(value), key, variable)
    if credentials["minsize"] > credentials["maxsize"]:
        raise ConfigurationError(
            f"{variable}: pool minsize {credentials['minsize']} exceeds maxsize "
            f"{credentials['maxsize']}",
            variable=variable,
        )

    return {
        "connections": {connection_name: connection},
        "apps": _with_apps(apps, connection_name),
        "use_tz": True,
        "timezone": "UTC",
    }


_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_URL_PARAMETERS = frozenset(
    {"minsize", "maxsize", "schema", "application_name", "max_queries"}
    | {"max_inactive_connection_lifetime"}
)
"""URL parameters Tortoise's asyncpg client or asyncpg's pool take; besides those of
``asyncpg.connect`` (but for the ones a URL cannot carry: :data:`_NOT_IN_URLS`)."""
_NOT_IN_URLS = frozenset({"dsn", "loop", "connection_class", "record_class", "server_settings"})


def _asyncpg_parameters(credentials: dict[str, Any], variable: str) -> None:
    """Check the URL's parameters against what asyncpg takes, in place.

    libpq's ``sslmode`` (in most hosted PostgreSQL URLs) becomes asyncpg's
    ``ssl``, which takes the same modes. Tortoise hands every other parameter
    to ``asyncpg.create_pool``, where an unknown one is a ``TypeError`` on the
    first connection: raise :class:`ConfigurationError` naming it instead.
    """
    import inspect

    import asyncpg

    if "sslmode" in credentials:
        mode = credentials.pop("sslmode")
        if mode not in _SSL_MODES:
            raise ConfigurationError(
                f"{variable}: sslmode must be one of {', '.join(_SSL_MODES)}, got {mode!r}",
                variable=variable,
            )
        credentials.setdefault("ssl", mode)
    known = _URL_PARAMETERS | (set(inspect.signature(asyncpg.connect).parameters) - _NOT_IN_URLS)
    unknown = sorted(set(credentials) - known)
    if unknown:
        raise ConfigurationError(
            f"{variable}: unknown URL parameter(s) {', '.join(unknown)} (asyncpg's "
            "connection parameters, sslmode, minsize and maxsize are understood)",
            variable=variable,
        )


def load_env_file() -> None:
    """Read ``.env`` from the working directory (or a parent) without overriding the environment."""
    path = find_dotenv(usecwd=True)
    if path:
        load_dotenv(path, override=False)


def database_url_from_env() -> str | None:
    """``DATABASE_URL`` from the environment (after reading ``.env``), or None when unset."""
    load_env_file()
    url = os.environ.get("DATABASE_URL", "").strip()
    return url or None


def direct_url_from_env() -> str | None:
    """``TOKENDB_DIRECT_URL`` (the server itself, not PgBouncer: for migrations and the verify
    cache's listener when ``DATABASE_URL`` goes through PgBouncer), or None when unset."""
    load_env_file()
    url = os.environ.get("TOKENDB_DIRECT_URL", "").strip()
    return url or None


def listen_url_from_env() -> str | None:
    """``TOKENDB_LISTEN_URL`` (the verify cache's direct connection), or None when unset."""
    load_env_file()
    url = os.environ.get("TOKENDB_LISTEN_URL", "").strip()
    return url or None


def verify_cache_from_env() -> bool | None:
    """``TOKENDB_VERIFY_CACHE``: False for ``0``/``false``/``no``/``off``, True for
    ``1``/``true``/``yes``/``on``, None when unset.

    Raises :class:`ConfigurationError` for any other value.
    """
    load_env_file()
    raw = os.environ.get("TOKENDB_VERIFY_CACHE", "").strip().lower()
    if not raw:
        return None
    if raw in {"0", "false", "no", "off"}:
        return False
    if raw in {"1", "true", "yes", "on"}:
        return True
    raise ConfigurationError(
        f"TOKENDB_VERIFY_CACHE must be on or off, got {raw!r}", variable="TOKENDB_VERIFY_CACHE"
    )


def listen_connect_args(url: str, *, variable: str) -> dict[str, Any]:
    """:func:`asyncpg.connect`'s arguments for one connection to ``url`` (no pool settings).

    Raises :class:`ConfigurationError` naming ``variable`` for an unusable URL, or one that
    goes through PgBouncer (``LISTEN`` needs a session of its own).
    """
    import inspect

    import asyncpg

    if behind_pgbouncer(url, variable=variable):
        raise ConfigurationError(
            f"{variable} goes through PgBouncer ({PGBOUNCER_PARAMETER}=true), but the verify "
            "cache's listener needs a direct connection to PostgreSQL (LISTEN lasts a session)",
            variable=variable,
        )
    credentials = tortoise_config(url, variable=variable)["connections"]["default"]["credentials"]
    accepted = set(inspect.signature(asyncpg.connect).parameters) - _NOT_IN_URLS
    args = {name: value for name, value in credentials.items() if name in accepted}
    if credentials.get("schema"):
        args["server_settings"] = {"search_path": credentials["schema"]}
    return args


def pool_sizes_from_env() -> tuple[int | None, int | None]:
    """``TOKENDB_POOL_MIN_SIZE`` and ``TOKENDB_POOL_MAX_SIZE``, each None when unset."""
    load_env_file()
    sizes: list[int | None] = []
    for variable in ("TOKENDB_POOL_MIN_SIZE", "TOKENDB_POOL_MAX_SIZE"):
        raw = os.environ.get(variable, "").strip()
        sizes.append(_parse_pool_size(raw, variable.lower(), variable) if raw else None)
    return sizes[0], sizes[1]


@dataclass(frozen=True)
class ResolvedDatabase:
    """The database tokendb will use, and where its URL came from."""

    url: str
    variable: str
    """The setting the URL came from, for errors: ``database_url``, ``DATABASE_URL`` or
    ``TOKENDB_DATA_DIR`` (the embedded server)."""
    embedded: bool
    """True for tokendb's own embedded server (which tokendb migrates by itself)."""

    @property
    def pgbouncer(self) -> bool:
        """True when the URL goes through PgBouncer (``?pgbouncer=true``)."""
        return behind_pgbouncer(self.url, variable=self.variable)

    @property
    def explicit(self) -> bool:
        """True when the URL was passed as an argument: nothing else comes from the environment."""
        return self.variable == "database_url"


def data_dir_from_env() -> Path:
    """Where the embedded server keeps its cluster: ``TOKENDB_DATA_DIR``, else ``~/.tokendb``."""
    load_env_file()
    raw = os.environ.get("TOKENDB_DATA_DIR", "").strip()
    return Path(raw).expanduser() if raw else Path.home() / ".tokendb"


def embedded_allowed_from_env() -> bool:
    """False when ``TOKENDB_EMBEDDED`` is ``0``/``false``/``no``/``off``: no embedded server."""
    load_env_file()
    return os.environ.get("TOKENDB_EMBEDDED", "").strip().lower() not in {"0", "false", "no", "off"}


def _configured(database_url: str | None) -> ResolvedDatabase | None:
    if database_url is not None:
        return ResolvedDatabase(database_url, "database_url", embedded=False)
    url = database_url_from_env()
    if url is not None:
        return ResolvedDatabase(url, "DATABASE_URL", embedded=False)
    return None


def _check_embedded_allowed() -> None:
    if not embedded_allowed_from_env():
        raise ConfigurationError(
            "DATABASE_URL is not set (and TOKENDB_EMBEDDED=off forbids the embedded server): "
            f"export it or put it in .env, e.g. DATABASE_URL={_URL_EXAMPLE}",
            variable="DATABASE_URL",
        )


def resolve_database(database_url: str | None) -> ResolvedDatabase:
    """The database to use. This is tokendb's one resolution rule:

    1. ``database_url`` when given;
    2. else ``DATABASE_URL`` (from the environment or ``.env``);
    3. else the embedded server (:mod:`tokendb.embedded`, data dir
       ``TOKENDB_DATA_DIR`` or ``~/.tokendb``), started if need be, unless
       ``TOKENDB_EMBEDDED=off`` (for deployments that must never fall back).

    Starting the embedded server blocks; async code calls
    :func:`resolve_database_async`. Raises :class:`ConfigurationError`
    naming ``DATABASE_URL`` and the ``tokendb[embedded]`` extra when neither
    a URL nor the embedded wheel is there.
    """
    configured = _configured(database_url)
    if configured is not None:
        return configured
    from tokendb import embedded

    _check_embedded_allowed()
    return ResolvedDatabase(
        embedded.ensure_server(data_dir_from_env()), "TOKENDB_DATA_DIR", embedded=True
    )


async def resolve_database_async(database_url: str | None) -> ResolvedDatabase:
    """:func:`resolve_database` for async code: the embedded server starts off the event loop."""
    configured = _configured(database_url)
    if configured is not None:
        return configured
    from tokendb import embedded

    _check_embedded_allowed()
    url = await embedded.ensure_server_async(data_dir_from_env())
    return ResolvedDatabase(url, "TOKENDB_DATA_DIR", embedded=True)


def config_for(
    database: ResolvedDatabase,
    *,
    min_size: int | None = None,
    max_size: int | None = None,
    apps: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The Tortoise config for ``database``.

    Pool size: ``min_size``/``max_size`` when given, else
    ``TOKENDB_POOL_MIN_SIZE``/``TOKENDB_POOL_MAX_SIZE`` (only when the URL
    came from the environment or the embedded server: an explicit URL means
    nothing is read from the environment, ``.env`` included), else the URL's
    ``minsize``/``maxsize``, else the defaults; all validated together.

    Raises :class:`ConfigurationError` naming the setting at fault.
    """
    env_min, env_max = (None, None) if database.explicit else pool_sizes_from_env()
    return tortoise_config(
        database.url,
        min_size=min_size if min_size is not None else env_min,
        max_size=max_size if max_size is not None else env_max,
        variable=database.variable,
        apps=apps,
    )


def config_from_env(database_url: str | None = None) -> dict[str, Any]:
    """The Tortoise config for :func:`resolve_database`, pool sized from the env."""
    return config_for(resolve_database(database_url))


def __getattr__(name: str) -> Any:
    # PEP 562: TORTOISE_ORM is built when Aerich first reads it, so importing
    # tokendb.config has no side effects and never fails.
    if name == "TORTOISE_ORM":
        return config_from_env()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
