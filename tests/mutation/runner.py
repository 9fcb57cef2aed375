"""The mutation run: every mutant of every target, tested by the target's tests.

Mutants come from cosmic-ray (its operators and its engine, which applies one
change to the file on disk and puts the file back), plus the SQL operators
of :mod:`tests.mutation.operators`. cosmic-ray would start a fresh
``pytest`` for each mutant; about three seconds of that is importing pytest,
Tortoise, hypothesis and the rest, so each worker here imports those once and
forks a child per mutant that imports tokendb itself (mutated) and runs
``pytest -x`` on the target's tests. Each worker mutates a copy of the
repository of its own, so ``--jobs`` workers run side by side; the working
tree is never changed.

A mutant is *killed* when the tests fail (or time out), *survived* when they
pass. Survivors listed in :data:`tests.mutation.equivalent.EQUIVALENT` are
equivalent (no test can tell them apart); the score is killed / (all −
equivalent).
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import importlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cosmic_ray.ast import ast_nodes, get_ast_from_path
from cosmic_ray.ast.ast_query import ASTQuery
from cosmic_ray.mutating import use_mutation
from cosmic_ray.plugins import get_operator

from tests.mutation import operators, selection
from tests.mutation.equivalent import EQUIVALENT
from tests.mutation.targets import Target

__all__ = ["Mutant", "enumerate_mutants", "run", "score"]

REPOSITORY = Path(__file__).resolve().parents[2]
RESULTS = REPOSITORY / ".mutation"
"""Where a run writes ``results.json`` and ``report.md`` (not committed)."""

# Imported once per worker, before forking: what every test run needs and
# tokendb is not. Each child then imports tokendb from the (mutated) copy.
_WARM = (
    "pytest",
    "_pytest.python",
    "_pytest.fixtures",
    "pytest_asyncio",
    "hypothesis",
    "hypothesis.strategies",
    "asyncpg",
    "tortoise",
    "tortoise.models",
    "tortoise.fields",
    "tortoise.transactions",
    "tortoise.backends.asyncpg",
    "aerich",
    "argon2",
    "email_validator",
    "dotenv",
    "typer",
    "rich",
    "pydantic",
    "fastapi",
    "starlette",
    "httpx",
    "asgi_lifespan",
)
DATABASE_PREFIX = "tokendb_mutant"
"""The throw-away databases of the mutants' test runs (dropped at the end of a run)."""
_PYTEST_ARGS = ("-x", "-q", "-rfE", "-p", "no:cacheprovider", "--no-header")
_COPY_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv*",
    ".mutation",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".hypothesis",
)


@dataclass
class Mutant:
    """One change to one module, and what the target's tests made of it."""

    module: str
    operator: str
    occurrence: int
    line: int
    definition: str | None
    tests: tuple[str, ...]
    outcome: str = ""
    """``killed``, ``timeout`` (killed too), ``survived`` or ``error`` (the harness failed)."""
    killed_by: str = ""
    seconds: float = 0.0
    diff: str = ""
    key: str = ""
    """Module, definition and the changed lines: stable while line numbers move."""

    @property
    def equivalent(self) -> bool:
        return self.outcome == "survived" and self.key in EQUIVALENT


def enumerate_mutants(
    targets: Sequence[Target], covered: selection.CoverageMap | None = None
) -> list[Mutant]:
    """Every mutant of ``targets``, as cosmic-ray numbers them (operator, occurrence).

    With ``covered``, each mutant gets the tests that executed the code it
    changes (:func:`tests.mutation.selection.select_tests`); else all of its
    target's tests.
    """
    mutants: list[Mutant] = []
    modules = {
        path.relative_to(REPOSITORY).as_posix(): selection.Scopes(path.read_text())
        for path in sorted((REPOSITORY / "tokendb").rglob("*.py"))
    }
    for target in targets:
        tree = get_ast_from_path(REPOSITORY / target.module)
        lines = modules[target.module].lines
        for name in operators.OPERATORS:
            operator = get_operator(name)()
            positions = (
                (node, start)
                for node in ast_nodes(tree)
                for start, _ in operator.mutation_positions(node)
            )
            for occurrence, (node, (line, _)) in enumerate(positions):
                definition = ASTQuery(node).get_definition_name()
                if target.definitions and definition not in target.definitions:
                    continue
                if "pragma: no mutate" in lines[line - 1] or _no_information(name, node):
                    continue
                tests = (
                    selection.select_tests(target, line, modules, covered)
                    if covered is not None
                    else target.tests
                )
                mutants.append(
                    Mutant(target.module, name, occurrence, line, definition, tuple(tests))
                )
    return mutants


def _no_information(operator: str, node: object) -> bool:
    """Mutants that tell nothing, left out of the run.

    ``rows[0]`` -> ``rows[1]`` fails at once and ``rows[-1]`` is the same row
    of a one-row result; the bare ``*`` of a signature is no multiplication
    (cosmic-ray turns it into ``/``, which callers passing keywords never notice).
    """
    parent = getattr(node, "parent", None)
    kind = getattr(parent, "type", "")
    if operator == "core/NumberReplacer":
        return kind == "trailer" and parent.children[0].value == "["  # type: ignore[union-attr]
    if operator.startswith("core/ReplaceBinaryOperator_Mul_"):
        return kind in ("parameters", "typedargslist", "lambdef", "varargslist")
    return False


# --- the workers ---------------------------------------------------------------------

_copy: Path | None = None


def _start_worker(copies: multiprocessing.Queue[Path], canary: Sequence[str]) -> None:
    """Take a copy of the repository of this worker's own; import what every child needs.

    Then run the ``canary`` tests unmutated, as every mutant's tests will be
    run: they must pass, or every mutant would look killed.
    """
    global _copy
    _copy = copies.get()
    os.chdir(_copy)
    sys.dont_write_bytecode = True  # a mutated module must never be read from a stale .pyc
    for name in _WARM:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    leaked = [name for name in sys.modules if name == "tokendb" or name.startswith("tokendb.")]
    assert not leaked, f"warming up imported {leaked}: children would not see mutations"
    outcome, failed, _ = _run_tests(canary, timeout=600)
    if outcome != "survived":
        log = (_copy / ".mutation-pytest.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"unmutated, the canary tests fail in a worker ({failed}):\n{log}")


_HUNG = 124
"""Exit code of a child whose test ran past its deadline (:class:`_Deadlines`)."""


class _Deadlines:
    """pytest plugin of a mutant's run: a test that runs far longer than it did
    unmutated has hung (a lost wake-up, a lock never released): end the run.

    Without it a hung test would keep its worker until the whole run's timeout.
    """

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds
        self.first = True

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: Any) -> Iterator[None]:
        # The first test also pays for the session: a database created and migrated.
        limit = 15 + 3 * self.seconds.get(item.nodeid, 10) + (30 if self.first else 0)
        self.first = False

        def hung(*_: object) -> None:
            print(f"\nHUNG {item.nodeid} (over {limit:.0f} s)", flush=True)
            os._exit(_HUNG)

        signal.signal(signal.SIGALRM, hung)
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            return (yield)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)


def _run_tests(
    tests: Sequence[str], timeout: float, seconds: dict[str, float] | None = None
) -> tuple[str, str, float]:
    """``pytest -x tests`` in a forked child, in this worker's copy: (outcome, failed test, s).

    ``seconds`` (each test's duration unmutated) bounds each test (:class:`_Deadlines`).
    """
    assert _copy is not None
    log = _copy / ".mutation-pytest.log"
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: import tokendb and the tests from the copy, run pytest
        code = 3
        try:
            os.setpgid(0, 0)
            out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(out, 1)
            os.dup2(out, 2)
            for name in [n for n in sys.modules if n.split(".")[0] in ("tests", "tokendb")]:
                del sys.modules[name]
            sys.path[:] = [str(_copy), *(p for p in sys.path if Path(p) != REPOSITORY)]
            import pytest

            try:
                testing = importlib.import_module("tokendb.testing")
            except Exception:  # the mutant broke importing tokendb: killed
                traceback.print_exc()
                code = 1
            else:
                # Databases of their own name, so a run can drop what killed children left.
                defaults = testing.throwaway_database.__wrapped__.__kwdefaults__
                defaults["prefix"] = DATABASE_PREFIX
                plugins = [_Deadlines(seconds)] if seconds is not None else []
                code = int(pytest.main([*_PYTEST_ARGS, *tests], plugins=plugins))
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    deadline = started + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", "", time.monotonic() - started
        time.sleep(0.02)
    elapsed = time.monotonic() - started
    code = os.waitstatus_to_exitcode(status)
    output = log.read_text(errors="replace")
    if code == _HUNG:
        hung = next((line for line in output.splitlines() if line.startswith("HUNG ")), "")
        return "timeout", hung.removeprefix("HUNG "), elapsed
    failed = next(
        (
            line.split(" - ")[0].split(" ", 1)[1]
            for line in output.splitlines()
            if line.startswith(("FAILED ", "ERROR "))
        ),
        "",
    )
    if code == 0:
        return "survived", "", elapsed
    if code in (1, 2, 3) or code < 0:  # failed, interrupted (collection), internal error, killed
        return "killed", failed or f"pytest exit code {code}", elapsed
    return "error", f"pytest exit code {code}: {output[-2000:]}", elapsed


def _test_mutant(mutant: Mutant, timeout: float, seconds: dict[str, float]) -> Mutant:
    operator = get_operator(mutant.operator)()
    path = Path(mutant.module)
    original = path.read_text()
    with use_mutation(path, operator, mutant.occurrence) as (_, mutated):
        if mutated is None:
            mutant.outcome, mutant.killed_by = "error", "cosmic-ray made no change"
            return mutant
        mutant.diff = "".join(
            difflib.unified_diff(
                original.splitlines(keepends=True),
                mutated.splitlines(keepends=True),
                f"a/{mutant.module}",
                f"b/{mutant.module}",
                n=0,
            )
        )
        mutant.key = _key(mutant)
        mutant.outcome, mutant.killed_by, mutant.seconds = _run_tests(
            mutant.tests, timeout, seconds
        )
    assert path.read_text() == original, f"{path} was not restored"
    return mutant


def _key(mutant: Mutant) -> str:
    lines = mutant.diff.splitlines()
    removed = " ".join(
        x[1:].strip() for x in lines if x.startswith("-") and not x.startswith("---")
    )
    added = " ".join(x[1:].strip() for x in lines if x.startswith("+") and not x.startswith("+++"))
    return f"{mutant.module}::{mutant.definition or '<module>'}: {removed} => {added}"


# --- the run -------------------------------------------------------------------------


@contextlib.contextmanager
def _copies(count: int) -> Iterator[list[Path]]:
    """``count`` copies of the repository (without .git and venvs), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="tokendb-mutation-"))
    try:
        paths = []
        for index in range(count):
            path = root / f"copy{index}"
            shutil.copytree(REPOSITORY, path, ignore=_COPY_IGNORE)
            paths.append(path)
        yield paths
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _drop_leftover_databases() -> None:
    """Drop the databases of test runs killed on a timeout (their teardown never ran).

    Called once no worker will fork again: importing tokendb here is safe then.
    """
    import asyncpg

    from tokendb.testing import test_server_url

    async def drop() -> None:
        conn = await asyncpg.connect(test_server_url())
        try:
            rows = await conn.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE $1", DATABASE_PREFIX + r"\_%"
            )
            for row in rows:
                await conn.execute(f'DROP DATABASE IF EXISTS "{row[0]}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(drop())


@contextlib.contextmanager
def _cancelling_on_error(pool: ProcessPoolExecutor) -> Iterator[None]:
    """On an error (or Ctrl-C), drop the mutants not started yet instead of running them all."""
    try:
        yield
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise


@contextlib.contextmanager
def _dropping_leftovers() -> Iterator[None]:
    try:
        yield
    finally:
        _drop_leftover_databases()


def _check_imports_from(copy: Path) -> None:
    found = subprocess.run(
        [sys.executable, "-c", "import tokendb; print(tokendb.__file__)"],
        cwd=copy,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(found).is_relative_to(copy), f"tokendb imports from {found}, not the copy"


def run(targets: Sequence[Target], *, jobs: int, log: bool = True) -> list[Mutant]:
    """Test every mutant of ``targets`` with ``jobs`` workers; return them with their outcomes.

    Raises :class:`RuntimeError` when the tests fail before anything is mutated
    (the run would mean nothing).
    """
    say = print if log else (lambda *args, **kwargs: None)
    context = multiprocessing.get_context("fork")
    copies: multiprocessing.Queue[Path] = context.Queue()
    with _copies(jobs) as paths:
        _check_imports_from(paths[0])
        covered = selection.coverage_map(paths[0], targets)
        say(f"coverage of the unmutated code: {covered.elapsed:.0f} s", flush=True)
        mutants = enumerate_mutants(targets, covered)
        say(f"{len(mutants)} mutants in {len(targets)} modules, {jobs} workers", flush=True)
        for path in paths:
            copies.put(path)
        with (
            _dropping_leftovers(),
            ProcessPoolExecutor(
                jobs,
                mp_context=context,
                initializer=_start_worker,
                initargs=(copies, sorted(covered.seconds, key=lambda t: covered.seconds[t])[:3]),
            ) as pool,
            _cancelling_on_error(pool),
        ):
            futures = [
                pool.submit(
                    _test_mutant,
                    m,
                    120 + 4 * selection.seconds_of(m.tests, covered),
                    covered.seconds,
                )
                for m in mutants
            ]
            done: list[Mutant] = []
            for index, future in enumerate(as_completed(futures), start=1):
                mutant = future.result()
                done.append(mutant)
                mark = "" if mutant.outcome in ("killed", "timeout") else "  <--"
                say(
                    f"[{index:4}/{len(mutants)}] {mutant.outcome:8} {mutant.seconds:5.1f}s "
                    f"{mutant.module}:{mutant.line} {mutant.operator} "
                    f"({len(mutant.tests)} tests){mark}",
                    flush=True,
                )
    order = {id(m): i for i, m in enumerate(mutants)}
    return sorted(done, key=lambda m: (m.module, m.line, m.operator, order.get(id(m), 0)))


@dataclass
class Score:
    module: str
    total: int = 0
    killed: int = 0
    equivalent: int = 0
    survived: list[Mutant] = field(default_factory=list)
    errors: list[Mutant] = field(default_factory=list)

    @property
    def rate(self) -> float:
        counted = self.total - self.equivalent - len(self.errors)
        return self.killed / counted if counted else 1.0


def score(mutants: Sequence[Mutant]) -> list[Score]:
    """Per module, then ``all``: killed / (all − equivalent − harness errors)."""
    scores: dict[str, Score] = {}
    for mutant in mutants:
        for name in (mutant.module, "all"):
            entry = scores.setdefault(name, Score(name))
            entry.total += 1
            if mutant.outcome in ("killed", "timeout"):
                entry.killed += 1
            elif mutant.equivalent:
                entry.equivalent += 1
            elif mutant.outcome == "survived":
                entry.survived.append(mutant)
            else:
                entry.errors.append(mutant)
    return sorted(scores.values(), key=lambda s: (s.module == "all", s.module))


def report(mutants: Sequence[Mutant], runs: dict[str, Measured]) -> str:
    """The runs as Markdown: the score per module (with the commit and date
    measured), then every survivor not known equivalent."""
    rows = [
        "| module | mutants | killed | equivalent | survived | score | commit | run (UTC) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in score(mutants):
        run = runs.get(entry.module)
        when = f"{run.commit} | {run.date}, {run.seconds / 60:.0f} min" if run else " | "
        rows.append(
            f"| {entry.module} | {entry.total} | {entry.killed} | {entry.equivalent} "
            f"| {len(entry.survived)} | {entry.rate:.1%} | {when} |"
        )
    text = [f"Mutation runs: {len(mutants)} mutants.", "", *rows, ""]
    survivors = [m for m in mutants if m.outcome == "survived" and not m.equivalent]
    errors = [m for m in mutants if m.outcome == "error"]
    text.append(f"## Survivors not known to be equivalent ({len(survivors)})")
    for mutant in survivors:
        text += ["", f"`{mutant.key}`", "", "```diff", mutant.diff.rstrip(), "```"]
    if errors:
        text += ["", f"## Harness errors ({len(errors)})"]
        text += [f"- {m.module}:{m.line} {m.operator}: {m.killed_by[:300]}" for m in errors]
    return "\n".join(text) + "\n"


def measured_commit() -> str:
    """The commit measured: HEAD, with ``+changes`` when tokendb/ or tests/ differ from it."""

    def git(*args: str) -> str:
        found = subprocess.run(["git", *args], cwd=REPOSITORY, capture_output=True, text=True)
        return found.stdout.strip() if found.returncode == 0 else ""

    head = git("rev-parse", "--short=10", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--", "tokendb", "tests") else "")


@dataclass
class Measured:
    """When and at which commit a module's mutants were last run."""

    commit: str
    date: str
    """The run's start, UTC (ISO 8601, to the minute)."""
    seconds: float
    """The whole run's duration (all of its modules)."""


def save(mutants: Sequence[Mutant], seconds: float, *, started: str, replace: bool = True) -> Path:
    """Write the run's results and its report.

    Without ``replace`` (a run of some targets only), the other modules'
    results of earlier runs are kept: runs one module at a time add up to
    one report, which gives each module's commit and date.
    """
    RESULTS.mkdir(exist_ok=True)
    measured = Measured(measured_commit(), started, seconds)
    modules = {m.module for m in mutants}
    runs = {module: measured for module in modules}
    everything = list(mutants)
    if not replace and (RESULTS / "results.json").exists():
        earlier, earlier_runs = load()
        everything += [m for m in earlier if m.module not in modules]
        runs = {**{k: v for k, v in earlier_runs.items() if k not in modules}, **runs}
    everything.sort(key=lambda m: (m.module, m.line, m.operator))
    (RESULTS / "results.json").write_text(
        json.dumps(
            {
                "runs": {module: asdict(run) for module, run in sorted(runs.items())},
                "mutants": [asdict(m) for m in everything],
            },
            indent=1,
        )
    )
    path = RESULTS / "report.md"
    path.write_text(report(everything, runs))
    return path


def load() -> tuple[list[Mutant], dict[str, Measured]]:
    """The saved results: the mutants, and when and at which commit each module was run."""
    data = json.loads((RESULTS / "results.json").read_text())
    mutants = [Mutant(**{**m, "tests": tuple(m["tests"])}) for m in data["mutants"]]
    # Results of a run before runs were recorded per module have no "runs".
    runs = data.get("runs", {})
    return mutants, {module: Measured(**run) for module, run in runs.items()}
