"""``python -m bench.staleness``: how soon after a revocation's commit every process refuses it.

Two worker processes (each with tokendb initialised and its verify cache on)
verify the same key in a loop, a request every millisecond, as a gateway
would. The parent revokes the key with raw SQL on a connection of its own,
notes the instant its COMMIT returned, and each worker reports the instant
its first ``ApiKeyRevoked`` came back (``time.monotonic()`` is one clock
for every process of the machine). Before each revocation both workers must
have answered the key from their cache, so the figure is the cache's
staleness, not a lookup's. Prints p50, p99 and the maximum over
``--rounds`` revocations, in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time
from multiprocessing.connection import Connection
from typing import Any

import asyncpg

WORKERS = 2


def _worker(url: str, pipe: Connection) -> None:
    asyncio.run(_serve(url, pipe))


async def _serve(url: str, pipe: Connection) -> None:
    import tokendb
    from tokendb import _key_cache

    await tokendb.init(url, verify_cache=True, min_size=1, max_size=2)
    loop = asyncio.get_running_loop()
    while _key_cache.for_lookup() is None:  # noqa: ASYNC110 - starts the listener, polls it
        await asyncio.sleep(0.01)
    pipe.send("ready")
    try:
        while True:
            message = await loop.run_in_executor(None, pipe.recv)
            if message is None:
                return
            pipe.send(await _watch(tokendb, message))
    finally:
        await tokendb.close()


async def _watch(tokendb: Any, secret: str) -> tuple[float, int]:
    """Verify ``secret`` until it is refused; the instant of the refusal, and the hits before."""
    hits_before = tokendb.verify_cache_stats().hits
    while True:
        try:
            await tokendb.verify_api_key(secret=secret)
        except tokendb.ApiKeyRevoked:
            return time.monotonic(), tokendb.verify_cache_stats().hits - hits_before
        await asyncio.sleep(0.001)


async def measure(url: str, rounds: int) -> list[float]:
    """Staleness in seconds of each (round, worker)."""
    import tokendb

    context = multiprocessing.get_context("spawn")
    pipes = []
    workers = []
    for _ in range(WORKERS):
        parent, child = context.Pipe()
        process = context.Process(target=_worker, args=(url, child), daemon=True)
        process.start()
        pipes.append(parent)
        workers.append(process)
    for pipe in pipes:
        if await asyncio.get_running_loop().run_in_executor(None, pipe.recv) != "ready":
            raise RuntimeError("a worker did not start")
    staleness: list[float] = []
    async with tokendb.connect(url, verify_cache=False):
        user = await tokendb.create_user(
            email=f"staleness-{time.time_ns()}@example.com", password="x" * 12, name="S"
        )
        conn = await asyncpg.connect(url)
        try:
            for _ in range(rounds):
                key, secret = await tokendb.issue_api_key(user=user, name="hot")
                for pipe in pipes:
                    pipe.send(secret)
                await asyncio.sleep(0.3)  # both workers cached it and are hitting it
                await conn.execute("UPDATE api_keys SET is_active = false WHERE id = $1", key.id)
                committed = time.monotonic()
                for pipe in pipes:
                    refused_at, hits = await asyncio.get_running_loop().run_in_executor(
                        None, pipe.recv
                    )
                    if hits == 0:
                        raise RuntimeError("a worker never answered from its cache")
                    staleness.append(refused_at - committed)
        finally:
            await conn.close()
            for pipe in pipes:
                pipe.send(None)
            for process in workers:
                process.join(10)
    return staleness


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.staleness", description=__doc__)
    parser.add_argument("--rounds", type=int, default=100, help="revocations (default 100)")
    parser.add_argument("--url", default=None, help="server (default: the test server)")
    arguments = parser.parse_args()

    from tokendb.testing import test_server_url, throwaway_database

    async def run() -> list[float]:
        server = arguments.url or test_server_url()
        async with throwaway_database(server, prefix="tokendb_staleness") as url:
            import tokendb

            await tokendb.migrate(url)
            return await measure(url, arguments.rounds)

    results = sorted(asyncio.run(run()))
    ms = [value * 1000 for value in results]
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    print(
        f"revocation honoured after its commit, {len(ms)} samples ({WORKERS} processes): "
        f"p50 {statistics.median(ms):.2f} ms, p99 {p99:.2f} ms, max {ms[-1]:.2f} ms"
    )


if __name__ == "__main__":
    main()
