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

SETTINGS = """
import tokendb

APPS = {"garden": {"models": %r}}
TORTOISE_ORM = tokendb.tortoise_orm(apps=APPS)
"""

PYPROJECT = """
[tool.aerich]
tortoise_orm = "garden.settings.TORTOISE_ORM"
location = "./migrations"
src_folder = "./."
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
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    garden_models(tmp_path, "models")
    yield tmp_path


def run(project: Path, url: str, *command: str) -> subprocess.CompletedProcess[str]:
    bin_dir = Path(sys.executable).parent
    return subprocess.run(
        [str(bin_dir / command[0]), *command[1:]],
        cwd=project,
        env={**os.environ, "DATABASE_URL": url, "COLUMNS": "200"},
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


async def test_tokendbs_own_app_and_unknown_apps_are_refused(tmp_path: Path) -> None:
    apps = {"garden": {"models": ["garden.models"]}}
    for label, message in [("tokendb", "tokendb migrate"), ("nursery", "no app 'nursery'")]:
        with pytest.raises(tokendb.ConfigurationError, match=message):
            await write_app_migration(apps, label, tmp_path)


def test_a_project_without_aerich_settings_is_a_one_line_error(tmp_path: Path) -> None:
    done = run(tmp_path, "postgres://unused@127.0.0.1:1/x", "tokendb", "app-migration", "garden")
    assert done.returncode == 1
    assert done.stderr.startswith("Error: pyproject.toml has no [tool.aerich]")
