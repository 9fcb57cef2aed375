"""``python -m bench.cpu [CALLS]``: the client's CPU per call, tokendb against raw asyncpg.

For the single-caller scenarios whose statements cost the server little
(``list-small``, ``charge-many``), what tokendb adds is Python run in the
client, and on a shared machine throughput ratios swing by ±30 % from run
to run. The process's CPU time (:func:`time.process_time`) per call is far
steadier: one caller, ``CALLS`` calls per run (default 300, a fifth of that
for batches), five runs per side alternating which side goes first, medians
printed. A measure for finding where the time goes, not a target: the
targets are ``python -m bench``'s throughput ratios.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import tokendb
from bench import raw
from bench.scenarios import PAGE, START_BALANCE, Bench, Options, history_user, seed_users
from tokendb.testing import test_server_url, throwaway_database

Op = Callable[[], Awaitable[object]]
RUNS = 5
BATCH = 64


async def _cpu_per_call(op: Op, calls: int) -> float:
    """Microseconds of this process's CPU per ``op()``."""
    started = time.process_time()
    for _ in range(calls):
        await op()
    return (time.process_time() - started) / calls * 1e6


async def _compare(name: str, ours: Op, theirs: Op, calls: int) -> None:
    await _cpu_per_call(ours, 20)  # prepared statements, pooled connections
    await _cpu_per_call(theirs, 20)
    runs: dict[str, list[float]] = {"tokendb": [], "raw": []}
    sides = [("tokendb", ours), ("raw", theirs)]
    for number in range(RUNS):
        for side, op in sides if number % 2 == 0 else sides[::-1]:
            runs[side].append(await _cpu_per_call(op, calls))
    mine, baseline = statistics.median(runs["tokendb"]), statistics.median(runs["raw"])
    print(
        f"{name}: tokendb {mine:,.0f} µs CPU a call, raw {baseline:,.0f} µs "
        f"(+{mine - baseline:,.0f} µs; raw/tokendb {baseline / mine:.2f})"
    )


async def main(calls: int) -> None:
    async with throwaway_database(test_server_url(), prefix="tokendb_cpu") as url:
        await tokendb.migrate(url)
        pool = await raw.create_pool(url, size=2)
        await tokendb.init(url, min_size=2, max_size=2)
        try:
            bench = Bench(Options(server_url=url), url, pool)
            user = await history_user(bench, 2_000)
            ours_users = await seed_users(bench, 200, START_BALANCE)
            raw_users = await seed_users(bench, 200, START_BALANCE)
            pick = random.Random(1).choice

            async def page() -> object:
                return await tokendb.list_transactions(user=user, limit=PAGE)

            async def raw_page() -> object:
                return await raw.first_page(pool, user, PAGE)

            async def batch() -> object:
                items = [tokendb.ChargeItem(user=pick(ours_users), amount=1) for _ in range(BATCH)]
                return await tokendb.charge_many(items=items)

            async def raw_batch() -> object:
                return await raw.charge_batch(pool, [pick(raw_users) for _ in range(BATCH)], 1)

            await _compare(f"list_transactions, {PAGE}-row page", page, raw_page, calls)
            await _compare(f"charge_many, {BATCH} items", batch, raw_batch, max(calls // 5, 20))
        finally:
            await tokendb.close()
            await pool.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 300))
