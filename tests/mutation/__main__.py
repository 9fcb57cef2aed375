"""``python -m tests.mutation run|report|backstops``: see tests/MUTATION.md."""

from __future__ import annotations

import argparse
import signal
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.mutation",
        description="Mutation testing of tokendb's money paths and backstops (tests/MUTATION.md).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="mutate the modules of tests/mutation/targets.py and run their tests",
        description="Example: python -m tests.mutation run --jobs 2 --module ledger",
    )
    run.add_argument("--jobs", type=int, default=2, help="workers side by side (default 2)")
    run.add_argument(
        "--module",
        action="append",
        default=[],
        help="only this target (its name, e.g. ledger or _ledger_sql); repeatable; the"
        " report keeps the other modules' results of earlier runs",
    )
    commands.add_parser("report", help="print the report of the last run (.mutation/report.md)")
    backstops = commands.add_parser(
        "backstops",
        help="remove or weaken each CHECK, trigger and unique index in turn; run the schema tests",
        description="Example: python -m tests.mutation backstops --jobs 2",
    )
    backstops.add_argument("--jobs", type=int, default=2, help="test runs side by side (default 2)")
    backstops.add_argument(
        "--removed-only",
        action="store_true",
        help="only remove each backstop, do not weaken them (a quarter of the changes)",
    )
    args = parser.parse_args(argv)
    # A terminated run still removes its copies and databases (finally blocks run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if args.command == "backstops":
        from tests.mutation import backstops as backstop_run

        return backstop_run.main(jobs=args.jobs, removed_only=args.removed_only)

    from tests.mutation import runner
    from tests.mutation.targets import TARGETS

    if args.command == "report":
        mutants, runs = runner.load()
        print(runner.report(mutants, runs))
        return 0
    targets = [t for t in TARGETS if not args.module or t.name in args.module]
    if not targets:
        parser.error(f"no target named {args.module}; see tests/mutation/targets.py")
    started, date = time.monotonic(), time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    mutants = runner.run(targets, jobs=args.jobs)
    path = runner.save(mutants, time.monotonic() - started, started=date, replace=not args.module)
    print(path.read_text())
    print(f"(written to {path} and {path.with_name('results.json')})")
    overall = runner.score(runner.load()[0])[-1]
    return 0 if overall.rate >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
