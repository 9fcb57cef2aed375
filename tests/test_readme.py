"""The README's library example runs as written, on the test database."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

import tokendb
from tokendb.testing import test_server_url as admin_server_url
from tokendb.testing import throwaway_database

README = Path(__file__).parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


async def test_migrations_block(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The Aerich workflow as the README shows it, in a copy of the repository."""
    [block] = re.findall(r"```bash\n(aerich .*?)```", README.read_text(encoding="utf-8"), re.S)
    shutil.copytree(README.parent / "migrations", tmp_path / "migrations")
    shutil.copy(README.parent / "pyproject.toml", tmp_path / "pyproject.toml")
    async with throwaway_database(admin_server_url(request.config), prefix="tokendb_doc") as url:
        script = "set -euo pipefail\n" + block
        process = await asyncio.create_subprocess_exec(
            "bash", "-c", script,
            cwd=tmp_path,
            env={**os.environ, "DATABASE_URL": url,
                 "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), 180)
    text = output.decode()
    assert process.returncode == 0, text
    assert "Success upgrading to 1_" in text
    assert "No changes detected" in text  # the models and the migrations agree


async def test_library_example(tokendb_clean: str, capsys: pytest.CaptureFixture[str]) -> None:
    [example] = [block for block in python_blocks() if "async def main(url" in block]
    assert len(example.strip().splitlines()) <= 25
    namespace: dict[str, Any] = {}
    exec(compile(example, str(README), "exec"), namespace)
    # The example opens and closes its own connection; keep the session's alive by
    # running it through connect() on the same URL, then re-initialise.
    try:
        await namespace["main"](tokendb_clean)
    finally:
        await tokendb.init(tokendb_clean, min_size=1, max_size=20)
    assert capsys.readouterr().out.strip() == "1058"


def test_the_stress_command_is_what_ci_runs() -> None:
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Run the tests\n")
    section = text[start : text.index("\n## ", start + 1)]
    [command] = re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert command in ci
