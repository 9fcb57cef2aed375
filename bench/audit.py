"""What the ledger audits cost at scale: ``python -m bench.audit``.

Creates a throw-away database on the test server, migrates it, and seeds a
ledger of ``--rows`` rows over ``--users`` users (1,000,000 over 10,000 by
default) in a few statements: as the owner, with the triggers off
(``session_replication_role = replica``), ``generate_series`` writes valid
chains (each row continues its user's ``seq`` and ``balance_after``, dated in
chain order), interleaved across users as a busy ledger is (one user's rows
on as many pages as they have rows). Then it times, as tokendb runs them:

* ``audit_ledger(user=…)``: p50/p99 over ``--samples`` users picked at random;
* ``audit_ledger()``: the full audit, best and median of ``--full-runs``;
* ``audit_ledger(since_checkpoint=True)``: first with no checkpoint (every
  row), then after 1 % new rows (written through ``charge``/``top_up``, over
  as many users as there are rows to add, capped at the user count), then
  with nothing new;

and checks the books are clean throughout (exit 1 otherwise). ``--rows
10000000`` takes a few minutes to seed; nothing of this size is in the
test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

import asyncpg

import tokendb
from bench.raw import create_pool
from tokendb import _ledger_sql
from tokendb.testing import DEFAULT_TEST_DATABASE_URL, throwaway_database

POOL_SIZE = 4

# $1 users, $2 rows per user. Every user: a top-up of 1000, then alternating
# charges of 1 and top-ups of 2 (so balances stay positive and both signs occur).
_SEED_USERS = """
INSERT INTO users (id, email, password_hash, name, token_balance, created_at, updated_at)
SELECT ('00000000-0000-7000-8000-' || lpad(to_hex(u), 12, '0'))::uuid,
       'user' || u || '@example.com', 'x', 'user ' || u,
       1000 + (($2 - 1) / 2) * 1 + (($2 - 1) % 2) * (-1),
       '2026-01-01', '2026-01-01'
FROM generate_series(1, $1) AS u
"""

# $1 users, $2 first seq, $3 last seq (a chunk of every user's chain).
_SEED_ROWS = """
INSERT INTO token_transactions
    (id, user_id, amount, type, description, balance_after, created_at, seq)
SELECT gen_random_uuid(),
       ('00000000-0000-7000-8000-' || lpad(to_hex(u), 12, '0'))::uuid,
       CASE WHEN s = 1 THEN 1000 WHEN s % 2 = 0 THEN -1 ELSE 2 END,
       CASE WHEN s = 1 THEN 'topup' WHEN s % 2 = 0 THEN 'usage' ELSE 'topup' END,
       'bench',
       1000 + ((s - 1) / 2) * 1 + ((s - 1) % 2) * (-1),
       timestamptz '2026-01-01' + (s * $1 + u) * interval '1 microsecond',
       s
FROM generate_series($2::int, $3::int) AS s, generate_series(1, $1) AS u
ORDER BY s, u
"""


async def seed(url: str, *, rows: int, users: int, progress: Callable[[str], None]) -> None:
    """``rows`` ledger rows (a multiple of ``users``) over ``users`` users, valid chains."""
    per_user = rows // users
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET session_replication_role = replica")
        await conn.execute(_SEED_USERS, users, per_user)
        chunk = max(1, 500_000 // users)
        for first in range(1, per_user + 1, chunk):
            last = min(per_user, first + chunk - 1)
            await conn.execute(_SEED_ROWS, users, first, last)
            progress(f"seeded {last * users:,} of {per_user * users:,} rows")
        await conn.execute("RESET session_replication_role")
        await conn.execute("VACUUM (ANALYZE) users")
        await conn.execute("VACUUM (ANALYZE) token_transactions")
    finally:
        await conn.close()


async def _timed(call: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    started = perf_counter()
    result = await call()
    return (perf_counter() - started) * 1000, result


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(
    url: str,
    *,
    rows: int,
    users: int,
    samples: int,
    full_runs: int,
    progress: Callable[[str], None],
) -> tuple[list[str], bool]:
    """Time the audits on a seeded database; the report's lines and whether all were clean."""
    lines: list[str] = []
    clean = True
    await tokendb.init(url, min_size=POOL_SIZE, max_size=POOL_SIZE, statement_timeout=None)
    try:
        conn = await asyncpg.connect(url)
        try:
            ids = [row["id"] for row in await conn.fetch("SELECT id FROM users ORDER BY id")]
        finally:
            await conn.close()
        rng = random.Random(13)
        raw = await create_pool(url, size=POOL_SIZE)
        try:
            for user in rng.sample(ids, min(20, len(ids))):  # warm-up: plans and caches
                await tokendb.audit_ledger(user=user)
                await raw.fetch(_ledger_sql.AUDIT_USER, user)
            # The same statement sent by hand through a pool configured like tokendb's,
            # interleaved call by call.
            per_user: list[float] = []
            per_user_raw: list[float] = []
            for user in (rng.choice(ids) for _ in range(samples)):
                started = perf_counter()
                found = await tokendb.audit_ledger(user=user)
                per_user.append((perf_counter() - started) * 1000)
                clean = clean and found == []
                started = perf_counter()
                await raw.fetch(_ledger_sql.AUDIT_USER, user)
                per_user_raw.append((perf_counter() - started) * 1000)
            lines.append(
                f"| `audit_ledger(user=…)` | {rows:,} rows / {users:,} users | "
                f"p50 {_ms(per_user, 0.5):.2f} ms, p99 {_ms(per_user, 0.99):.2f} ms "
                f"({samples} users; raw asyncpg p50 {_ms(per_user_raw, 0.5):.2f} ms) |"
            )
            progress(lines[-1])

            full: list[float] = []
            full_raw: list[float] = []
            for _ in range(full_runs):
                took, found = await _timed(tokendb.audit_ledger)
                full.append(took)
                clean = clean and found == []
                async with raw.acquire() as pooled:
                    # Neither the server's nor the client's timeout, as tokendb's side here.
                    await pooled.execute("SET statement_timeout = 0")
                    took, _ = await _timed(lambda: pooled.fetch(_ledger_sql.AUDIT, timeout=3600))
                full_raw.append(took)
        finally:
            await raw.close()
        lines.append(
            f"| `audit_ledger()` | {rows:,} rows / {users:,} users | "
            f"median {statistics.median(full):,.0f} ms, best {min(full):,.0f} ms "
            f"({full_runs} runs; raw asyncpg median {statistics.median(full_raw):,.0f} ms) |"
        )
        progress(lines[-1])

        async def incremental(label: str, ledger: str) -> None:
            nonlocal clean
            took, found = await _timed(lambda: tokendb.audit_ledger(since_checkpoint=True))
            clean = clean and found == []
            lines.append(
                f"| `audit_ledger(since_checkpoint=True)`, {label} | {ledger} | {took:,.0f} ms |"
            )
            progress(lines[-1])

        await incremental("no checkpoint yet (reads every row)", f"{rows:,} rows")
        new_rows = max(1, rows // 100)
        movers = rng.sample(ids, max(1, len(ids) // 10))
        items = [
            tokendb.ChargeItem(user=movers[n % len(movers)], amount=1) for n in range(new_rows)
        ]
        for first in range(0, len(items), 64):
            for outcome in await tokendb.charge_many(items=items[first : first + 64]):
                if isinstance(outcome, Exception):
                    raise outcome
        await incremental(
            "1% new rows", f"{new_rows:,} new rows over {len(movers):,} users (a tenth)"
        )
        await incremental("nothing new", f"{users:,} users")
    finally:
        await tokendb.close()
    return lines, clean


async def main(options: argparse.Namespace) -> int:
    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    async with throwaway_database(options.server_url, prefix="tokendb_audit") as url:
        await tokendb.migrate(url)
        started = perf_counter()
        await seed(url, rows=options.rows, users=options.users, progress=progress)
        progress(f"seeded in {perf_counter() - started:,.0f} s")
        lines, clean = await measure(
            url,
            rows=options.rows,
            users=options.users,
            samples=options.samples,
            full_runs=options.full_runs,
            progress=progress,
        )
    print("| audit | ledger | time |")
    print("|---|---|---|")
    print("\n".join(lines))
    if not clean:
        print("an audit found discrepancies in a valid ledger", file=sys.stderr)
    return 0 if clean else 1


def cli() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--server-url", default=DEFAULT_TEST_DATABASE_URL)
    parser.add_argument("--rows", type=int, default=1_000_000, help="ledger rows (default 1M)")
    parser.add_argument("--users", type=int, default=10_000, help="users (default 10,000)")
    parser.add_argument("--samples", type=int, default=500, help="users audited one by one")
    parser.add_argument("--full-runs", type=int, default=3, help="full audits timed")
    raise SystemExit(asyncio.run(main(parser.parse_args())))


if __name__ == "__main__":
    cli()
