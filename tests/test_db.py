"""Tests for tokendb._waits: bounded waits (Deadline and its watchdog) on a real pool."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

import tokendb
from tests.helpers import db_settings
from tokendb import _db, _tortoise, _waits


@pytest.fixture
async def short_acquire_timeout(tokendb_db: str) -> AsyncIterator[float]:
    with db_settings(acquire_timeout=0.3):
        yield 0.3


@pytest.fixture
async def exhausted_pool(tokendb_db: str) -> AsyncIterator[list[Any]]:
    """Every pooled connection taken (and given back at the end)."""
    pool = await _tortoise.pool(_tortoise.models_client())
    held = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        yield held
    finally:
        for conn in held:
            await pool.release(conn)


async def test_a_deadline_cancels_an_overdue_wait_as_a_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError), _waits.Deadline(0.05):
        await asyncio.sleep(5)
    assert 0.05 <= time.monotonic() - started < 0.05 + _waits.TICK + 0.5


async def test_a_deadline_met_leaves_nothing_behind() -> None:
    with _waits.Deadline(5):
        await asyncio.sleep(0.01)
    watchdog = _waits.Watchdog.of(asyncio.get_running_loop())
    assert watchdog.deadlines == {}
    await asyncio.sleep(_waits.TICK * 2)
    assert watchdog.timer is None  # it stops ticking when nothing waits


async def test_the_callers_own_cancellation_stays_a_cancellation() -> None:
    async def wait() -> None:
        with _waits.Deadline(0.05):
            await asyncio.sleep(5)

    task = asyncio.ensure_future(wait())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_exhausted_pool_is_a_database_timeout(
    short_acquire_timeout: float, exhausted_pool: list[object]
) -> None:
    started = time.monotonic()
    with pytest.raises(tokendb.DatabaseTimeout) as info:
        await _db.read("SELECT 1")
    assert "no pooled connection became free" in str(info.value)
    assert short_acquire_timeout <= time.monotonic() - started < 2
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # the deadline's cancel was taken back


async def test_the_pool_serves_again_once_connections_come_back(
    short_acquire_timeout: float, tokendb_db: str
) -> None:
    pool = await _tortoise.pool(_tortoise.models_client())
    held = [await pool.acquire() for _ in range(pool.get_max_size())]
    waiting = asyncio.ensure_future(_db.read("SELECT 1 AS one"))
    await asyncio.sleep(0.05)
    await pool.release(held.pop())
    assert (await waiting)[0]["one"] == 1
    for conn in held:
        await pool.release(conn)
    assert pool.get_idle_size() >= 1
