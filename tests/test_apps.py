"""tokendb.apps and ``tokendb app-migration``: a host app's own migrations next to tokendb's.

A throw-away host project (``garden``, whose models have foreign keys to
tokendb's) follows the recipe of docs/host-apps.md with the real commands, in child
processes (importing its models would add their relations to tokendb's
model classes in this process): ``tokendb app-migration``, ``tokendb
migrate``, ``aerich --app garden upgrade``, Aerich's drift check.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

import tokendb
from tokendb.apps import write_app_migration
from tokendb.testing import test_server_url as admin_server_url
from tokendb.testing import throwaway_database

PLOT = """
from tortoise import fields
from tortoise.models import Model


class Plot(Model):
    id = fields.IntField(primary_key=True)
    owner = fields.ForeignKeyField("tokendb.User", related_name="plots", on_delete="RESTRICT")
"""

HARVEST = """
from tortoise import fields
from tortoise.models import Model


class Harvest(Model):
    id = fields.IntField(primary_key=True)
    plot = fields.ForeignKeyField("garden.Plot", related_name="harvests")
    billed = fields.ForeignKeyField("tokendb.TokenTransaction", related_name="harvests")
"""

STEWARD = """
    steward = fields.ForeignKeyField(
        "tokendb.User", related_name="stewarded", null=True, on_delete="SET NULL"
    )
"""

SETTINGS = """
import tokendb

APPS = {"garden": {"models": %r}}
TORTOISE_ORM = tokendb.tortoise_orm(apps=APPS)
"""


def garden_models(project: Path, *modules: str) -> None:
    (project / "garden" / "settings.py").write_text(SETTINGS % [f"garden.{m}" for m in modules])


@pytest.fixture
def garden(tmp_path: Path) -> Iterator[Path]:
    package = tmp_path / "garden"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(PLOT)
    (package / "harvest.py").write_text(HARVEST)
    garden_models(tmp_path, "models")
    yield tmp_path


def run(
    project: Path, url: str, *command: str, answer: str = ""
) -> subprocess.CompletedProcess[str]:
    """``command`` in ``project`` with ``answer`` on stdin (nothing: no terminal to ask on)."""
    bin_dir = Path(sys.executable).parent
    return subprocess.run(
        [str(bin_dir / command[0]), *command[1:]],
        cwd=project,
        env={**os.environ, "DATABASE_URL": url, "COLUMNS": "200"},
        input=answer,
        capture_output=True,
        text=True,
        timeout=120,
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


async def test_the_readme_recipe_migrates_a_host_app_with_foreign_keys_to_tokendb(
    garden: Path, request: pytest.FixtureRequest
) -> None:
    async with throwaway_database(admin_server_url(request.config), prefix="tokendb_apps") as url:
        # Aerich's own setup: with tortoise-orm 1.x it writes [tool.tortoise], not [tool.aerich].
        ok(run(garden, url, "aerich", "init", "-t", "garden.settings.TORTOISE_ORM"))
        assert "[tool.tortoise]" in (garden / "pyproject.toml").read_text()
        written = ok(run(garden, url, "tokendb", "app-migration", "garden"))
        (first,) = (garden / "migrations" / "garden").glob("0_*_init.py")
        assert first.name in written
        text = first.read_text()
        assert 'CREATE TABLE "plot"' in text
        assert 'REFERENCES "users" ("id") ON DELETE RESTRICT' in text
        assert 'CREATE TABLE "users"' not in text and '"aerich"' not in text  # tokendb's own
        assert "nothing written" in ok(run(garden, url, "tokendb", "app-migration", "garden"))

        ok(run(garden, url, "tokendb", "migrate"))  # 1. tokendb's schema, always first
        assert "Success upgrading to 0_" in ok(
            run(garden, url, "aerich", "--app", "garden", "upgrade")
        )
        drift = ["aerich", "--app", "garden", "migrate", "--name", "drift"]
        assert "No changes detected" in ok(run(garden, url, *drift))
        assert first.name in ok(run(garden, url, "aerich", "history"))  # the host's app first

        # A new model with foreign keys to tokendb's tables: Aerich refuses to write it ...
        garden_models(garden, "models", "harvest")
        refused = run(garden, url, *drift)
        assert refused.returncode != 0 and "cyclic fk references" in refused.stderr
        # ... tokendb writes it, and Aerich diffs from there.
        ok(run(garden, url, "tokendb", "app-migration", "garden", "--name", "harvests"))
        (second,) = (garden / "migrations" / "garden").glob("1_*_harvests.py")
        text = second.read_text()
        assert 'CREATE TABLE "harvest"' in text and 'CREATE TABLE "plot"' not in text
        assert 'REFERENCES "token_transactions" ("id")' in text
        assert "Success upgrading to 1_" in ok(
            run(garden, url, "aerich", "--app", "garden", "upgrade")
        )
        assert "No changes detected" in ok(run(garden, url, *drift))

        # A foreign key to tokendb's User on an existing model: Aerich fails on it
        # (it looks tokendb.User up among the app's own models) ...
        models = garden / "garden" / "models.py"
        models.write_text(PLOT + STEWARD)
        failed = run(garden, url, *drift)
        assert failed.returncode != 0 and "KeyError: 'tokendb.User'" in failed.stderr
        # ... tokendb writes it, both ways, and Aerich finds nothing left to do.
        ok(run(garden, url, "tokendb", "app-migration", "garden", "--name", "steward"))
        assert "Success upgrading to 2_" in ok(
            run(garden, url, "aerich", "--app", "garden", "upgrade")
        )
        assert "No changes detected" in ok(run(garden, url, *drift))
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval(STEWARD_FK) == 1
            models.write_text(PLOT)  # and dropped again
            ok(run(garden, url, "tokendb", "app-migration", "garden", "--name", "no_steward"))
            assert "Success upgrading to 3_" in ok(
                run(garden, url, "aerich", "--app", "garden", "upgrade")
            )
            assert "No changes detected" in ok(run(garden, url, *drift))
            assert await conn.fetchval(STEWARD_FK) == 0
        finally:
            await conn.close()


STEWARD_FK = """
SELECT count(*) FROM pg_constraint
WHERE conrelid = 'plot'::regclass AND contype = 'f' AND confrelid = 'users'::regclass
  AND conkey = ARRAY[(SELECT attnum FROM pg_attribute
                      WHERE attrelid = 'plot'::regclass AND attname = 'steward_id')]
"""


async def test_tokendbs_own_app_and_unknown_apps_are_refused(tmp_path: Path) -> None:
    apps = {"garden": {"models": ["garden.models"]}}
    for label, message in [("tokendb", "tokendb migrate"), ("nursery", "no app 'nursery'")]:
        with pytest.raises(tokendb.ConfigurationError, match=message):
            await write_app_migration(apps, label, tmp_path)


def test_a_project_without_aerich_settings_is_a_one_line_error(tmp_path: Path) -> None:
    done = run(tmp_path, "postgres://unused@127.0.0.1:1/x", "tokendb", "app-migration", "garden")
    assert done.returncode == 1
    assert done.stderr.startswith("Error: pyproject.toml has no [tool.aerich] (or [tool.tortoise])")


@pytest.mark.parametrize(
    ("settings", "models", "message"),
    [
        (None, PLOT, "cannot load garden.settings.TORTOISE_ORM"),  # no such module
        ("TORTOISE_ORM = {'apps': }", PLOT, "SyntaxError"),
        ("TORTOISE_ORM = {}", PLOT, "KeyError"),
        (SETTINGS % ["garden.models"], PLOT.replace("tokendb.User", "tokendb.Owner"), "Owner"),
        (SETTINGS % ["garden.nothing"], PLOT, "garden.nothing"),
    ],
    ids=["no-settings-module", "syntax-error", "no-apps", "unknown-fk-target", "no-models-module"],
)
def test_a_broken_host_config_is_a_one_line_error(
    garden: Path, settings: str | None, models: str, message: str
) -> None:
    (garden / "pyproject.toml").write_text(
        '[tool.aerich]\ntortoise_orm = "garden.settings.TORTOISE_ORM"\nlocation = "./migrations"\n'
    )
    settings_file = garden / "garden" / "settings.py"
    if settings is None:
        settings_file.unlink()
    else:
        settings_file.write_text(settings)
    (garden / "garden" / "models.py").write_text(models)
    done = run(garden, "postgres://unused@127.0.0.1:1/x", "tokendb", "app-migration", "garden")
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("Error: ") and len(done.stderr.splitlines()) == 1, done.stderr
    assert message in done.stderr


def test_a_field_that_looks_renamed_is_asked_about_as_aerich_does(garden: Path) -> None:
    (garden / "pyproject.toml").write_text(
        '[tool.aerich]\ntortoise_orm = "garden.settings.TORTOISE_ORM"\nlocation = "./migrations"\n'
    )
    models = garden / "garden" / "models.py"
    models.write_text(PLOT + "    name = fields.CharField(max_length=50)\n")
    url = "postgres://unused@127.0.0.1:1/x"  # nothing connects
    ok(run(garden, url, "tokendb", "app-migration", "garden"))
    models.write_text(PLOT + "    title = fields.CharField(max_length=50)\n")
    # No terminal to answer Aerich's question: one line, nothing written (was a traceback).
    unanswered = run(garden, url, "tokendb", "app-migration", "garden", "--name", "title")
    assert unanswered.returncode == 1 and "Traceback" not in unanswered.stderr
    assert unanswered.stderr.startswith("Error: app 'garden': a field looks renamed")
    assert not list((garden / "migrations" / "garden").glob("1_*"))
    renamed = run(
        garden, url, "tokendb", "app-migration", "garden", "--name", "title", answer="y\n"
    )
    ok(renamed)
    (second,) = (garden / "migrations" / "garden").glob("1_*_title.py")
    assert 'RENAME COLUMN "name" TO "title"' in second.read_text()
