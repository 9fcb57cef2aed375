"""A throw-away PgBouncer in transaction pooling mode, in front of the test server.

``python -m tests.pgbouncer -- COMMAND…`` runs ``COMMAND`` with
``TOKENDB_TEST_DATABASE_URL`` pointing at a PgBouncer started for it (``.ci/run``
runs the core and concurrency tests that way); :func:`running` does the same
in-process (``tests/test_pgbouncer.py``).

Debian's ``pgbouncer`` refuses to run as root: as root it runs as the
``postgres`` user (``runuser``), with its config in a temporary folder that
user can read. Every database is forwarded (``* = host=… port=…``), clients
are trusted (the server's own authentication still applies), and the pools are
big enough for the suite's pools plus the tests' own connections.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tests.helpers import free_port

__all__ = ["binary", "running", "with_port"]

_START_TIMEOUT = 10.0


def binary() -> str | None:
    """The ``pgbouncer`` executable (``/usr/sbin`` is not on every PATH), or None."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")
    return found


def with_port(url: str, port: int, *, query: str = "") -> str:
    """``url`` on 127.0.0.1:``port`` (its user, password and database kept) with ``query``."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc, query=query))


@contextlib.contextmanager
def running(server_url: str, *, pool_size: int = 60) -> Iterator[int]:
    """A PgBouncer (transaction pooling) in front of ``server_url``'s server; yields its port.

    Raises RuntimeError when pgbouncer is not installed or does not start.
    """
    executable = binary()
    if executable is None:
        raise RuntimeError("pgbouncer is not installed (apt-get install pgbouncer)")
    parts = urlsplit(server_url)
    host, server_port = parts.hostname or "127.0.0.1", parts.port or 5432
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="tokendb-pgbouncer-"))
    as_root = os.geteuid() == 0
    try:
        (folder / "users.txt").write_text('"postgres" ""\n')
        (folder / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={host} port={server_port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {port}\n"
            f"unix_socket_dir = {folder}\n"
            "auth_type = trust\n"
            "auth_user = postgres\n"
            f"auth_file = {folder / 'users.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {pool_size}\n"
            "max_client_conn = 2000\n"
            "max_db_connections = 0\n"
            "server_reset_query =\n"
            f"logfile = {folder / 'pgbouncer.log'}\n"
            "admin_users = postgres\n"
        )
        command = [executable, "-q", str(folder / "pgbouncer.ini")]
        if as_root:
            shutil.chown(folder, "postgres")
            for child in folder.iterdir():
                shutil.chown(child, "postgres")
            command = ["runuser", "-u", "postgres", "--", *command]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_until_listening(process, port, folder / "pgbouncer.log")
            yield port
        finally:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _wait_until_listening(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stderr = process.stderr.read().decode() if process.stderr else ""
            logged = log.read_text() if log.exists() else ""
            raise RuntimeError(f"pgbouncer exited with {process.returncode}: {stderr}{logged}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"pgbouncer did not listen on 127.0.0.1:{port} within {_START_TIMEOUT}s")


def main(argv: list[str]) -> int:
    """``python -m tests.pgbouncer -- COMMAND…``: COMMAND through a PgBouncer of its own."""
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m tests.pgbouncer -- COMMAND...", file=sys.stderr)
        return 2
    server = os.environ.get(
        "TOKENDB_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"
    )
    with running(server) as port:
        env = dict(os.environ)
        env["TOKENDB_TEST_DIRECT_URL"] = server
        env["TOKENDB_TEST_DATABASE_URL"] = with_port(server, port, query="pgbouncer=true")
        print(
            f"PgBouncer (transaction pooling) on 127.0.0.1:{port} in front of {server}", flush=True
        )
        return subprocess.call(argv, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
