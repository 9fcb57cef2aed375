"""Load and fault injection: nothing lost, nothing half-written (``-m stress``).

Each test runs the randomized workload of ``tests/workload.py`` on a database
of its own with a pool of ``TOKENDB_STRESS_POOL`` connections, then compares
the database with the workload's model of what tokendb accepted. Sizes are set
by ``TOKENDB_STRESS_*`` variables; the defaults fit CI. Run a long soak with
e.g. ``TOKENDB_STRESS_OPS=200000 python -m pytest -m stress -s``.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

import tokendb
from tests.pgcluster import database_name, isolated_tokendb, kill_backends, throwaway_cluster
from tests.workload import Sizes, Workload
from tokendb.connection import InitOptions
from tokendb.testing import test_server_url as server_url

pytestmark = pytest.mark.stress

SIZES = Sizes.from_env()
RUN_TIMEOUT = 900.0  # seconds: a run that takes longer is a hang


def report(title: str, workload: Workload, started: float, **figures: Any) -> None:
    """The figures of a run (shown with ``-s``; ``.ci/run`` shows them)."""
    outcomes = workload.model.outcomes
    print(f"\n[{title}] seed={SIZES.seed} {time.monotonic() - started:.1f} s")
    for name, value in {**figures, **dict(sorted(outcomes.items()))}.items():
        print(f"  {name}: {value}")


async def settle(workload: Workload, url: str) -> list[str]:
    """Resolve unknown outcomes, then every discrepancy between database and model."""
    conn = await asyncpg.connect(url)
    try:
        await workload.resolve_unknown(conn)
        return await workload.discrepancies(conn)
    finally:
        await conn.close()


async def recovered(workload: Workload, calls: int) -> list[str]:
    """After the faults: ``calls`` concurrent operations must all succeed on the same pool."""
    accounts = list(workload.model.accounts.values())

    async def probe(index: int) -> str | None:
        account = accounts[index % len(accounts)]
        try:
            await asyncio.wait_for(tokendb.get_balance(user=account.user_id), 30)
            moved = await asyncio.wait_for(
                tokendb.grant_bonus(user=account.user_id, amount=1, description="recovery"), 30
            )
        except Exception as exc:  # what the pool must no longer raise
            return f"after the faults: {exc!r}"
        account.rows[moved.id] = moved.amount
        return None

    return [problem for problem in await asyncio.gather(*map(probe, range(calls))) if problem]


@pytest_asyncio.fixture(loop_scope="session")
async def stress_db(request: pytest.FixtureRequest, tokendb_app_url: str) -> AsyncIterator[str]:
    """A database of the test's own, tokendb on a pool of ``SIZES.pool`` connections."""
    pool: InitOptions = {"min_size": SIZES.pool, "max_size": SIZES.pool}
    async with isolated_tokendb(server_url(request.config), tokendb_app_url, **pool) as url:
        yield url


@pytest.mark.parametrize("users", [SIZES.users, 2], ids=["spread", "hot-users"])
async def test_concurrent_load_keeps_the_books(stress_db: str, users: int) -> None:
    """≥10,000 random operations from 32 tasks: books, model and database agree.

    The ``hot-users`` run puts all tasks on two users, where every charge
    races credits and refunds on the same row.
    """
    started = time.monotonic()
    print(f"replay with TOKENDB_STRESS_SEED={SIZES.seed}")
    workload = Workload(seed=SIZES.seed)
    await workload.setup(users)
    await asyncio.wait_for(workload.run(SIZES.operations, SIZES.tasks), RUN_TIMEOUT)

    assert await settle(workload, stress_db) == []
    outcomes = workload.model.outcomes
    assert outcomes["operations"] == SIZES.operations
    # Not vacuous: every kind of operation was accepted, and the limits were hit.
    kinds = ("charge", "top_up", "grant_bonus", "refund", "add_message", "repeat", "verify")
    for kind in (*kinds, "hold", "capture", "release"):
        assert outcomes[f"{kind}: ok"] > 0, kind
    assert outcomes["charge: InsufficientTokens"] + outcomes["add_message: InsufficientTokens"] > 0
    assert outcomes["conflicting_repeat: ReferenceConflict"] > 0
    report("load", workload, started, users=users, tasks=SIZES.tasks, pool=SIZES.pool)


async def _under_faults(
    url: str,
    inject: Callable[[], Coroutine[Any, Any, int]],
    operations: int,
) -> tuple[Workload, int]:
    """Run the workload (at least ``operations``) for as long as ``inject()`` injects faults."""
    print(f"replay with TOKENDB_STRESS_SEED={SIZES.seed}")
    workload = Workload(seed=SIZES.seed, faults=True)
    await workload.setup(SIZES.users)
    injector = asyncio.create_task(inject())
    try:
        await asyncio.wait_for(
            workload.run(operations, SIZES.tasks, until=injector.done), RUN_TIMEOUT
        )
    finally:
        faults = await asyncio.wait_for(injector, RUN_TIMEOUT)
    return workload, faults


async def test_killed_backends_during_load(stress_db: str) -> None:
    """pg_terminate_backend, again and again: every call committed fully or raised."""
    started = time.monotonic()
    rng = random.Random(SIZES.seed)
    database = database_name(stress_db)
    rounds = max(10, SIZES.fault_operations // 100)

    async def killer() -> int:
        killed = 0
        admin = await asyncpg.connect(stress_db)
        try:
            for _ in range(rounds):
                await asyncio.sleep(rng.uniform(0.02, 0.25))
                killed += await kill_backends(admin, database, share=rng.uniform(0.1, 1.0))
        finally:
            await admin.close()
        return killed

    workload, killed = await _under_faults(stress_db, killer, SIZES.fault_operations)
    await asyncio.sleep(0.5)  # let the client read the EOFs of the last killed backends

    assert await recovered(workload, 2 * SIZES.pool) == []
    assert await settle(workload, stress_db) == []
    outcomes = workload.model.outcomes
    assert killed > 0
    assert sum(v for k, v in outcomes.items() if k.endswith(": DatabaseUnavailable")) > 0
    report("kill", workload, started, kill_rounds=rounds, backends_killed=killed)


async def test_server_restart_during_load(tokendb_app_url: str) -> None:
    """A restart (clean, then a crash) of the test's own cluster in the middle of the load."""
    started = time.monotonic()
    pool: InitOptions = {"min_size": SIZES.pool, "max_size": SIZES.pool, "acquire_timeout": 5.0}
    async with (
        throwaway_cluster() as cluster,
        isolated_tokendb(cluster.url, tokendb_app_url, **pool) as url,
    ):
        outage_errors: list[BaseException] = []

        async def restarter() -> int:
            restarts = 0
            for mode in ("fast", "immediate"):
                await asyncio.sleep(1.0)
                await cluster.stop(mode)
                try:  # while the server is down a call fails at once, clearly
                    await asyncio.wait_for(tokendb.get_balance(user=uuid.uuid4()), 30)
                except Exception as exc:
                    outage_errors.append(exc)
                await asyncio.sleep(0.5)
                await cluster.start()
                restarts += 1
            return restarts

        workload, restarts = await _under_faults(url, restarter, SIZES.fault_operations)
        assert restarts == 2
        assert outage_errors and all(
            isinstance(exc, tokendb.DatabaseUnavailable)
            and not isinstance(exc, tokendb.DatabaseTimeout)
            for exc in outage_errors
        ), outage_errors
        assert await recovered(workload, 2 * SIZES.pool) == []
        assert await settle(workload, url) == []
        report("restart", workload, started, restarts=restarts)


async def test_a_server_that_stops_answering_is_a_timeout_not_a_hang(tokendb_app_url: str) -> None:
    """Backends frozen (SIGSTOP): no server-side timeout can fire; the client's bound does."""
    async with (
        throwaway_cluster() as cluster,
        isolated_tokendb(
            cluster.url,
            tokendb_app_url,
            min_size=2,
            max_size=2,
            statement_timeout=0.5,
            acquire_timeout=2.0,
        ) as url,
    ):
        user = await tokendb.create_user(
            email="frozen@example.com", password="frozen password", name="F"
        )
        admin = await asyncpg.connect(url)
        try:
            pids = [
                row["pid"]
                for row in await admin.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid()"
                )
            ]
            assert pids
            # The postmaster too, so that new connections hang as well.
            pids.append(int((cluster.data / "postmaster.pid").read_text().split()[0]))
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(tokendb.DatabaseTimeout) as caught:
                    await asyncio.wait_for(tokendb.charge(user=user, amount=1), 60)
                assert caught.value.outcome_unknown is True  # the write was sent
                with pytest.raises(tokendb.DatabaseTimeout) as caught:
                    await asyncio.wait_for(tokendb.get_balance(user=user), 60)
                assert caught.value.outcome_unknown is False
                waited = time.monotonic() - started
            finally:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
            # Thawed: the pool works again, and the timed-out charge either
            # happened or not; the books say which, and balance either way.
            assert await asyncio.wait_for(tokendb.get_balance(user=user), 30) in (99, 100)
            assert await tokendb.audit_ledger() == []
            print(f"\n[frozen server] both calls gave up after {waited:.1f} s")
        finally:
            await admin.close()
