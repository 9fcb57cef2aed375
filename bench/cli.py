"""``python -m bench``: parse the sizes, run, print the table, write RESULTS.md and JSON."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from bench import report
from bench.runner import run
from bench.scenarios import Options, all_scenarios
from tokendb.testing import test_server_url

HERE = Path(__file__).resolve().parent

QUICK = {
    "duration": 0.5,
    "warmup": 0.2,
    "rounds": 3,
    "users": 200,
    "history_rows": 20_000,
    "small_history_rows": 2_000,
}
"""CI size: the whole suite in well under a minute."""

_HELP = {
    "duration": "seconds each side runs per round",
    "warmup": "seconds each side runs before the first round (not measured)",
    "rounds": "interleaved rounds per scenario; medians are reported (≥ 3)",
    "concurrency": "concurrent callers of the multi-caller scenarios",
    "users": "users the random-user scenarios spread over",
    "batch": "charges per charge_many call",
    "pool_size": "pooled connections, the same for tokendb and the baseline",
    "history_rows": "ledger rows of the long-history user",
    "small_history_rows": "ledger rows of the short-history user",
}


def parser() -> argparse.ArgumentParser:
    keys = ", ".join(scenario.key for scenario in all_scenarios())
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark tokendb against hand-written asyncpg on a throw-away database.",
        epilog=(
            "Every size also reads TOKENDB_BENCH_<NAME> (e.g. TOKENDB_BENCH_DURATION=1). "
            "Example, CI size: python -m bench --quick. Scenarios: " + keys
        ),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI size: " + ", ".join(f"{key}={value}" for key, value in QUICK.items()),
    )
    for option in fields(Options):
        if option.name in _HELP:
            kind = float if option.type in ("float", float) else int
            p.add_argument(
                "--" + option.name.replace("_", "-"),
                type=kind,
                default=None,
                help=f"{_HELP[option.name]} (default {option.default})",
            )
    p.add_argument("--only", default=None, help="comma-separated scenario keys to run")
    p.add_argument(
        "--server-url",
        default=None,
        help="PostgreSQL server to create the database on (default $TOKENDB_TEST_DATABASE_URL "
        "or postgres://postgres@127.0.0.1:5432/postgres)",
    )
    p.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="where to write the Markdown table (default bench/RESULTS.md; "
        "bench/results/quick.md with --quick)",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=HERE / "results" / "latest.json",
        help="where to write the JSON results (default bench/results/latest.json)",
    )
    return p


def options_from(args: argparse.Namespace) -> Options:
    values: dict[str, Any] = {"server_url": args.server_url or test_server_url()}
    for option in fields(Options):
        if option.name not in _HELP:
            continue
        kind = float if option.type in ("float", float) else int
        given = getattr(args, option.name)
        env = os.environ.get("TOKENDB_BENCH_" + option.name.upper())
        if given is not None:
            values[option.name] = given
        elif env:
            values[option.name] = kind(env)
        elif args.quick and option.name in QUICK:
            values[option.name] = QUICK[option.name]
    only = args.only or os.environ.get("TOKENDB_BENCH_ONLY") or ""
    values["only"] = frozenset(key.strip() for key in only.split(",") if key.strip())
    unknown = values["only"] - {scenario.key for scenario in all_scenarios()}
    if unknown:
        raise SystemExit(f"unknown scenarios: {', '.join(sorted(unknown))}")
    options = Options(**values)
    if options.rounds < 3:
        raise SystemExit("--rounds must be at least 3 (the median of fewer says little)")
    return options


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    options = options_from(args)
    command = " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)])

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = asyncio.run(run(options, progress))
    print(report.table(result))
    for line in report.notes(result):
        print(line)
    default = HERE / "results" / "quick.md" if args.quick else HERE / "RESULTS.md"
    markdown = args.markdown or default
    for path, text in (
        (markdown, report.markdown(result, command)),
        (args.json, report.as_json(result, command)),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    if not result.ok:
        print("the books are wrong after at least one scenario (see above)", file=sys.stderr)
        return 1
    return 0
