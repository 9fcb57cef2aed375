"""README.md stays true: every command and code block in it is run here or by .ci/run.

So does the host-app recipe it links to (docs/host-apps.md).

Like sqlite-utils' documentation tests. Shell blocks run in bash against a
throw-away database (the README's example server URL and port are
substituted), the pytest-plugin blocks run as a downstream suite, the
FastAPI block is served over ASGI. The two quick-start commands are run
verbatim by ``.ci/run`` (command 1 in a venv of its own, on the embedded
server); this module checks that the script and the README agree.
"""

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
from tests.helpers import CHILD_PYTEST_ADDOPTS, asgi_client, free_port, load_module
from tokendb import embedded
from tokendb.testing import DEFAULT_TEST_DATABASE_URL, throwaway_database
from tokendb.testing import test_server_url as admin_server_url

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
HOST_APPS = (ROOT / "docs" / "host-apps.md").read_text()
EXAMPLE_SERVER = DEFAULT_TEST_DATABASE_URL  # the server the README's examples name


def section(title: str, text: str = README) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def blocks(title: str, language: str, text: str = README) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section(title, text), flags=re.DOTALL)


def test_the_readme_stays_short_and_links_the_host_app_recipe() -> None:
    """README is about using tokendb (issue 10: at most about 350 lines); detail lives in docs/."""
    lines = len(README.splitlines())
    assert lines <= 420, f"README.md has {lines} lines: move detail to docs/ and link it"
    assert "(docs/host-apps.md)" in section("Use tokendb in your application")


async def bash(script: str, cwd: Path = ROOT, **env: str) -> str:
    """Run ``script`` with ``set -euo pipefail``; return its stdout, fail on a non-zero exit."""
    # The venv's scripts (tokendb, uvicorn) first, also when it is not activated.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    environment = {**os.environ, "COLUMNS": "200", "PATH": path, **env}
    for name, value in env.items():
        if value == "":
            del environment[name]
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        "set -euo pipefail\n" + script,
        cwd=cwd,
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 300)
    report = f"{script}\n--- stdout\n{out.decode()}\n--- stderr\n{err.decode()}"
    assert process.returncode == 0, report
    return out.decode()


def test_ci_runs_the_two_quick_start_commands_verbatim() -> None:
    first, second = blocks("Quick start", "bash")[:2]
    ci = (ROOT / ".ci" / "run").read_text()
    assert f'QUICKSTART_1="{first.strip()}"' in ci
    assert 'bash -euo pipefail -c "$QUICKSTART_1"' in ci
    # Command 2 runs step by step (quietly), with PostgreSQL started in between.
    install, run = second.strip().split(" && ")
    lines = ci.splitlines()
    assert install.replace("pip install", "pip install --quiet") in lines
    assert run == "python -m pytest" and run in lines
    # The stress suites (issue 6) run after it, at a CI size, as "Run the tests" shows.
    (stress,) = blocks("Run the tests", "bash")
    assert lines[-1] == stress.strip() == "python -m pytest -m stress -s"
    assert first.strip().endswith("tokendb demo")


async def test_migrations_block(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The Aerich workflow as the README shows it, in a copy of the repository."""
    (block,) = blocks("Migrations (Aerich)", "bash")
    shutil.copytree(ROOT / "migrations", tmp_path / "migrations")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    async with throwaway_database(admin_server_url(request.config), prefix="tokendb_doc") as url:
        out = await bash(block, cwd=tmp_path, DATABASE_URL=url)
    assert "Success upgrading to 1_" in out
    assert "No changes detected" in out  # the models and the migrations agree


async def test_library_example(
    tokendb_clean: str, tokendb_app_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (example,) = [b for b in blocks("The library", "python") if "async def main(url" in b]
    assert len(example.strip().splitlines()) <= 25
    namespace: dict[str, Any] = {}
    exec(compile(example, "README.md", "exec"), namespace)
    # The example opens and closes its own connection (tokendb.connect on the
    # session's URL, as the application role); initialise the session's again afterwards.
    try:
        await namespace["main"](tokendb_app_url)
    finally:
        await tokendb.init(tokendb_app_url, min_size=1, max_size=20)
    assert capsys.readouterr().out.strip() == "1058"


async def test_own_server_block(tokendb_clean: str) -> None:
    (block,) = [b for b in blocks("Quick start", "bash") if "export DATABASE_URL" in b]
    out = await bash(block.replace(EXAMPLE_SERVER, tokendb_clean))
    assert "up to date" in out


async def test_command_line_block(tokendb_clean: str) -> None:
    block = blocks("Command line", "bash")[0]
    out = await bash(block, DATABASE_URL=tokendb_clean)
    assert "Secret (shown once" in out and "1060 tokens" in out and "The books balance" in out
    (key,) = await tokendb.list_api_keys(user=(await tokendb.get_user(email="ada@example.com")))
    assert not key.is_active  # revoked by the block


@pytest.mark.skipif(not embedded.is_available(), reason="needs tokendb[embedded]")
async def test_db_block_on_the_embedded_server(embedded_data_dir: Path) -> None:
    block = blocks("Command line", "bash")[1]
    script = block + '\ntest -n "$DATABASE_URL" && echo "url: $DATABASE_URL"\n'
    out = await bash(script, DATABASE_URL="", TOKENDB_DATA_DIR=str(embedded_data_dir))
    assert "url: postgresql://postgres@/tokendb?host=" in out
    assert "Stopped the embedded server." in out


def test_pytest_plugin_blocks_run_as_a_downstream_suite(
    pytester: pytest.Pytester, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokendb.testing import test_server_url as admin_server_url

    (ini,) = blocks("pytest plugin", "ini")
    (module,) = blocks("pytest plugin", "python")
    pytester.makeini(ini)
    pytester.makepyfile(test_readme=module)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("PYTEST_ADDOPTS", CHILD_PYTEST_ADDOPTS)
    result = pytester.runpytest_subprocess(
        "--tokendb-url", admin_server_url(request.config), "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=1)


async def test_fastapi_block_serves_a_balance(
    tokendb_clean: str, funded_user: Any, make_api_key: Any, tmp_path: Path
) -> None:
    (code,) = blocks("FastAPI / Starlette", "python")
    path = tmp_path / "readme_app.py"
    path.write_text(code)
    module = load_module("readme_app", path)
    user = await funded_user(balance=321)
    _, secret = await make_api_key(user=user, permissions=["chat"])
    async with asgi_client(module.app) as http:
        response = await http.get("/v1/balance", headers={"Authorization": f"Bearer {secret}"})
    assert response.json() == {"user_id": str(user.id), "balance": 321}


async def test_gateway_block(tokendb_clean: str) -> None:
    (block,) = [b for b in blocks("FastAPI / Starlette", "bash") if "uvicorn" in b]
    await tokendb.create_user(email="ada@example.com", password="correct horse battery", name="Ada")
    port = str(free_port())
    lines = block.replace("localhost:8000", f"localhost:{port}").replace("8000", port).splitlines()
    assert lines[0].startswith("uvicorn examples.gateway:app") and lines[0].endswith("&")
    ready = f"curl -sf localhost:{port}/docs >/dev/null"
    wait = f"for _ in $(seq 300); do {ready} && break; sleep 0.1; done"
    script = "\n".join(["trap 'kill %1' EXIT", lines[0], wait, *lines[1:]])
    out = await bash(script, DATABASE_URL=tokendb_clean)
    assert '"content":"You said: hello there"' in out
    assert '"balance":94' in out  # 100 - 2 (prompt) - 4 (reply)
    assert '"type":"usage"' in out


async def test_host_app_block_migrates_both_and_runs_the_apps_tests(
    request: pytest.FixtureRequest,
) -> None:
    """The host project from an empty database, by the recipe (CI runs it here)."""
    (block,) = blocks("The recipe", "bash", HOST_APPS)
    assert block.splitlines()[1:3] == ["tokendb migrate", "aerich --app hostapp upgrade"]
    async with throwaway_database(admin_server_url(request.config), prefix="tokendb_host") as url:
        out = await bash(block, DATABASE_URL=url, PYTEST_ADDOPTS=CHILD_PYTEST_ADDOPTS)
    assert "Success upgrading to 0_" in out
    assert " passed" in out and "failed" not in out


def test_host_app_config_block_puts_the_hosts_app_first(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (config, fixture) = blocks("The recipe", "python", HOST_APPS)
    example = ROOT / "examples" / "host_app" / "hostapp" / "settings.py"
    assert config in example.read_text()  # the recipe shows the example's settings
    settings = tmp_path / "recipe_settings.py"
    settings.write_text(config)
    # Importing APPS (as the app and its tests do) resolves no database: no
    # DATABASE_URL and no embedded server allowed, and no error.
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("TOKENDB_EMBEDDED", "off")
    monkeypatch.chdir(tmp_path)  # no .env
    module = load_module("recipe_settings", settings)
    assert module.APPS == {"hostapp": {"models": ["hostapp.models"]}}
    monkeypatch.setenv("DATABASE_URL", EXAMPLE_SERVER)
    assert list(module.TORTOISE_ORM["apps"]) == ["hostapp", "tokendb"]
    assert "def tokendb_apps():" in fixture
    conftest = (ROOT / "examples" / "host_app" / "tests" / "conftest.py").read_text()
    assert (
        '"hostapp": {"models": ["hostapp.models"], "migrations": HERE / "migrations"}' in conftest
    )
