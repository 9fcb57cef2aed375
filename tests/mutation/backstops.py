"""The backstop run: each database backstop removed, or weakened, in turn; the tests must notice.

The backstops are read from the catalog of a freshly migrated database, not
listed here, so a new migration's CHECKs, triggers and unique indexes are
covered the day they land:

* every CHECK constraint, unique constraint and unique index (primary keys
  aside), and every trigger of the ``public`` schema;
* for each of them, *removed*; and, finer, *weakened*: a CHECK without one of
  its top-level ``AND`` conditions or with one value fewer in an ``IN`` list;
  a trigger without one of its events (``UPDATE OR DELETE``) or of the
  ``OR`` conditions of its ``WHEN``; a trigger function with one of the SQL
  changes of :mod:`tests.mutation.sql` (a comparison, ``AND``/``OR``, a
  ``NOT``, ``FOR UPDATE`` …) in its body.

For each change, :data:`tests.mutation.targets.BACKSTOP_TESTS` run on a new
database with the change made right after migrating
(:mod:`tests.mutation.backstop_plugin`). Tests marked ``catalog`` (those that
list the backstops by name) are left out: a backstop counts as covered only
when a test sends what it refuses. The run fails when a removed backstop
goes unnoticed; weakened ones that survive are listed for a verdict.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from tests.mutation import sql
from tests.mutation.backstop_plugin import NOT_APPLIED
from tests.mutation.targets import BACKSTOP_TESTS

__all__ = ["Change", "changes", "main"]

REPOSITORY = Path(__file__).resolve().parents[2]
RESULTS = REPOSITORY / ".mutation"


@dataclass
class Change:
    """One backstop removed or weakened, as SQL to run after migrating."""

    backstop: str
    kind: str
    """``check``, ``unique`` or ``trigger``."""
    what: str
    """``removed``, or how it was weakened."""
    sql: str
    outcome: str = ""
    caught_by: str = ""

    @property
    def removed(self) -> bool:
        return self.what == "removed"


# --- reading the catalog -------------------------------------------------------------

_CHECKS = """
SELECT conname AS name, conrelid::regclass::text AS table_name,
       pg_get_constraintdef(oid) AS definition
FROM pg_constraint WHERE contype = 'c' AND connamespace = 'public'::regnamespace
ORDER BY 1
"""
_UNIQUES = """
SELECT i.indexrelid::regclass::text AS name, i.indrelid::regclass::text AS table_name,
       c.conname AS constraint_name
FROM pg_index i
JOIN pg_class t ON t.oid = i.indrelid
LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.contype = 'u'
WHERE i.indisunique AND NOT i.indisprimary AND t.relnamespace = 'public'::regnamespace
  AND t.relname <> 'aerich'
ORDER BY 1
"""
_TRIGGERS = """
SELECT t.tgname AS name, t.tgrelid::regclass::text AS table_name,
       pg_get_triggerdef(t.oid) AS definition,
       p.oid::regprocedure::text AS function, pg_get_functiondef(p.oid) AS function_definition
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_proc p ON p.oid = t.tgfoid
WHERE NOT t.tgisinternal AND c.relnamespace = 'public'::regnamespace
  AND c.relname <> 'aerich'  -- the migrations' own guard, re-created by each migration:
ORDER BY 1                   -- test_migrations' concurrent upgrades test it
"""


async def changes(url: str) -> list[Change]:
    """Every change of the run, read from the catalog of the migrated database at ``url``."""
    conn = await asyncpg.connect(url)
    try:
        checks = await conn.fetch(_CHECKS)
        uniques = await conn.fetch(_UNIQUES)
        triggers = await conn.fetch(_TRIGGERS)
    finally:
        await conn.close()
    found: list[Change] = []
    for row in checks:
        found += _check_changes(row["name"], row["table_name"], row["definition"])
    for row in uniques:
        drop = (
            f'ALTER TABLE {row["table_name"]} DROP CONSTRAINT "{row["constraint_name"]}"'
            if row["constraint_name"]
            else f"DROP INDEX {row['name']}"
        )
        found.append(Change(row["name"], "unique", "removed", drop))
    functions_done: set[str] = set()
    for row in triggers:
        found += _trigger_changes(row["name"], row["table_name"], row["definition"])
        if row["function"] not in functions_done:  # one function may serve several triggers
            functions_done.add(row["function"])
            found += _function_changes(row["name"], row["function_definition"])
    return found


def _check_changes(name: str, table: str, definition: str) -> Iterator[Change]:
    drop = f'ALTER TABLE {table} DROP CONSTRAINT "{name}"'
    yield Change(name, "check", "removed", drop)
    expression = _unwrap(definition.removeprefix("CHECK").strip())
    for what, weaker in [*_without_part(expression, "AND"), *_without_list_value(expression)]:
        sql_text = f'{drop}, ADD CONSTRAINT "{name}" CHECK ({weaker}) NOT VALID'
        yield Change(name, "check", what, sql_text)


def _trigger_changes(name: str, table: str, definition: str) -> Iterator[Change]:
    drop = f'DROP TRIGGER "{name}" ON {table}'
    yield Change(name, "trigger", "removed", drop)
    events = re.search(r" (BEFORE|AFTER|INSTEAD OF) (.+?) ON ", definition)
    if events is not None:
        names = events[2].split(" OR ")
        for index, event in enumerate(names):
            if len(names) > 1:
                fewer = " OR ".join(names[:index] + names[index + 1 :])
                weaker = definition[: events.start(2)] + fewer + definition[events.end(2) :]
                yield Change(name, "trigger", f"not on {event}", f"{drop}; {weaker}")
    when = re.search(r" WHEN \((.*)\) EXECUTE ", definition)
    if when is not None:
        condition = when[1]
        variants = [
            *_without_part(condition, "OR"),
            *(
                (
                    f"WHEN {s.start}: {s.rule} {condition[s.start : s.end]!r}",
                    sql.apply(condition, s),
                )
                for s in sql.sites(condition)
            ),
        ]
        for what, weaker in variants:
            text = definition[: when.start(1)] + weaker + definition[when.end(1) :]
            yield Change(name, "trigger", what, f"{drop}; {text}")


def _function_changes(trigger: str, definition: str) -> Iterator[Change]:
    quote = re.search(r"AS (\$\w*\$)", definition)
    if quote is None:
        return
    start = quote.end()
    end = definition.index(quote[1], start)
    body = definition[start:end]
    for site in sql.sites(body):
        changed = definition[:start] + sql.apply(body, site) + definition[end:]
        line = body[: site.start].count("\n") + 1
        column = site.start - body.rfind("\n", 0, site.start)
        what = f"function {line}:{column}: {site.rule} {body[site.start : site.end].strip()!r}"
        yield Change(trigger, "trigger", what, changed)


def _scan(text: str) -> Iterator[tuple[int, int]]:
    """(index, parenthesis depth) of each character of ``text`` outside quoted literals."""
    depth, quoted = 0, False
    for index, char in enumerate(text):
        if char == "'":
            quoted = not quoted
        elif not quoted:
            if char == "(":
                depth += 1
            elif char == ")":
                depth -= 1
            yield index, depth


def _unwrap(expression: str) -> str:
    """``expression`` without parentheses around all of it."""
    expression = expression.strip()
    while expression.startswith("(") and all(
        depth > 0 for index, depth in _scan(expression) if index < len(expression) - 1
    ):
        expression = expression[1:-1].strip()
    return expression


def _split(expression: str, word: str) -> list[str]:
    """``expression``'s parts joined by ``word`` (AND, OR, or ,) at the top level."""
    expression = _unwrap(expression)
    separator = f" {word} " if word.isalpha() else word
    parts, last = [], 0
    for index, depth in _scan(expression):
        if depth == 0 and expression.startswith(separator, index):
            parts.append(expression[last:index].strip())
            last = index + len(separator)
    parts.append(expression[last:].strip())
    return parts


def _without_part(expression: str, word: str) -> Iterator[tuple[str, str]]:
    parts = _split(expression, word)
    for index, part in enumerate(parts if len(parts) > 1 else []):
        yield f"without {_unwrap(part)}", f" {word} ".join(parts[:index] + parts[index + 1 :])


def _without_list_value(expression: str) -> Iterator[tuple[str, str]]:
    """One value fewer in each ``ARRAY[…]`` (how PostgreSQL shows ``IN (…)``)."""
    for match in re.finditer(r"ARRAY\[([^\]]*)\]", expression):
        values = _split(match[1], ",")
        for index, value in enumerate(values if len(values) > 1 else []):
            fewer = ", ".join(values[:index] + values[index + 1 :])
            weaker = expression[: match.start(1)] + fewer + expression[match.end(1) :]
            yield f"without {value.split('::')[0]} in its list", weaker


# --- running the tests against each change -------------------------------------------


def _pytest(change: str) -> tuple[int, str]:
    """The backstop tests on a database with ``change`` made: (exit code, first failure)."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "tests.mutation.backstop_plugin",
        "-x",
        "-q",
        "-rfE",
        "-p",
        "no:cacheprovider",
        "-m",
        "not stress and not catalog",
        *BACKSTOP_TESTS,
    ]
    env = {**os.environ, "TOKENDB_BACKSTOP_SQL": change}
    done = subprocess.run(command, cwd=REPOSITORY, env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    failed = next(
        (
            line.split(" - ")[0].split(" ", 1)[1]
            for line in output.splitlines()
            if line.startswith(("FAILED ", "ERROR "))
        ),
        "",
    )
    if done.returncode == NOT_APPLIED or (done.returncode not in (0, 1) and not failed):
        failed = output[-1500:]
    return done.returncode, failed


def _test(change: Change) -> Change:
    code, failed = _pytest(change.sql)
    if code == 0:
        change.outcome = "survived"
    elif code == 1:
        change.outcome, change.caught_by = "caught", failed
    else:
        change.outcome, change.caught_by = "error", failed
    return change


async def _discover() -> list[Change]:
    import tokendb
    from tokendb.testing import test_server_url, throwaway_database

    server = await asyncio.to_thread(test_server_url)
    async with throwaway_database(server, prefix="tokendb_backstops") as url:
        await tokendb.migrate(url)
        return await changes(url)


def report(found: list[Change], seconds: float) -> str:
    removed = [c for c in found if c.removed]
    weakened = [c for c in found if not c.removed]

    def counted(group: list[Change]) -> str:
        caught = sum(c.outcome == "caught" for c in group)
        return f"{caught}/{len(group)} caught"

    lines = [
        f"Backstop run: {len(found)} changes in {seconds / 60:.1f} min; removed: "
        f"{counted(removed)}; weakened: {counted(weakened)}.",
        "",
        "| backstop | kind | change | outcome | caught by |",
        "|---|---|---|---|---|",
    ]
    for change in found:
        what = change.what.replace("|", "\\|")
        caught_by = change.caught_by.splitlines()[0][:120] if change.caught_by else ""
        lines.append(
            f"| {change.backstop} | {change.kind} | {what} | {change.outcome} | {caught_by} |"
        )
    return "\n".join(lines) + "\n"


def main(*, jobs: int, removed_only: bool = False) -> int:
    """Run every change (only the removals with ``removed_only``); exit code 1 when a
    removed backstop went unnoticed (or a change failed)."""
    started = time.monotonic()
    baseline, failed = _pytest("")
    if baseline != 0:
        print(f"the backstop tests fail on the unchanged schema: {failed}", file=sys.stderr)
        return 2
    found = [c for c in asyncio.run(_discover()) if c.removed or not removed_only]
    print(f"{len(found)} changes to {len({c.backstop for c in found})} backstops", flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        for index, change in enumerate(pool.map(_test, found), start=1):
            mark = "" if change.outcome == "caught" else "  <--"
            print(
                f"[{index:3}/{len(found)}] {change.outcome:8} {change.backstop}: "
                f"{change.what[:90]}{mark}",
                flush=True,
            )
    text = report(found, time.monotonic() - started)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "backstops.md").write_text(text)
    print(text)
    print(f"(written to {RESULTS / 'backstops.md'})")
    bad = [c for c in found if c.outcome == "error" or (c.removed and c.outcome != "caught")]
    return 1 if bad else 0
