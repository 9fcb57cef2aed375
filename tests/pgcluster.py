"""Fault-injection helpers: a throw-away PostgreSQL cluster, an isolated tokendb, a backend killer.

The shared server on 5432 is never stopped or restarted: a restart test runs
its own cluster (``initdb`` into a temporary folder, on a free port) through
:class:`ThrowawayCluster`. Backends are only ever terminated in a database the
test created itself (:func:`kill_backends` filters on ``datname``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg

import tokendb
from tests.helpers import free_port
from tokendb.connection import InitOptions
from tokendb.testing import throwaway_database

SESSION_POOL: InitOptions = {
    "min_size": 1,
    "max_size": 20,
}  # what tokendb.testing's tokendb_db opens
COMMAND_TIMEOUT = 60  # seconds for pg_ctl and initdb


@contextlib.asynccontextmanager
async def isolated_tokendb(
    server_url: str, session_url: str, *, migrated: bool = True, **init_options: Any
) -> AsyncIterator[str]:
    """tokendb initialised on a fresh (migrated) database of its own; yields its URL.

    Afterwards tokendb is initialised on ``session_url`` again, as
    ``tokendb.testing`` left it, and the database is dropped.
    """
    async with throwaway_database(server_url, prefix="tokendb_faults") as url:
        if migrated:
            await tokendb.migrate(url)
        await tokendb.init(url, **init_options)
        try:
            yield url
        finally:
            await tokendb.init(session_url, **SESSION_POOL)


async def kill_backends(admin: asyncpg.Connection, database: str, share: float = 1.0) -> int:
    """``pg_terminate_backend`` a random ``share`` of ``database``'s backends; return how many."""
    killed: int = await admin.fetchval(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = $1 AND pid <> pg_backend_pid() AND random() < $2) AS killed",
        database,
        share,
    )
    return killed


def database_name(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?", 1)[0]


def _postgres_bin() -> Path | None:
    pg_config = shutil.which("pg_config")
    candidates: list[Path] = []
    if pg_config:
        bindir = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        candidates.append(Path(bindir.stdout.strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    return None


class ThrowawayCluster:
    """A PostgreSQL cluster of the test's own, in a temporary folder, on a free port.

    PostgreSQL refuses to run as root, so as root the server runs as the
    ``postgres`` system user (``runuser``), which owns the folder.
    """

    def __init__(self) -> None:
        bindir = _postgres_bin()
        if bindir is None:
            raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found")
        self.bindir = bindir
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="tokendb-cluster-"))
        self.data = self.folder / "data"
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def _command(self, *argv: str) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *argv]
        return list(argv)

    async def _run(self, *argv: str) -> None:
        process = await asyncio.create_subprocess_exec(
            *self._command(*argv),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT)
        if process.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({process.returncode}): {output.decode()}")

    async def create(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        await self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        await self.start()

    async def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} "
            "-c fsync=off -c max_connections=60"
        )
        await self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.folder / "server.log"),
            "-w",
            "-t",
            "30",
            "start",
        )

    async def stop(self, mode: str = "fast") -> None:
        """``fast`` rolls back sessions and checkpoints; ``immediate`` is a crash (WAL recovery)."""
        await self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-m",
            mode,
            "-w",
            "-t",
            "30",
            "stop",
        )

    async def destroy(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError):
            await self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.asynccontextmanager
async def throwaway_cluster() -> AsyncIterator[ThrowawayCluster]:
    cluster = ThrowawayCluster()
    try:
        await cluster.create()
        yield cluster
    finally:
        await cluster.destroy()
