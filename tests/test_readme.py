"""The README's library example runs as written, on the test database."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import tokendb

README = Path(__file__).parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_test_command_is_what_ci_runs() -> None:
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    readme = README.read_text(encoding="utf-8")
    command = "python -m pytest"
    assert f"```bash\n{command}\n```" in readme
    assert [line for line in ci.splitlines() if line.startswith("python -m pytest")] == [command]


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
