"""The scenarios: what each side does, the data it needs, and how its books are checked.

tokendb and the baseline never share rows that either writes: each side gets
its own users (same count, same starting balance), so the check at the end of
a scenario can say exactly what each side's balances must be.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from uuid import UUID

import asyncpg

import tokendb
from bench import raw
from bench.harness import Op
from tokendb import _limits_sql
from tokendb.api_keys import DEFAULT_TOUCH_INTERVAL
from tokendb.ids import new_id

START_BALANCE = 1_000_000_000
"""Enough that no benchmark charge is ever refused (the int column tops out at 2.1e9)."""
TOP_UP_START = 1_000
MESSAGE = "What is the capital of France? Answer in one word, then explain why. " * 4
PAGE = 50
GIVE_UP = 0.5
"""Seconds a caller of the locked user waits before it gives up (``coalesced-locked``)."""

Check = Callable[[], Awaitable[list[str]]]


@dataclass(frozen=True)
class Options:
    """Sizes of one benchmark run (``python -m bench --help``)."""

    server_url: str
    duration: float = 3.0
    warmup: float = 1.0
    rounds: int = 5
    concurrency: int = 64
    users: int = 1000
    batch: int = 64
    pool_size: int = 20
    history_rows: int = 1_000_000
    small_history_rows: int = 10_000
    only: frozenset[str] = frozenset()


@dataclass
class Bench:
    """What the scenarios share: the database, the baseline's pool, seeded history."""

    options: Options
    url: str
    pool: asyncpg.Pool
    histories: dict[int, UUID] = field(default_factory=dict)
    listen_url: str | None = None
    """The verify cache's direct URL when ``url`` goes through PgBouncer."""


@dataclass(frozen=True)
class Side:
    """One implementation of a scenario: the call to time and the check of its books."""

    op: Op
    check: Check


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    meaning: str
    build: Callable[[Bench], Awaitable[tuple[Side, Side]]]
    target: float | None = None
    """The minimum tokendb/raw throughput ratio the issue sets, if any."""
    coalesce: bool = False
    """Whether tokendb runs with ``coalesce_charges`` (the default of ``tokendb.init``)."""
    callers: Callable[[Options], int] = lambda options: options.concurrency
    verify_cache: bool = True
    """Whether tokendb runs with its verify cache (the default of ``tokendb.init``)."""
    verify_cache_size: int = 10_000
    pgbouncer: bool = False
    """Both sides go through one PgBouncer in transaction pooling mode (tokendb with
    ``?pgbouncer=true``, the baseline's pool without a statement cache)."""


_SEED_USERS = """
WITH new_users AS (
    INSERT INTO users (id, email, password_hash, name, role, token_balance, created_at, updated_at)
    SELECT id, 'bench-' || id || '@example.com', 'not a password hash', 'bench user', 'user',
           $2, clock_timestamp(), clock_timestamp()
    FROM unnest($1::uuid[]) AS id
    RETURNING id, token_balance, created_at
)
INSERT INTO token_transactions
    (id, user_id, amount, type, description, reference_id, balance_after, created_at)
SELECT gen_random_uuid(), id, token_balance, 'bonus', 'bench seed', NULL, token_balance, created_at
FROM new_users
"""

# Top-ups of one token each, in chain order: ids count up from a fresh UUIDv7
# prefix and clock_timestamp() never goes back, so (created_at, id) is the chain.
_SEED_HISTORY = """
INSERT INTO token_transactions
    (id, user_id, amount, type, description, reference_id, balance_after, created_at)
SELECT (substr($2, 1, 24) || lpad(to_hex(g), 12, '0'))::uuid, $1, 1, 'topup',
       'bench history', NULL, $3 + g, clock_timestamp()
FROM generate_series(1, $4) AS g
ORDER BY g  -- chain order: the database checks each row against the one before
"""


async def seed_users(bench: Bench, count: int, balance: int) -> list[UUID]:
    """``count`` users with ``balance`` tokens each (and the ledger row that says so)."""
    ids = [new_id() for _ in range(count)]
    await bench.pool.execute(_SEED_USERS, ids, balance)
    return ids


async def history_user(bench: Bench, rows: int) -> UUID:
    """A user with ``rows`` ledger rows (seeded once per size)."""
    if rows not in bench.histories:
        (user_id,) = await seed_users(bench, 1, TOP_UP_START)
        async with bench.pool.acquire() as conn, conn.transaction():
            # The balance first: the database checks each ledger statement against it.
            await conn.execute(
                "UPDATE users SET token_balance = token_balance + $2 WHERE id = $1", user_id, rows
            )
            await conn.execute(_SEED_HISTORY, user_id, str(new_id()), TOP_UP_START, rows)
        await bench.pool.execute("VACUUM (ANALYZE) token_transactions")
        bench.histories[rows] = user_id
    return bench.histories[rows]


def balances_check(bench: Bench, start: int, moved: Counter[UUID], sign: int) -> Check:
    """Every user's balance must be ``start + sign * moved[user]``."""

    async def check() -> list[str]:
        rows = await bench.pool.fetch(
            "SELECT id, token_balance FROM users WHERE id = ANY($1::uuid[])", list(moved)
        )
        actual = {row["id"]: row["token_balance"] for row in rows}
        return [
            f"user {user}: balance {actual.get(user)}, expected {start + sign * count}"
            for user, count in moved.items()
            if actual.get(user) != start + sign * count
        ]

    return check


def _picker(users: list[UUID], seed: int) -> Callable[[], UUID]:
    if len(users) == 1:
        only = users[0]
        return lambda: only
    rng = random.Random(seed)
    return lambda: users[rng.randrange(len(users))]


async def _movements(bench: Bench, users: int, kind: str) -> tuple[Side, Side]:
    """charge (``usage``) or top_up (``topup``) of 1 token on random users of ``users``."""
    start = START_BALANCE if kind == "usage" else TOP_UP_START
    sign = -1 if kind == "usage" else 1
    operation = tokendb.charge if kind == "usage" else tokendb.top_up

    async def side(use_tokendb: bool) -> Side:
        pick = _picker(await seed_users(bench, users, start), seed=users)
        moved: Counter[UUID] = Counter()

        async def op(index: int) -> int:
            user = pick()
            if use_tokendb:
                await operation(user=user, amount=1)
            else:
                await raw.move(bench.pool, user, sign, kind)
            moved[user] += 1
            return 1

        return Side(op, balances_check(bench, start, moved, sign))

    return await side(True), await side(False)


async def _locked(bench: Bench) -> tuple[Side, Side]:
    """Coalesced charges of random users while one more user's row is locked (by a
    transaction that holds it) and its calls keep giving up; the baseline is the same
    tokendb calls with nothing locked. Each side has its own users."""
    users = bench.options.users
    holder = await asyncpg.connect(bench.url)
    (held,) = await seed_users(bench, 1, START_BALANCE)
    await holder.execute("BEGIN")
    await holder.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", held)
    stuck: set[asyncio.Task[None]] = set()

    async def gives_up() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tokendb.charge(user=held, amount=1), GIVE_UP)

    async def side(locked: bool) -> Side:
        pick = _picker(await seed_users(bench, users, START_BALANCE), seed=users)
        moved: Counter[UUID] = Counter()

        async def op(index: int) -> int:
            if locked and index == 0 and not stuck:
                # In the background, so its own wait is not in the others' latencies.
                task = asyncio.ensure_future(gives_up())
                stuck.add(task)
                task.add_done_callback(stuck.discard)
            user = pick()
            await tokendb.charge(user=user, amount=1)
            moved[user] += 1
            return 1

        others = balances_check(bench, START_BALANCE, moved, -1)

        async def check() -> list[str]:
            if not locked:
                return await others()
            await asyncio.gather(*stuck)
            if not holder.is_closed():
                await holder.close()  # the lock goes with it
            balance = await bench.pool.fetchval(
                "SELECT token_balance FROM users WHERE id = $1", held
            )
            charged = (
                [] if balance == START_BALANCE else [f"the locked user was charged: {balance}"]
            )
            return charged + await others()

        return Side(op, check)

    return await side(True), await side(False)


async def _charge_many(bench: Bench) -> tuple[Side, Side]:
    """Batches of ``--batch`` charges over ``--users`` users, one batch in flight."""
    size = bench.options.batch

    async def side(use_tokendb: bool) -> Side:
        users = await seed_users(bench, bench.options.users, START_BALANCE)
        pick = _picker(users, seed=size)
        moved: Counter[UUID] = Counter()

        async def op(index: int) -> int:
            picked = [pick() for _ in range(size)]
            if use_tokendb:
                results = await tokendb.charge_many(
                    items=[tokendb.ChargeItem(user=user, amount=1) for user in picked]
                )
                failed = [r for r in results if not isinstance(r, tokendb.TokenTransaction)]
                if failed:
                    raise RuntimeError(f"charge_many refused: {failed[0]!r}")
            else:
                await raw.charge_batch(bench.pool, picked, 1)
            moved.update(picked)
            return size

        return Side(op, balances_check(bench, START_BALANCE, moved, -1))

    return await side(True), await side(False)


COLD_KEYS = 2_000
"""Keys the cold scenario rotates through, 30 times what its cache holds: every call misses."""


# One API key per user, with a limit per day far above what a run charges ($2).
_SEED_KEYS = """
INSERT INTO api_keys (id, user_id, key_hash, key_prefix, name, permissions, is_active,
                      created_at, token_limit, limit_period)
SELECT gen_random_uuid(), id, 'bench-' || id, 'sk_live_benc', 'bench', '["*"]'::jsonb, true,
       clock_timestamp(), $2, CASE WHEN $2::bigint IS NULL THEN NULL ELSE 'day' END
FROM unnest($1::uuid[]) AS id
RETURNING id, user_id
"""

LIMIT = 10**15
SEEDING = 3600.0
"""Seconds a seeding statement may take (the pool's command timeout is tokendb's)."""


async def _limited(bench: Bench) -> tuple[Side, Side]:
    """charge of 1 token through the key (with a limit) of random users."""

    async def side(use_tokendb: bool) -> Side:
        users = await seed_users(bench, bench.options.users, START_BALANCE)
        key_of = {
            row["user_id"]: row["id"] for row in await bench.pool.fetch(_SEED_KEYS, users, LIMIT)
        }
        for key in key_of.values():  # a long-running process knows its limited keys
            _limits_sql.remember(key, limited=True)
        pick = _picker(users, seed=len(users))
        moved: Counter[UUID] = Counter()

        async def op(index: int) -> int:
            user = pick()
            if use_tokendb:
                await tokendb.charge(user=user, amount=1, api_key=key_of[user])
            else:
                await raw.charge_limited(bench.pool, user, key_of[user], 1)
            moved[user] += 1
            return 1

        return Side(op, balances_check(bench, START_BALANCE, moved, -1))

    return await side(True), await side(False)


# $1 user, $2 a fresh UUIDv7 as text (the ids' prefix), $3 the balance before, $4 rows,
# $5 the key. Usage rows of 1 token, three models, in chain order.
_SEED_USAGE = """
INSERT INTO token_transactions (id, user_id, amount, type, description, reference_id,
                                balance_after, created_at, api_key_id, model)
SELECT (substr($2, 1, 24) || lpad(to_hex(g), 12, '0'))::uuid, $1, -1, 'usage',
       'bench usage', NULL, $3 - g, clock_timestamp(), $5, 'model-' || (g % 3)
FROM generate_series(1, $4) AS g
ORDER BY g
"""
# Spread over the last 30 days (the seed row a day before), as the owner with
# triggers off, then the user's rollup rebuilt: $1 user, $2 rows.
_SPREAD = """
UPDATE token_transactions SET created_at = CASE
    WHEN type = 'usage' THEN now() - interval '30 days'
        + (('x' || right(replace(id::text, '-', ''), 12))::bit(48)::bigint * (2592000.0 / $2))
          * interval '1 second'
    ELSE now() - interval '31 days' END
WHERE user_id = $1
"""
_REBUILD_ROLLUP = """
INSERT INTO usage_daily (user_id, api_key_id, model, day, tokens, requests)
SELECT user_id, api_key_id, model, (created_at AT TIME ZONE 'UTC')::date, -sum(amount), count(*)
FROM token_transactions WHERE user_id = $1 AND type = 'usage'
GROUP BY 1, 2, 3, 4
"""


async def _usage_report(bench: Bench) -> tuple[Side, Side]:
    """usage_report of one user with ``history_rows`` usage rows over 30 days."""
    rows = bench.options.history_rows
    (user,) = await seed_users(bench, 1, START_BALANCE)
    (key,) = await bench.pool.fetch(_SEED_KEYS, [user], None)
    async with bench.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL statement_timeout = 0")  # a million rows, each checked
        await conn.execute(
            "UPDATE users SET token_balance = token_balance - $2 WHERE id = $1", user, rows
        )
        await conn.execute(
            _SEED_USAGE, user, str(new_id()), START_BALANCE, rows, key["id"], timeout=SEEDING
        )
    async with bench.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute("SET LOCAL statement_timeout = 0")
        await conn.execute(_SPREAD, user, rows, timeout=SEEDING)
        await conn.execute("DELETE FROM usage_daily WHERE user_id = $1", user)
        await conn.execute(_REBUILD_ROLLUP, user, timeout=SEEDING)
    await bench.pool.execute("VACUUM (ANALYZE) usage_daily")
    until = datetime.now(UTC).date() + timedelta(days=1)
    since = until - timedelta(days=32)
    totals: list[int] = []

    async def tokendb_op(index: int) -> int:
        report = await tokendb.usage_report(user=user, since=since, until=until)
        totals.append(sum(row.tokens for row in report))
        return 1

    async def raw_op(index: int) -> int:
        report = await raw.usage_report(bench.pool, user, since, until)
        totals.append(sum(row["tokens"] for row in report))
        return 1

    async def check() -> list[str]:
        return [f"a report summed to {n}, not {rows}" for n in set(totals) if n != rows]

    return Side(tokendb_op, check), Side(raw_op, check)


def _verify(keys: int) -> Callable[[Bench], Awaitable[tuple[Side, Side]]]:
    """Every caller verifies ``keys`` keys in turn; tokendb also keeps last_used_at (throttled)."""

    async def build(bench: Bench) -> tuple[Side, Side]:
        started = datetime.now(UTC)
        (user,) = await seed_users(bench, 1, START_BALANCE)
        issued = [await tokendb.issue_api_key(user=user, name="bench") for _ in range(keys)]
        secrets = [secret for _, secret in issued]
        for secret in secrets:  # every key touched once: the run itself touches none
            await tokendb.verify_api_key(secret=secret)
        turn = 0

        def next_secret() -> str:
            nonlocal turn
            turn += 1
            return secrets[turn % keys]

        async def op(index: int) -> int:
            await tokendb.verify_api_key(secret=next_secret())
            return 1

        async def check() -> list[str]:
            touched = await bench.pool.fetch(
                "SELECT last_used_at FROM api_keys WHERE user_id = $1", user
            )
            window = datetime.now(UTC) - started
            stamps = {row["last_used_at"] for row in touched}
            if None in stamps or min(stamps) < started:
                return [f"last_used_at not kept: {sorted(stamps, key=str)[:3]}"]
            if window < DEFAULT_TOUCH_INTERVAL and len(stamps) > keys:
                return ["last_used_at written again within the interval"]
            return []

        async def raw_op(index: int) -> int:
            await raw.verify(bench.pool, next_secret())
            return 1

        async def nothing() -> list[str]:
            return []

        return Side(op, check), Side(raw_op, nothing)

    return build


async def _add_message(bench: Bench) -> tuple[Side, Side]:
    """Each caller bills messages to a session of its own user."""
    callers = bench.options.concurrency

    async def side(use_tokendb: bool) -> Side:
        users = await seed_users(bench, callers, START_BALANCE)
        sessions: list[UUID] = []
        for user in users:
            api_key, _ = await tokendb.issue_api_key(user=user, name="bench")
            sessions.append((await tokendb.start_chat(api_key=api_key, model="bench-model")).id)
        billed: Counter[UUID] = Counter()

        async def op(index: int) -> int:
            if use_tokendb:
                await tokendb.add_message(
                    session=sessions[index], role="user", content=MESSAGE, tokens=1
                )
            else:
                await raw.add_message(bench.pool, sessions[index], MESSAGE, 1)
            billed[users[index]] += 1
            return 1

        balances = balances_check(bench, START_BALANCE, billed, -1)

        async def check() -> list[str]:
            return await balances() + [f"chat books: {d}" for d in await tokendb.audit_chats()]

        return Side(op, check)

    return await side(True), await side(False)


HELD, USED = 10, 7
"""One completion's estimate and what it used."""


async def _hold_capture(bench: Bench) -> tuple[Side, Side]:
    """Each call holds ``HELD`` tokens of a random user, then captures ``USED`` of them."""
    ttl = timedelta(minutes=5)

    async def side(use_tokendb: bool) -> Side:
        users = bench.options.users
        pick = _picker(await seed_users(bench, users, START_BALANCE), seed=users)
        used: Counter[UUID] = Counter()

        async def op(index: int) -> int:
            user = pick()
            if use_tokendb:
                held = await tokendb.hold(user=user, amount=HELD, ttl=ttl)
                await tokendb.capture(hold=held, amount=USED)
            else:
                await raw.hold_and_capture(bench.pool, user, HELD, USED, ttl)
            used[user] += USED
            return 1

        balances = balances_check(bench, START_BALANCE, used, -1)

        async def check() -> list[str]:
            return await balances() + [f"holds: {d}" for d in await tokendb.audit_holds()]

        return Side(op, check)

    return await side(True), await side(False)


def _list_page(rows: Callable[[Options], int]) -> Callable[[Bench], Awaitable[tuple[Side, Side]]]:
    async def build(bench: Bench) -> tuple[Side, Side]:
        user = await history_user(bench, rows(bench.options))
        pages: list[int] = []

        async def tokendb_op(index: int) -> int:
            page = await tokendb.list_transactions(user=user, limit=PAGE)
            pages.append(len(page))
            return 1

        async def raw_op(index: int) -> int:
            pages.append(len(await raw.first_page(bench.pool, user, PAGE)))
            return 1

        async def check() -> list[str]:
            problems = [f"a page had {n} rows, not {PAGE}" for n in set(pages) if n != PAGE]
            page = await tokendb.list_transactions(user=user, limit=PAGE)
            keys = [(t.created_at, t.id) for t in page]
            if keys != sorted(keys, reverse=True):
                problems.append("the page is not newest first")
            return problems

        return Side(tokendb_op, check), Side(raw_op, check)

    return build


def all_scenarios() -> list[Scenario]:
    hot = "1 hot user"
    many = "{users:,} users"
    return [
        Scenario(
            "charge-hot",
            f"charge · {hot} · one statement per call",
            "64 callers charge 1 token of the same user; coalescing off, so every call is "
            "one statement queueing on the user's row lock (baseline: the same statement).",
            lambda bench: _movements(bench, 1, "usage"),
            target=0.9,
        ),
        Scenario(
            "charge-users",
            f"charge · {many} · one statement per call",
            "64 callers charge 1 token of random users; coalescing off (baseline: the same "
            "statement).",
            lambda bench: _movements(bench, bench.options.users, "usage"),
            target=0.9,
        ),
        Scenario(
            "coalesced-hot",
            f"charge · {hot} · coalesced (default)",
            "The same calls with tokendb's default group commit, against the baseline's "
            "one statement per call.",
            lambda bench: _movements(bench, 1, "usage"),
            target=10.0,
            coalesce=True,
        ),
        Scenario(
            "coalesced-users",
            f"charge · {many} · coalesced (default)",
            "Random users, group commit, against one statement per call.",
            lambda bench: _movements(bench, bench.options.users, "usage"),
            target=4.0,
            coalesce=True,
        ),
        Scenario(
            "coalesced-lone",
            f"charge · {many} · coalesced, 1 caller",
            "A lone caller with coalescing on: no batch ever forms, and there is no timer, "
            "so a call costs what one statement costs.",
            lambda bench: _movements(bench, bench.options.users, "usage"),
            target=0.9,
            coalesce=True,
            callers=lambda options: 1,
        ),
        Scenario(
            "coalesced-locked",
            f"charge · {many} · coalesced, 1 more user's row locked",
            "The coalesced calls while another user's row is held locked and a caller of "
            f"that user keeps giving up after {GIVE_UP:g} s (never charged); baseline: the "
            "same tokendb calls with nothing locked. Target: p99 ≤ 2× the baseline's.",
            _locked,
            coalesce=True,
        ),
        Scenario(
            "charge-many",
            f"charge_many · {{batch}} per call · {many}",
            "One caller sends batches of charges; baseline: the same batch statement by hand "
            "(the ceiling coalescing approaches).",
            _charge_many,
            target=0.9,
            callers=lambda options: 1,
        ),
        Scenario(
            "top-up",
            f"top_up · {many}",
            "64 callers credit 1 token to random users (baseline: the same statement).",
            lambda bench: _movements(bench, bench.options.users, "topup"),
            target=0.9,
        ),
        Scenario(
            "verify",
            "verify_api_key · 1 hot key · cached (default)",
            "64 callers verify the same key, answered by the verify cache; last_used_at "
            "written at most once a minute (baseline: the SELECT by hash joined to users).",
            _verify(1),
            target=3.0,
        ),
        Scenario(
            "verify-cold",
            f"verify_api_key · {COLD_KEYS:,} keys · cache of 64",
            "64 callers verify keys in turn, each evicted before it comes back: every call "
            "a lookup, plus the cache's bookkeeping (baseline: the same SELECT).",
            _verify(COLD_KEYS),
            target=0.9,
            verify_cache_size=64,
        ),
        Scenario(
            "verify-off",
            "verify_api_key · 1 hot key · cache off",
            "The hot key with init(verify_cache=False): the lookup on every call "
            "(baseline: the same SELECT).",
            _verify(1),
            target=0.9,
            verify_cache=False,
        ),
        Scenario(
            "pgbouncer-charge",
            f"charge · {many} · one statement per call · through PgBouncer",
            "charge-users with both sides through PgBouncer (transaction pooling): tokendb "
            "with ?pgbouncer=true, the baseline's asyncpg pool with statement_cache_size=0.",
            lambda bench: _movements(bench, bench.options.users, "usage"),
            pgbouncer=True,
        ),
        Scenario(
            "pgbouncer-coalesced",
            f"charge · {many} · coalesced (default) · through PgBouncer",
            "coalesced-users through PgBouncer, against one statement per call through it.",
            lambda bench: _movements(bench, bench.options.users, "usage"),
            coalesce=True,
            pgbouncer=True,
        ),
        Scenario(
            "pgbouncer-verify",
            "verify_api_key · 1 hot key · cache off · through PgBouncer",
            "verify-off through PgBouncer: the lookup on every call, both sides unprepared.",
            _verify(1),
            verify_cache=False,
            pgbouncer=True,
        ),
        Scenario(
            "pgbouncer-verify-cached",
            "verify_api_key · 1 hot key · cached (default) · through PgBouncer",
            "verify through PgBouncer, the cache listening on a direct connection "
            "(listen_url); baseline: the SELECT through PgBouncer.",
            _verify(1),
            pgbouncer=True,
        ),
        Scenario(
            "add-message",
            "add_message · 64 sessions",
            "Each caller stores a message and bills 1 token to its own session's user in one "
            "statement (baseline: the same statement).",
            _add_message,
            target=0.8,
        ),
        Scenario(
            "hold-capture",
            f"hold + capture · {many}",
            "64 callers bill one completion each: hold 10 tokens of a random user, then "
            "capture 7 (baseline: the same two statements).",
            _hold_capture,
            target=0.9,
        ),
        Scenario(
            "charge-limited",
            f"charge · {many} · through a key with a limit",
            "64 callers charge 1 token of random users through each user's key with a "
            "daily limit: the key's row lock, the window read after it, the user's lock, the "
            "debit, in one transaction (baseline: the same statements, raw).",
            _limited,
            target=0.8,
        ),
        Scenario(
            "usage-report",
            "usage_report · {history_rows:,} usage rows over 30 days",
            "One caller reads one user's usage per day, model and key for 32 days; the "
            "user has history_rows ledger usage rows (3 models, 1 key) spread over 30 days "
            "(baseline: the same statement). Issue 14: p50 at most 10 ms.",
            _usage_report,
            callers=lambda options: 1,
        ),
        Scenario(
            "list-small",
            "list_transactions · {small_history_rows:,} rows",
            "One caller reads the newest page (50 rows) of a user with a short history.",
            _list_page(lambda options: options.small_history_rows),
            target=0.9,
            callers=lambda options: 1,
        ),
        Scenario(
            "list-large",
            "list_transactions · {history_rows:,} rows",
            "The same page of a user with a long history: keyset pagination on the "
            "(user_id, created_at DESC, id DESC) index costs the same.",
            _list_page(lambda options: options.history_rows),
            target=0.9,
            callers=lambda options: 1,
        ),
    ]
