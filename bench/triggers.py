"""What each integrity trigger costs, per statement: PostgreSQL's own trigger timings.

``python -m bench.triggers`` creates a throw-away database on the test server,
migrates and seeds it, then runs tokendb's hot writing statements under
``EXPLAIN (ANALYZE)``: a charge (``MOVE``), a billed chat message
(``ADD_MESSAGE``) and a batch of 64 charges (``BATCH``), of one user and of
64 users. Each
runs in a transaction with ``SET CONSTRAINTS ALL IMMEDIATE``, so the checks
deferred to the commit fire within the statement and are timed with it, and
is rolled back, so every run sees the same rows. The server reports the
statement's execution time and, per trigger, its time and calls: the
figures are medians of ``--rounds`` × ``--runs`` runs, in microseconds
(after a few untimed runs: the first call of a session compiles the trigger
functions). Two variants, timed round by round: the statements without
the unique ``seq`` indexes (dropped in this database), and with the three
functions on their path running with a pinned ``search_path`` (as the
migration's other functions do) instead of naming tokendb's tables with
their schema. ``EXPLAIN ANALYZE`` times every
plan node, which slows the statements themselves; the trigger figures are
the functions' own run times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

import tokendb
from tokendb import _ledger_sql
from tokendb.ids import new_id
from tokendb.testing import DEFAULT_TEST_DATABASE_URL, throwaway_database

BATCH = 64
WARM_UP = 5
"""Runs not timed after each change of the schema (re-planning, recompiling)."""
SEQ_INDEXES = {
    "token_transactions_user_seq_key": 'ON "token_transactions" ("user_id", "seq")',
    "chat_messages_session_seq_key": 'ON "chat_messages" ("session_id", "seq")',
}
Change = Callable[[asyncpg.Connection], Awaitable[None]]


async def _noop(conn: asyncpg.Connection) -> None:
    return None


async def _drop_seq_indexes(conn: asyncpg.Connection) -> None:
    for name in SEQ_INDEXES:
        await conn.execute(f'DROP INDEX "{name}"')


async def _create_seq_indexes(conn: asyncpg.Connection) -> None:
    for name, definition in SEQ_INDEXES.items():
        await conn.execute(f'CREATE UNIQUE INDEX "{name}" {definition}')


_HOT = ("tokendb_chain()", "tokendb_balance_follows_ledger()", "tokendb_chat_books()")
"""The functions on every movement's path: schema-qualified names, no pinned search_path."""


async def _pin_hot(conn: asyncpg.Connection) -> None:
    for function in _HOT:
        await conn.execute(f"ALTER FUNCTION {function} SET search_path = public, pg_temp")


async def _unpin_hot(conn: asyncpg.Connection) -> None:
    for function in _HOT:
        await conn.execute(f"ALTER FUNCTION {function} RESET search_path")


VARIANTS: list[tuple[str, Change, Change]] = [
    ("as migrated", _noop, _noop),
    ("without the seq unique indexes", _drop_seq_indexes, _create_seq_indexes),
    ("with a pinned search_path, as the other functions", _pin_hot, _unpin_hot),
]


async def _seed(owner: asyncpg.Connection) -> tuple[list[Any], list[Any]]:
    """``BATCH`` users with a big balance and a ledger row, each with a key and a chat session."""
    users = [new_id() for _ in range(BATCH)]
    await owner.execute(
        "WITH u AS (INSERT INTO users (id, email, password_hash, name, token_balance) "
        "SELECT id, id || '@example.com', 'x', 'n', 2000000000 FROM unnest($1::uuid[]) "
        "AS id RETURNING id) INSERT INTO token_transactions (user_id, amount, type, "
        "balance_after) SELECT id, 2000000000, 'topup', 2000000000 FROM u",
        users,
    )
    rows = await owner.fetch(
        "WITH k AS (INSERT INTO api_keys (user_id, key_hash, key_prefix, name) "
        "SELECT id, gen_random_uuid()::text, 'sk_live_x', 'k' FROM unnest($1::uuid[]) AS id "
        "RETURNING id, user_id) INSERT INTO chat_sessions (user_id, api_key_id, model) "
        "SELECT user_id, id, 'm' FROM k RETURNING id",
        users,
    )
    return users, [row["id"] for row in rows]


async def _explain(conn: asyncpg.Connection, sql: str, *args: Any) -> dict[str, Any]:
    """The statement's ``EXPLAIN (ANALYZE)`` with deferred checks made immediate, rolled back."""
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
        plan = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
    finally:
        await tx.rollback()
    result: dict[str, Any] = json.loads(plan)[0]
    return result


async def main(server_url: str, rounds: int, runs: int) -> None:
    async with throwaway_database(server_url, prefix="tokendb_triggers") as url:
        await tokendb.migrate(url)
        conn = await asyncpg.connect(url)
        try:
            users, sessions = await _seed(conn)
            statements: dict[str, Callable[[], tuple[Any, ...]]] = {
                "charge (MOVE)": lambda: (
                    _ledger_sql.MOVE,
                    users[0],
                    -1,
                    "usage",
                    new_id(),
                    None,
                    None,
                    None,
                    None,
                ),
                "chat message (ADD_MESSAGE)": lambda: (
                    _ledger_sql.ADD_MESSAGE,
                    new_id(),
                    sessions[0],
                    "user",
                    "hi",
                    1,
                    new_id(),
                    None,
                    False,
                ),
                f"batch of {BATCH} charges of one user (BATCH)": lambda: (
                    _ledger_sql.BATCH,
                    [users[0]] * BATCH,
                    [1] * BATCH,
                    [new_id() for _ in users],
                    [None] * BATCH,
                    [None] * BATCH,
                    [None] * BATCH,
                    [None] * BATCH,
                ),
                f"batch of {BATCH} charges of {BATCH} users (BATCH)": lambda: (
                    _ledger_sql.BATCH,
                    users,
                    [1] * BATCH,
                    [new_id() for _ in users],
                    [None] * BATCH,
                    [None] * BATCH,
                    [None] * BATCH,
                    [None] * BATCH,
                ),
            }
            execution: dict[tuple[str, str], list[float]] = defaultdict(list)
            triggers: dict[tuple[str, str], list[tuple[float, int]]] = defaultdict(list)
            for _ in range(rounds):
                for variant, change, undo in VARIANTS:
                    await change(conn)
                    try:
                        for name, arguments in statements.items():
                            for _ in range(WARM_UP):  # plans and compiled functions, again
                                await _explain(conn, *arguments())
                            for _ in range(runs):
                                plan = await _explain(conn, *arguments())
                                execution[variant, name].append(plan["Execution Time"] * 1000)
                                if variant != "as migrated":
                                    continue
                                for trigger in plan.get("Triggers", []):
                                    triggers[name, trigger["Trigger Name"]].append(
                                        (trigger["Time"] * 1000, trigger["Calls"])
                                    )
                    finally:
                        await undo(conn)
        finally:
            await conn.close()
    _report(list(statements), execution, triggers)


def _report(
    names: list[str],
    execution: dict[tuple[str, str], list[float]],
    triggers: dict[tuple[str, str], list[tuple[float, int]]],
) -> None:
    print("Statement execution time, µs (median; EXPLAIN ANALYZE, deferred checks included):\n")
    print("| variant | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for variant, _, _ in VARIANTS:
        cells = [f"{statistics.median(execution[variant, name]):,.0f}" for name in names]
        print(f"| {variant} | " + " | ".join(cells) + " |")
    print("\nPer trigger, as migrated: µs per statement (calls per statement):\n")
    print("| trigger | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for trigger in sorted({trigger for _, trigger in triggers}):
        cells = []
        for name in names:
            samples = triggers.get((name, trigger))
            if not samples:
                cells.append("")
                continue
            time = statistics.median(t for t, _ in samples)
            calls = statistics.median(c for _, c in samples)
            cells.append(f"{time:,.0f} ({calls:g})")
        print(f"| {trigger} | " + " | ".join(cells) + " |")


def cli() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--server-url", default=DEFAULT_TEST_DATABASE_URL)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every variant")
    parser.add_argument("--runs", type=int, default=40, help="timed runs of a statement a round")
    options = parser.parse_args()
    asyncio.run(main(options.server_url, options.rounds, options.runs))


if __name__ == "__main__":
    cli()
