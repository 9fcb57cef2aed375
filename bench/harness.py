"""Timing: closed-loop callers, interleaved rounds, medians, latency percentiles, RSS."""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter

Op = Callable[[int], Awaitable[int]]
"""One call of a scenario by caller ``index``; returns how many operations it performed."""


@dataclass(frozen=True)
class Run:
    """One timed run of one side of a scenario (the latencies are not kept: a long run
    must not grow the process, so that RSS says something about tokendb)."""

    ops: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0


def percentile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of sorted latencies in seconds, in milliseconds."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


async def closed_loop(op: Op, *, concurrency: int, duration: float) -> Run:
    """``concurrency`` callers each calling ``op`` back to back for ``duration`` seconds."""
    latencies: list[float] = []
    done = 0
    deadline = perf_counter() + duration

    async def caller(index: int) -> None:
        nonlocal done
        while perf_counter() < deadline:
            started = perf_counter()
            count = await op(index)  # not `done += await ...`: that reads `done` before the await
            latencies.append(perf_counter() - started)
            done += count

    started = perf_counter()
    await asyncio.gather(*(caller(index) for index in range(concurrency)))
    seconds = perf_counter() - started
    latencies.sort()
    return Run(done, seconds, percentile(latencies, 0.50), percentile(latencies, 0.99))


@dataclass(frozen=True)
class Summary:
    """The median of a side's rounds."""

    ops_per_s: float
    p50_ms: float
    p99_ms: float
    rounds: list[float]

    @classmethod
    def of(cls, runs: list[Run]) -> Summary:
        return cls(
            ops_per_s=statistics.median(run.ops_per_s for run in runs),
            p50_ms=statistics.median(run.p50_ms for run in runs),
            p99_ms=statistics.median(run.p99_ms for run in runs),
            rounds=[round(run.ops_per_s, 1) for run in runs],
        )


def rss_mb() -> float:
    """The resident set size of this process now, in MiB (Linux; else the peak)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
