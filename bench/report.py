"""The results as a terminal table, Markdown (``bench/RESULTS.md``) and JSON."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from bench.runner import Report, Result

HEADER = (
    "scenario",
    "callers",
    "tokendb ops/s",
    "raw ops/s",
    "ratio",
    "target",
    "tokendb p50/p99 ms",
    "raw p50/p99 ms",
    "books",
)


def _cells(result: Result) -> tuple[str, ...]:
    target = "" if result.target is None else f"≥ {result.target:g}×"
    if result.met is not None:
        target += " ✓" if result.met else " ✗"
    return (
        result.title,
        str(result.callers),
        f"{result.tokendb.ops_per_s:,.0f}",
        f"{result.raw.ops_per_s:,.0f}",
        f"{result.ratio:.2f}×",
        target,
        f"{result.tokendb.p50_ms:.2f} / {result.tokendb.p99_ms:.2f}",
        f"{result.raw.p50_ms:.2f} / {result.raw.p99_ms:.2f}",
        "ok" if not result.problems else "WRONG",
    )


def notes(report: Report) -> list[str]:
    """The cross-scenario findings: history scaling, the batching ceiling, memory."""
    lines = []
    small, large = report.result("list-small"), report.result("list-large")
    if small and large and small.tokendb.p50_ms:
        scale = large.tokendb.p50_ms / small.tokendb.p50_ms
        lines.append(
            f"list_transactions p50 at {report.options.history_rows:,} rows is "
            f"{scale:.2f}× the p50 at {report.options.small_history_rows:,} rows "
            f"(target ≤ 2×) {'✓' if scale <= 2 else '✗'}"
        )
    ceiling = report.result("charge-many")
    for key in ("coalesced-hot", "coalesced-users"):
        coalesced = report.result(key)
        if coalesced and ceiling and ceiling.raw.ops_per_s:
            lines.append(
                f"{coalesced.title}: {coalesced.tokendb.ops_per_s / ceiling.raw.ops_per_s:.0%} "
                f"of the hand-written batch statement's {ceiling.raw.ops_per_s:,.0f}/s"
            )
    locked = report.result("coalesced-locked")
    if locked and locked.raw.p99_ms:
        ratio = locked.tokendb.p99_ms / locked.raw.p99_ms
        lines.append(
            f"{locked.title}: the other users' p99 is {ratio:.2f}× their p99 with nothing "
            f"locked (target ≤ 2×) {'✓' if ratio <= 2 else '✗'}"
        )
    for key, direct_key in (
        ("pgbouncer-charge", "charge-users"),
        ("pgbouncer-coalesced", "coalesced-users"),
        ("pgbouncer-verify", "verify-off"),
    ):
        through, direct = report.result(key), report.result(direct_key)
        if through and direct and direct.tokendb.ops_per_s and direct.raw.ops_per_s:
            ours = through.tokendb.ops_per_s / direct.tokendb.ops_per_s
            theirs = through.raw.ops_per_s / direct.raw.ops_per_s
            lines.append(
                f"{through.title}: tokendb at {ours:.0%} of its direct throughput, raw asyncpg "
                f"at {theirs:.0%} of its own (the extra hop and no statement cache)"
            )
    rounds = [mb for result in report.results for mb in result.rss_mb]
    if rounds:
        growth = max(report.results, key=lambda r: r.rss_mb[-1] - r.rss_mb[0])
        lines.append(
            f"benchmark process RSS: {report.rss_start_mb:.0f} MiB at start, "
            f"{rounds[0]:.0f} MiB after the first round, {rounds[-1]:.0f} MiB after the last "
            f"({len(rounds)} rounds, peak {max(rounds):.0f} MiB); within one scenario at most "
            f"{growth.rss_mb[-1] - growth.rss_mb[0]:+.1f} MiB from its first round to its last "
            f"({growth.title})"
        )
    return lines


def table(report: Report) -> str:
    rows = [HEADER, *(_cells(result) for result in report.results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = [
        " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown(report: Report, command: str) -> str:
    options = report.options
    out = [
        "# tokendb benchmark results",
        "",
        f"Measured {report.started:%Y-%m-%d %H:%M} UTC with `{command}`.",
        "",
        "Machine: " + ", ".join(f"{key} {value}" for key, value in report.machine.items()) + ".",
        f"Sizes: {options.rounds} interleaved rounds of {options.duration:g} s per side "
        f"(medians shown; the ratio is the median of the rounds' ratios), "
        f"{options.pool_size} pooled connections on each side, "
        f"{options.users:,} users, history {options.small_history_rows:,} and "
        f"{options.history_rows:,} rows.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" for _ in HEADER) + "|",
        *("| " + " | ".join(_cells(result)) + " |" for result in report.results),
        "",
        *(f"- {line}" for line in notes(report)),
        "",
        "## Scenarios",
        "",
        *(f"- **{result.title}**: {result.meaning}" for result in report.results),
        "",
    ]
    problems = [f"- {r.title}: {p}" for r in report.results for p in r.problems]
    if problems:
        out += ["## Books wrong", "", *problems, ""]
    return "\n".join(out)


def as_json(report: Report, command: str) -> str:
    data: dict[str, Any] = {
        "command": command,
        "started": report.started.isoformat(),
        "machine": report.machine,
        "options": {**asdict(report.options), "only": sorted(report.options.only)},
        "rss_start_mb": report.rss_start_mb,
        "notes": notes(report),
        "results": [
            {
                "key": result.key,
                "title": result.title,
                "callers": result.callers,
                "target": result.target,
                "ratio": round(result.ratio, 3),
                "met": result.met,
                "tokendb": asdict(result.tokendb),
                "raw": asdict(result.raw),
                "problems": result.problems,
                "rss_mb": result.rss_mb,
            }
            for result in report.results
        ],
    }
    return json.dumps(data, indent=2)
