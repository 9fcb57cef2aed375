"""Configuration: turning a PostgreSQL URL into a Tortoise config.

This is one of the two places that read the environment (the other is the
CLI). Everything else takes the database URL as an argument.

``TORTOISE_ORM`` is what Aerich loads (``[tool.aerich] tortoise_orm =
"tokendb.config.TORTOISE_ORM"``). It is computed on first access, from
``DATABASE_URL`` (a ``.env`` file in the working directory is read first and
never overrides the real environment), so importing this module never fails
and a missing variable is reported as a :class:`~tokendb.errors.ConfigurationError`
naming it.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from dotenv import find_dotenv, load_dotenv

from tokendb.errors import ConfigurationError

__all__ = [
    "APP_LABEL",
    "DEFAULT_POOL_MAX_SIZE",
    "DEFAULT_POOL_MIN_SIZE",
    "TORTOISE_ORM",  # noqa: F822 - built on first access by the module's __getattr__
    "database_url_from_env",
    "mask_url",
    "tortoise_config",
]

APP_LABEL = "tokendb"
"""The Tortoise app the models live in; also the folder under ``migrations/``."""

MODEL_MODULES = ["tokendb.models", "aerich.models"]

DEFAULT_POOL_MIN_SIZE = 1
DEFAULT_POOL_MAX_SIZE = 20
"""Tortoise's own default is 5 connections, too few for a gateway: 64 concurrent
requests would queue behind five connections."""

_SCHEMES = {"postgres", "postgresql", "asyncpg"}
_URL_EXAMPLE = "postgres://user:password@127.0.0.1:5432/tokendb"


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for error messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


def _parse_pool_size(value: str, name: str, variable: str) -> int:
    try:
        size = int(value)
    except ValueError:
        raise ConfigurationError(
            f"{variable}: {name} must be a whole number, got {value!r}", variable=variable
        ) from None
    if size < 0 or ((name.endswith("max_size") or name == "maxsize") and size < 1):
        raise ConfigurationError(f"{variable}: {name} out of range: {size}", variable=variable)
    return size


def tortoise_config(
    database_url: str,
    *,
    min_size: int | None = None,
    max_size: int | None = None,
    connection_name: str = "default",
    variable: str = "DATABASE_URL",
) -> dict[str, Any]:
    """Build the Tortoise config dict for tokendb's models on ``database_url``.

    ``database_url`` is a ``postgres://`` (or ``postgresql://``) URL. Tortoise
    URL parameters pass through, so ``?minsize=16&maxsize=16`` sizes the pool;
    ``min_size``/``max_size`` given here win over the URL, and the defaults
    (:data:`DEFAULT_POOL_MIN_SIZE`, :data:`DEFAULT_POOL_MAX_SIZE`) apply when
    neither says. ``variable`` names the setting the URL came from, for errors.

    Raises :class:`ConfigurationError` (naming ``variable``) for a URL that is
    not a usable PostgreSQL URL.
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
    except ValueError as exc:
        problem = str(exc)
    if problem is not None:
        raise ConfigurationError(
            f"{variable} is not a usable PostgreSQL URL ({problem}): {mask_url(database_url)!r}; "
            f"expected something like {_URL_EXAMPLE}",
            variable=variable,
        )
    try:
        connection = expand_db_url(database_url)
    except (TortoiseConfigurationError, ValueError) as exc:
        raise ConfigurationError(
            f"{variable} is not a usable PostgreSQL URL ({exc}): {mask_url(database_url)!r}",
            variable=variable,
        ) from exc

    credentials: dict[str, Any] = connection["credentials"]
    for key, given, default in (
        ("minsize", min_size, DEFAULT_POOL_MIN_SIZE),
        ("maxsize", max_size, DEFAULT_POOL_MAX_SIZE),
    ):
        if given is not None:
            credentials[key] = given
        elif key in credentials:
            credentials[key] = _parse_pool_size(str(credentials[key]), key, variable)
        else:
            credentials[key] = default
    if credentials["minsize"] > credentials["maxsize"]:
        raise ConfigurationError(
            f"{variable}: pool minsize {credentials['minsize']} exceeds maxsize "
            f"{credentials['maxsize']}",
            variable=variable,
        )

    return {
        "connections": {connection_name: connection},
        "apps": {
            APP_LABEL: {
                "models": list(MODEL_MODULES),
                "default_connection": connection_name,
            }
        },
        "use_tz": True,
        "timezone": "UTC",
    }


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


def pool_sizes_from_env() -> tuple[int | None, int | None]:
    """``TOKENDB_POOL_MIN_SIZE`` and ``TOKENDB_POOL_MAX_SIZE``, each None when unset."""
    load_env_file()
    sizes: list[int | None] = []
    for variable in ("TOKENDB_POOL_MIN_SIZE", "TOKENDB_POOL_MAX_SIZE"):
        raw = os.environ.get(variable, "").strip()
        sizes.append(_parse_pool_size(raw, variable.lower(), variable) if raw else None)
    return sizes[0], sizes[1]


def resolve_database_url(database_url: str | None) -> str:
    """The URL to use: ``database_url`` when given, else ``DATABASE_URL``.

    Raises :class:`ConfigurationError` naming ``DATABASE_URL`` when neither is set.
    """
    if database_url is not None:
        return database_url
    url = database_url_from_env()
    if url is None:
        raise ConfigurationError(
            "DATABASE_URL is not set: export it or put it in .env, e.g. "
            f"DATABASE_URL={_URL_EXAMPLE}",
            variable="DATABASE_URL",
        )
    return url


def config_from_env(database_url: str | None = None) -> dict[str, Any]:
    """The Tortoise config for ``database_url`` or ``DATABASE_URL``, pool sized from the env."""
    explicit = database_url is not None
    url = resolve_database_url(database_url)
    min_size, max_size = pool_sizes_from_env()
    return tortoise_config(
        url,
        min_size=min_size,
        max_size=max_size,
        variable="database_url" if explicit else "DATABASE_URL",
    )


def __getattr__(name: str) -> Any:
    # PEP 562: TORTOISE_ORM is built when Aerich first reads it, so importing
    # tokendb.config has no side effects and never fails.
    if name == "TORTOISE_ORM":
        return config_from_env()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
