"""One heavy tenant beside coalesced charges: ``python -m bench.heavy [HEAVY_CALLERS]``.

64 callers charge random users of 200 (coalesced, tokendb's default) for 6 s
while ``HEAVY_CALLERS`` (default 8) callers of one tenant send messages of
4,000,000 emoji (16 MB in UTF-8, ``MAX_CONTENT_LENGTH`` characters) through
``add_message``, in the same process. Prints the charges per second, the
heavy messages per second and the event loop's longest stall. Run it with 0
for the charges alone.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time

import tokendb
from bench import raw, scenarios
from tokendb.testing import throwaway_database

HEAVY = "\N{GRINNING FACE}" * 4_000_000
SECONDS = 6.0


async def main(heavy_callers: int) -> None:
    server = os.environ.get(
        "TOKENDB_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"
    )
    async with throwaway_database(server, prefix="tokendb_heavy") as url:
        await tokendb.migrate(url)
        await tokendb.init(url, min_size=20, max_size=20)
        pool = await raw.create_pool(url, size=2)
        bench = scenarios.Bench(scenarios.Options(server_url=url), url, pool)
        users = await scenarios.seed_users(bench, 200, scenarios.START_BALANCE)
        (tenant,) = await scenarios.seed_users(bench, 1, scenarios.START_BALANCE)
        key, _ = await tokendb.issue_api_key(user=tenant, name="heavy")
        sessions = [
            (await tokendb.start_chat(api_key=key, model="m")).id
            for _ in range(max(1, heavy_callers))
        ]
        charges = messages = 0
        stall = 0.0
        end = time.perf_counter() + SECONDS

        async def charging() -> None:
            nonlocal charges
            while time.perf_counter() < end:
                await tokendb.charge(user=random.choice(users), amount=1)
                charges += 1

        async def heavy(index: int) -> None:
            nonlocal messages
            while time.perf_counter() < end:
                await tokendb.add_message(
                    session=sessions[index], role="user", content=HEAVY, tokens=1
                )
                messages += 1

        async def ticking() -> None:
            nonlocal stall
            while time.perf_counter() < end:
                started = time.perf_counter()
                await asyncio.sleep(0.005)
                stall = max(stall, time.perf_counter() - started - 0.005)

        await asyncio.gather(
            ticking(),
            *(charging() for _ in range(64)),
            *(heavy(index) for index in range(heavy_callers)),
        )
        print(
            f"heavy callers {heavy_callers}: charges {charges / SECONDS:,.0f}/s, "
            f"heavy messages {messages / SECONDS:.1f}/s, "
            f"longest event loop stall {stall * 1000:.0f} ms"
        )
        await tokendb.close()
        await pool.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 8))
