"""A host application's own Tortoise apps next to tokendb's: their tables and migrations.

A host app whose models have foreign keys to tokendb's (``ForeignKeyField("tokendb.User")``)
runs fine, but Aerich 0.10 cannot write its migrations by itself:

* ``aerich --app host init-db`` writes every model on the connection into the
  host's first migration: tokendb's five tables too, without their
  constraints and triggers (they belong to ``tokendb migrate``);
* ``aerich --app host migrate`` refuses a *new* model with a foreign key into
  another app ("Can't create schema due to cyclic fk references");
* tokendb's models on a connection of their own do not help: Tortoise's
  schema generator refuses the cross-connection foreign key the same way.

:func:`write_app_migration` (``tokendb app-migration APP``) writes the
migration Aerich cannot: ``CREATE TABLE`` for the app's models that its
migrations do not create yet, in foreign-key order, referring to tokendb's
tables (which ``tokendb migrate`` creates first), with the models' state
Aerich diffs against afterwards. Every other change (columns, indexes) is
``aerich --app host migrate`` as usual, and ``aerich --app host upgrade``
applies both. :func:`create_app_tables` creates an app's tables directly
(the pytest plugin, for apps without migrations).
"""

from __future__ import annotations

import asyncio
import pkgutil
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tortoise import Tortoise
from tortoise.context import TortoiseContext, _current_context

from tokendb import _tortoise
from tokendb.config import APP_LABEL, tortoise_config
from tokendb.errors import ConfigurationError

__all__ = ["aerich_settings", "app_tables_sql", "create_app_tables", "write_app_migration"]

_NO_DATABASE = "postgres://tokendb@127.0.0.1:1/unused"
"""Writing a migration needs Tortoise's models, not a database: nothing connects here."""


def aerich_settings(config_file: Path) -> tuple[dict[str, Any], Path]:
    """The ``TORTOISE_ORM`` apps and the migrations folder named by ``[tool.aerich]``.

    Read as Aerich reads them: ``tortoise_orm`` (``"module.NAME"``, imported
    with ``src_folder`` on ``sys.path``) and ``location``, relative to the
    file's folder. Raises :class:`ConfigurationError` when they are missing.
    """
    import importlib
    import sys
    import tomllib

    try:
        settings = tomllib.loads(config_file.read_text(encoding="utf-8"))["tool"]["aerich"]
        module_name, _, attribute = settings["tortoise_orm"].rpartition(".")
        location = config_file.parent / settings["location"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(
            f"{config_file} has no [tool.aerich] with tortoise_orm and location "
            "(`aerich init -t settings.TORTOISE_ORM` writes them)"
        ) from exc
    source = str((config_file.parent / settings.get("src_folder", ".")).resolve())
    if source not in sys.path:
        sys.path.insert(0, source)
    config = getattr(importlib.import_module(module_name), attribute)
    return dict(config["apps"]), location


def app_tables_sql(label: str, *, skip: frozenset[str] = frozenset()) -> tuple[str, str]:
    """``(upgrade, downgrade)`` SQL creating (dropping) the tables of app ``label``'s models.

    Models whose Aerich name (``"label.Model"``) is in ``skip`` are left out.
    Tables are created in foreign-key order; foreign keys to tables outside
    the app (tokendb's) are taken to exist. Needs an initialised Tortoise
    context holding the app. Raises :class:`ConfigurationError` for an
    unknown app or a cycle of foreign keys within it.
    """
    registry = Tortoise.apps
    if registry is None or label not in registry:
        raise ConfigurationError(f"no Tortoise app {label!r} is configured")
    models = list(registry[label].values())
    pending = {
        table: (sql, references)
        for model in models
        if f"{label}.{model.__name__}" not in skip
        for table, sql, references in [_tortoise.table_sql(model)]
    }
    ordered: list[tuple[str, str]] = []
    while pending:
        ready = [
            table
            for table, (_, references) in pending.items()
            if not (references - {table}) & set(pending)
        ]
        if not ready:
            raise ConfigurationError(
                f"the tables of app {label!r} refer to each other in a cycle: {sorted(pending)}"
            )
        for table in ready:
            ordered.append((table, pending.pop(table)[0]))
    upgrade = "\n".join(sql for _, sql in ordered)
    downgrade = "\n".join(f'DROP TABLE IF EXISTS "{table}";' for table, _ in reversed(ordered))
    return upgrade, downgrade


async def _in_context(config: dict[str, Any], action: Any) -> Any:
    """Run ``action()`` in a Tortoise context of its own (the caller's is left alone)."""

    async def isolated() -> Any:
        _current_context.set(None)
        with TortoiseContext() as context:
            await context.init(config=config)
            try:
                return await action(context)
            finally:
                await context.close_connections()

    return await asyncio.create_task(isolated())


async def create_app_tables(
    database_url: str, apps: Mapping[str, Mapping[str, Any]], label: str
) -> None:
    """Create the tables of app ``label`` (one of ``apps``) on a database tokendb migrated.

    For apps without migrations of their own (the pytest plugin's generated
    schema). Raises :class:`ConfigurationError` as :func:`app_tables_sql`.
    """

    async def create(context: Any) -> None:
        upgrade, _ = app_tables_sql(label)
        if upgrade:
            await context.connections.get("default").execute_script(upgrade)

    await _in_context(tortoise_config(database_url, apps=apps), create)


def _migrations(folder: Path) -> list[pkgutil.ModuleInfo]:
    versions = [m for m in pkgutil.iter_modules([str(folder)]) if m.name.split("_")[0].isdigit()]
    return sorted(versions, key=lambda m: int(m.name.split("_")[0]))


def _models_state(folder: Path) -> tuple[int, dict[str, Any]]:
    """The number of the app's last migration (-1 for none) and the models' state it records."""
    from aerich.utils import decompress_dict, import_py_module

    versions = _migrations(folder)
    if not versions:
        return -1, {}
    last = import_py_module(versions[-1])
    state = getattr(last, "MODELS_STATE", None)
    if not state:
        raise ConfigurationError(
            f"{versions[-1].name} has no MODELS_STATE; run `aerich fix-migrations` first"
        )
    return int(versions[-1].name.split("_")[0]), decompress_dict(state)


async def write_app_migration(
    apps: Mapping[str, Mapping[str, Any]],
    label: str,
    location: Path,
    *,
    name: str = "init",
) -> Path | None:
    """Write the Aerich migration creating app ``label``'s new tables; return its path.

    ``apps`` are the host's Tortoise apps (as in ``TORTOISE_ORM["apps"]``,
    tokendb's may be among them), ``location`` Aerich's migrations folder
    (the app's files go to ``location/label/``). A model is new when the
    app's last migration does not record it. The file records the models'
    state with the new models added (and nothing else changed), so a later
    ``aerich --app label migrate`` writes the other changes. Returns None
    when there is no new model. Nothing connects to a database.

    Raises :class:`ConfigurationError` for tokendb's own app, an unknown app,
    or a last migration without ``MODELS_STATE``.
    """
    from aerich.migrate import Migrate
    from aerich.utils import get_models_describe

    if label == APP_LABEL:
        raise ConfigurationError("tokendb's own migrations come with tokendb: `tokendb migrate`")
    host_apps = {key: value for key, value in apps.items() if key != APP_LABEL}
    if label not in host_apps:
        raise ConfigurationError(f"no app {label!r} in the config (apps: {sorted(host_apps)})")
    folder = location / label
    number, state = _models_state(folder)

    async def render(context: Any) -> str | None:
        described = get_models_describe(label)
        new = {model: described[model] for model in described if model not in state}
        if not new:
            return None
        upgrade, downgrade = app_tables_sql(label, skip=frozenset(state))
        return Migrate.build_migration_file_text(
            upgrade_sql=upgrade, downgrade_sql=downgrade, models_state={**state, **new}
        )

    content = await _in_context(tortoise_config(_NO_DATABASE, apps=host_apps), render)
    if content is None:
        return None
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    version = f"{number + 1}_{stamp}_{name}.py"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / version
    path.write_text(content, encoding="utf-8")
    return path
