"""Running the scenarios: a throw-away database, interleaved rounds, books checked after each."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import tokendb
from bench import raw
from bench.harness import Run, Summary, closed_loop, machine, rss_mb
from bench.scenarios import Bench, Options, Scenario, all_scenarios
from tests import pgbouncer
from tokendb.connection import DEFAULT_LOCK_TIMEOUT, DEFAULT_STATEMENT_TIMEOUT
from tokendb.testing import _through_pooler, throwaway_database


@dataclass
class Result:
    """One scenario's medians for both sides, and what the checks found."""

    key: str
    title: str
    meaning: str
    callers: int
    target: float | None
    tokendb: Summary
    raw: Summary
    problems: list[str]
    rss_mb: list[float]

    @property
    def ratio(self) -> float:
        """The median of the rounds' ratios: each round's two runs met the same conditions."""
        pairs = zip(self.tokendb.rounds, self.raw.rounds, strict=True)
        return statistics.median(ours / theirs for ours, theirs in pairs if theirs)

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.ratio >= self.target


@dataclass
class Report:
    options: Options
    started: datetime
    machine: dict[str, str]
    results: list[Result] = field(default_factory=list)
    rss_start_mb: float = 0.0

    def result(self, key: str) -> Result | None:
        return next((result for result in self.results if result.key == key), None)

    @property
    def ok(self) -> bool:
        return all(not result.problems for result in self.results)


async def run(options: Options, progress: Callable[[str], None]) -> Report:
    """Run the selected scenarios on a new database; dropped afterwards."""
    selected = [s for s in all_scenarios() if not options.only or s.key in options.only]
    scenarios = [s for s in selected if not s.pgbouncer]
    report = Report(options, datetime.now(UTC), machine(), rss_start_mb=rss_mb())
    async with throwaway_database(options.server_url, prefix="tokendb_bench") as url:
        progress(f"database {url.rsplit('/', 1)[-1]}: migrating")
        await tokendb.migrate(url)
        pool = await raw.create_pool(url, size=options.pool_size)
        bench = Bench(options, url, pool)
        try:
            version = await pool.fetchval("SHOW server_version")
            report.machine["postgresql"] = str(version).split()[0]
            for setting in ("fsync", "synchronous_commit"):
                report.machine[setting] = str(await pool.fetchval(f"SHOW {setting}"))
            for scenario in scenarios:
                result = await _scenario(bench, scenario, progress)
                report.results.append(result)
            through = [s for s in selected if s.pgbouncer]
            if through:
                report.results += await _through_pgbouncer(bench, through, progress)
        finally:
            await tokendb.close()
            await pool.close()
    return report


async def _through_pgbouncer(
    direct: Bench, scenarios: list[Scenario], progress: Callable[[str], None]
) -> list[Result]:
    """``scenarios`` with both sides through a PgBouncer (transaction pooling) of their own."""
    if pgbouncer.binary() is None:
        progress("PgBouncer scenarios skipped: pgbouncer is not installed")
        return []
    options = direct.options
    name = await direct.pool.fetchval("SELECT current_database()")
    # What init() sets on a direct connection, as the database's defaults (docs/pgbouncer.md).
    for setting, seconds in (
        ("statement_timeout", DEFAULT_STATEMENT_TIMEOUT),
        ("lock_timeout", DEFAULT_LOCK_TIMEOUT),
    ):
        await direct.pool.execute(
            f"ALTER DATABASE \"{name}\" SET {setting} = '{round(seconds * 1000)}ms'"
        )
    results = []
    with pgbouncer.running(options.server_url, pool_size=options.pool_size * 2) as port:
        url = _through_pooler(
            direct.url, pgbouncer.with_port(options.server_url, port, query="pgbouncer=true")
        )
        pool = await raw.create_pool(url, size=options.pool_size)
        bench = Bench(options, url, pool, listen_url=direct.url)
        try:
            for scenario in scenarios:
                results.append(await _scenario(bench, scenario, progress))
        finally:
            await tokendb.close()
            await pool.close()
    return results


async def _scenario(bench: Bench, scenario: Scenario, progress: Callable[[str], None]) -> Result:
    options = bench.options
    title = scenario.title.format(**vars(options))
    callers = scenario.callers(options)
    progress(f"{title}: seeding")
    await tokendb.init(
        bench.url,
        min_size=options.pool_size,
        max_size=options.pool_size,
        coalesce_charges=scenario.coalesce,
        verify_cache=scenario.verify_cache,
        verify_cache_size=scenario.verify_cache_size,
        listen_url=bench.listen_url,
    )
    ours, theirs = await scenario.build(bench)
    sides = [("tokendb", ours), ("raw", theirs)]
    for _, side in sides:  # prepared statements, pool connections, caches
        await closed_loop(side.op, concurrency=callers, duration=options.warmup)
    runs: dict[str, list[Run]] = {"tokendb": [], "raw": []}
    rss: list[float] = []
    for number in range(options.rounds):
        # Interleaved, alternating who goes first, so drift (autovacuum, a
        # neighbour's load, a growing table) hits both sides alike.
        for name, side in sides if number % 2 == 0 else sides[::-1]:
            runs[name].append(
                await closed_loop(side.op, concurrency=callers, duration=options.duration)
            )
        rss.append(round(rss_mb(), 1))
        progress(
            f"{title}: round {number + 1}/{options.rounds}: tokendb "
            f"{runs['tokendb'][-1].ops_per_s:,.0f}/s, raw {runs['raw'][-1].ops_per_s:,.0f}/s"
        )
    problems = await ours.check() + await theirs.check()
    problems += [f"ledger: {d}" for d in await tokendb.audit_ledger()]
    for problem in problems:
        progress(f"{title}: BOOKS WRONG: {problem}")
    return Result(
        key=scenario.key,
        title=title,
        meaning=scenario.meaning,
        callers=callers,
        target=scenario.target,
        tokendb=Summary.of(runs["tokendb"]),
        raw=Summary.of(runs["raw"]),
        problems=problems,
        rss_mb=rss,
    )
