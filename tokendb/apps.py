"""A host application's own Tortoise apps next to tokendb's: their tables and migrations.

A host app whose models have foreign keys to tokendb's (``ForeignKeyField("tokendb.User")``)
runs fine, but Aerich 0.10 cannot write its migrations by itself:

* ``aerich --app host init-db`` writes every model on the connection into the
  host's first migration: tokendb's tables too, without their
  constraints and triggers (they belong to ``tokendb migrate``);
* ``aerich --app host migrate`` refuses a *new* model with a foreign key into
  another app ("Can't create schema due to cyclic fk references"), and
  fails on a foreign key into another app added to or dropped from an
  existing model (``KeyError: 'tokendb.User'``): it looks the referred
  model up among the app's own;
* tokendb's models on a connection of their own do not help: Tortoise's
  schema generator refuses the cross-connection foreign key the same way.

:func:`write_app_migration` (``tokendb app-migration APP``) is ``aerich
migrate`` told about the other apps' models: the same diff and file, where
those foreign keys refer to tokendb's tables (which ``tokendb migrate``
creates first), and a first migration with the app's own tables only.
``aerich --app host upgrade`` applies it. :func:`create_app_tables` creates
an app's tables directly (the pytest plugin, for apps without migrations).
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
from tortoise.exceptions import BaseORMException
from tortoise.models import Model

from tokendb import _tortoise
from tokendb.config import APP_LABEL, tortoise_config
from tokendb.errors import ConfigurationError, TokenDBError

__all__ = ["aerich_settings", "app_tables_sql", "create_app_tables", "write_app_migration"]

_NO_DATABASE = "postgres://tokendb@127.0.0.1:1/unused"
"""Writing a migration needs Tortoise's models, not a database: nothing connects here."""


def aerich_settings(config_file: Path) -> tuple[dict[str, Any], Path]:
    """The ``TORTOISE_ORM`` apps and the migrations folder named by Aerich's settings.

    Read as Aerich reads them: ``[tool.aerich]``, else ``[tool.tortoise]``
    (what ``aerich init`` writes with tortoise-orm 1.x); ``tortoise_orm``
    (``"module.NAME"``, imported with ``src_folder`` on ``sys.path``) and
    ``location``, relative to the file's folder. Raises
    :class:`ConfigurationError` when they are missing or the config does not
    import.
    """
    import importlib
    import sys
    import tomllib

    try:
        tool = tomllib.loads(config_file.read_text(encoding="utf-8"))["tool"]
        settings = tool.get("aerich") or tool["tortoise"]
        module_name, _, attribute = settings["tortoise_orm"].rpartition(".")
        location = config_file.parent / settings["location"]
    except (OSError, KeyError, TypeError, AttributeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(
            f"{config_file} has no [tool.aerich] (or [tool.tortoise]) with tortoise_orm and "
            "location (`aerich init -t settings.TORTOISE_ORM` writes them)"
        ) from exc
    source = str((config_file.parent / settings.get("src_folder", ".")).resolve())
    if source not in sys.path:
        sys.path.insert(0, source)
    try:
        config = getattr(importlib.import_module(module_name), attribute)
        apps = dict(config["apps"])
    except TokenDBError:
        raise
    except Exception as exc:  # the host's own module: whatever it raises, one clear error
        raise ConfigurationError(
            f"cannot load {settings['tortoise_orm']} (tortoise_orm in {config_file}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return apps, location


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


_AERICH_RUN_STATE = (
    "upgrade_operators",
    "downgrade_operators",
    "_upgrade_fk_m2m_index_operators",
    "_downgrade_fk_m2m_index_operators",
    "_upgrade_m2m",
    "_downgrade_m2m",
    "_rename_fields",
    "_rename_models",
)


def _diff_across_apps(label: str, folder: Path, state: dict[str, Any]) -> str | None:
    """Aerich's own diff of app ``label`` against ``state``, told about the other apps' models.

    The migration file's text, or None when nothing changed. Aerich diffs
    one app's models and looks up every model a relation refers to among
    them: a new table, or a new or dropped relational field, referring to
    another app's model (``tokendb.User``) fails there ("cyclic fk
    references", ``KeyError: 'tokendb.User'``). Here those models are known,
    and taken to exist (``tokendb migrate`` runs first). Everything else is
    Aerich's ``migrate`` as it is. Needs an initialised Tortoise context
    holding every app; connects to nothing.
    """
    from aerich.ddl.postgres import PostgresDDL
    from aerich.migrate import Migrate
    from aerich.utils import get_models_describe
    from asyncclick.exceptions import Abort  # what Aerich's questions raise

    registry = Tortoise.apps or {}
    foreign: dict[str, Any] = {
        name: describe
        for other in registry
        if other != label
        for name, describe in get_models_describe(other).items()
    }

    class CrossAppMigrate(Migrate):
        @classmethod
        def add_model(cls, model: type[Model]) -> str:
            # CREATE TABLE, not Aerich's CREATE TABLE IF NOT EXISTS: a name taken by
            # another app's table (tokendb's) fails the migration instead of adopting it.
            # (Aerich writes the many-to-many tables itself.)
            return _tortoise.table_sql(model, m2m=False)[1].rstrip().rstrip(";")

        @classmethod
        def _handle_add_models(
            cls,
            upgrade: bool,
            new_models: dict[str, dict[str, Any]],
            new_table_items: list[Any],
            other_table_items: list[Any] | None = None,
        ) -> None:
            # Another app's tables exist: a new table may refer to them.
            existing = [
                *(other_table_items or []),
                *((name, d, None) for name, d in foreign.items()),
            ]
            super()._handle_add_models(upgrade, new_models, new_table_items, existing)

        @classmethod
        def _handle_relational(
            cls,
            key: str,
            old_model_describe: dict[str, Any],
            new_model_describe: dict[str, Any],
            model: Any,
            old_models: dict[str, Any],
            new_models: dict[str, Any],
            upgrade: bool = True,
        ) -> None:
            super()._handle_relational(
                key,
                old_model_describe,
                new_model_describe,
                model,
                {**foreign, **old_models},
                {**foreign, **new_models},
                upgrade,
            )

        @classmethod
        def _handle_m2m_fields(
            cls,
            old_model_describe: dict[str, Any],
            new_model_describe: dict[str, Any],
            model: Any,
            new_models: dict[str, Any],
            upgrade: bool = True,
        ) -> None:
            super()._handle_m2m_fields(
                old_model_describe, new_model_describe, model, {**foreign, **new_models}, upgrade
            )

    # Aerich keeps a run's state in class attributes (lists, dicts): fresh ones for this run.
    for attribute in _AERICH_RUN_STATE:
        setattr(CrossAppMigrate, attribute, type(getattr(Migrate, attribute))())
    client = Tortoise.get_connection("default")
    CrossAppMigrate.app = label
    CrossAppMigrate.migrate_location = folder
    CrossAppMigrate.dialect = client.schema_generator.DIALECT
    CrossAppMigrate.ddl = PostgresDDL(client)
    CrossAppMigrate._last_version_content = state
    old, new = CrossAppMigrate._exclude_model_name_changes(state, get_models_describe(label))
    # As `aerich migrate` does: a field that looks renamed is asked about (on stdin).
    try:
        CrossAppMigrate.diff_models(dict(old), dict(new), no_input=False)
        CrossAppMigrate.diff_models(dict(new), dict(old), False, no_input=False)
    except Abort as exc:  # EOF (no terminal) or Ctrl-C at Aerich's question
        raise ConfigurationError(
            f"app {label!r}: a field looks renamed and the question whether it was got no "
            "answer (no terminal, or interrupted): nothing written; run it in a terminal"
        ) from exc
    CrossAppMigrate._merge_operators()
    if not CrossAppMigrate.upgrade_operators:
        return None
    text: str = CrossAppMigrate._get_diff_file_content()
    return text


async def write_app_migration(
    apps: Mapping[str, Mapping[str, Any]],
    label: str,
    location: Path,
    *,
    name: str = "init",
) -> Path | None:
    """Write app ``label``'s next Aerich migration, foreign keys to tokendb's models allowed.

    What ``aerich --app label migrate`` writes (new tables, columns, indexes,
    relations; the models' state Aerich diffs against next), where Aerich
    alone fails: a new table, or a new or dropped foreign key, referring to
    another app's model (tokendb's ``User``, taken to exist: ``tokendb
    migrate`` runs first). Its first migration holds the app's own tables
    only, where ``aerich init-db`` would copy tokendb's into it.

    ``apps`` are the host's Tortoise apps (as in ``TORTOISE_ORM["apps"]``,
    tokendb's may be among them), ``location`` Aerich's migrations folder
    (the app's files go to ``location/label/``). Returns None when nothing
    changed since the app's last migration. Nothing connects to a database.

    Raises :class:`ConfigurationError` for tokendb's own app, an unknown app,
    models Tortoise refuses (an unknown model in a relation …), or a last
    migration without ``MODELS_STATE``.
    """
    if label == APP_LABEL:
        raise ConfigurationError("tokendb's own migrations come with tokendb: `tokendb migrate`")
    host_apps = {key: value for key, value in apps.items() if key != APP_LABEL}
    if label not in host_apps:
        raise ConfigurationError(f"no app {label!r} in the config (apps: {sorted(host_apps)})")
    folder = location / label
    number, state = _models_state(folder)

    async def render(context: Any) -> str | None:
        return _diff_across_apps(label, folder, state)

    try:
        content = await _in_context(tortoise_config(_NO_DATABASE, apps=host_apps), render)
    except (BaseORMException, ImportError) as exc:  # the host's models, as Tortoise loads them
        raise ConfigurationError(
            f"the Tortoise apps do not load: {type(exc).__name__}: {exc}"
        ) from exc
    if content is None:
        return None
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    version = f"{number + 1}_{stamp}_{name}.py"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / version
    path.write_text(content, encoding="utf-8")
    return path
