"""tokendb reaches into Tortoise's internals (tokendb._tortoise, tokendb._rows): only on the
minor version it was written against."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import tortoise

from tokendb import _tortoise

ROOT = Path(__file__).resolve().parent.parent


def minor(version: str) -> tuple[int, int]:
    major, minor_part = version.split(".")[:2]
    return int(major), int(re.match(r"\d+", minor_part).group())  # type: ignore[union-attr]


def test_the_installed_tortoise_is_the_minor_version_tokendb_was_written_against() -> None:
    tested = ".".join(map(str, _tortoise.TESTED_MINOR))
    assert minor(tortoise.__version__) == _tortoise.TESTED_MINOR, (
        f"tortoise-orm {tortoise.__version__} is installed, but tokendb uses Tortoise "
        f"internals (tokendb/_tortoise.py: the models' client, the pool, the pooled "
        f"transaction context; tokendb/_rows.py: model instances' private attributes) "
        f"checked against {tested}.x only. Re-check them (and their tests) against "
        f"{tortoise.__version__}, then move TESTED_MINOR and the pin in pyproject.toml."
    )


def test_the_dependency_pins_that_minor_version() -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in dependencies if d.startswith("tortoise-orm")]
    major, tested = _tortoise.TESTED_MINOR
    assert f">={major}.{tested}" in spec and f"<{major}.{tested + 1}" in spec, spec
