"""Which tests run for a mutant: those that executed the code it changes.

One run of every target's tests under coverage, with a context per test
(``pytest --cov-context=test``), says which tests executed each line. A
mutant inside a function (or method) is tested by the tests that executed
any line of that function; a mutant in module-level code (a SQL statement
held in a constant) by the tests that executed the functions that use that
constant, directly or through other constants. When that finds no test, all
of the target's tests run. So a mutant costs the few seconds of the tests
that can notice it, not the minutes of every test module of its target.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import parso
from coverage import CoverageData

from tests.mutation.targets import Target

__all__ = ["CoverageMap", "Scopes", "coverage_map"]


@dataclass
class CoverageMap:
    """Per module, per line, the tests (node ids) that executed it; and each test's seconds."""

    lines: dict[str, dict[int, set[str]]]
    seconds: dict[str, float]
    elapsed: float


def coverage_map(copy: Path, targets: Sequence[Target]) -> CoverageMap:
    """Run every target's tests once in ``copy`` under coverage; return who ran what.

    Raises :class:`RuntimeError` when the tests fail (unmutated, they must pass).
    """
    tests = list(dict.fromkeys(test for target in targets for test in target.tests))
    # ``always`` tests need no coverage: they run for every mutant anyway.
    data_file, report = copy / ".mutation-coverage", copy / ".mutation-junit.xml"
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--cov=tokendb",
            "--cov-context=test",
            "--cov-report=",
            f"--junitxml={report}",
            *tests,
        ],
        cwd=copy,
        env={**os.environ, "COVERAGE_FILE": str(data_file)},
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the tests fail before anything is mutated:\n{done.stdout[-3000:]}")
    data = CoverageData(basename=str(data_file))
    data.read()
    lines: dict[str, dict[int, set[str]]] = {}
    for measured in data.measured_files():
        module = Path(measured).relative_to(copy).as_posix()
        lines[module] = {
            line: {context.rsplit("|", 1)[0] for context in contexts if context}
            for line, contexts in data.contexts_by_lineno(measured).items()
        }
    seconds = {
        f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}": float(
            case.get("time", 0)
        )
        for case in ElementTree.parse(report).iter("testcase")
    }
    return CoverageMap(lines, seconds, time.monotonic() - started)


class Scopes:
    """The functions of a module, and the names its module-level statements assign and use."""

    def __init__(self, source: str) -> None:
        self.lines = source.splitlines()
        self.functions: list[tuple[int, int]] = []
        self._statements: list[tuple[int, int, set[str], set[str]]] = []
        for node in parso.parse(source).children:
            self._add(node)

    def _add(self, node: Any) -> None:
        inner = node.children[-1] if node.type == "decorated" else node
        if inner.type in ("funcdef", "async_funcdef", "async_stmt"):
            self.functions.append(_span(node))
        elif inner.type == "classdef":
            body = inner.children[-1]
            for child in body.children if body.type == "suite" else []:
                if child.type in ("funcdef", "decorated", "async_stmt"):
                    self.functions.append(_span(child))
                elif child.type == "simple_stmt":
                    self._statement(child)
        elif node.type == "simple_stmt":
            self._statement(node)

    def _statement(self, node: Any) -> None:
        assigned: set[str] = set()
        for expr in node.children:
            if expr.type == "expr_stmt":
                assigned |= {leaf.value for leaf in _names(expr.children[0])}
        used = {leaf.value for leaf in _names(node)} - assigned
        self._statements.append((*_span(node), assigned, used))

    def function_at(self, line: int) -> tuple[int, int] | None:
        """The span (first, last line) of the function or method holding ``line``."""
        return next(((a, b) for a, b in self.functions if a <= line <= b), None)

    def names_of_statement_at(self, line: int) -> set[str]:
        """What the module-level statement at ``line`` assigns, and the constants built from it."""
        statement = next((s for s in self._statements if s[0] <= line <= s[1]), None)
        if statement is None:
            return set()
        wanted, seen = set(statement[2]), set[str]()
        while wanted - seen:  # constants built from constants: follow them
            seen |= wanted
            for _, _, assigned, used in self._statements:
                if used & seen:
                    wanted |= assigned
        return seen

    def functions_mentioning(self, names: set[str]) -> list[tuple[int, int]]:
        return [
            (first, last)
            for first, last in self.functions
            if any(_mentions(line, names) for line in self.lines[first - 1 : last])
        ]


def _span(node: parso.tree.NodeOrLeaf) -> tuple[int, int]:
    """First and last line of ``node`` (it may end at column 0 of the line after it)."""
    last, column = node.end_pos
    return node.start_pos[0], last if column else last - 1


def _names(node: parso.tree.NodeOrLeaf) -> Iterator[parso.tree.Leaf]:
    if node.type == "name":
        yield node  # type: ignore[misc]
    for child in getattr(node, "children", ()):
        yield from _names(child)


def _mentions(line: str, names: set[str]) -> bool:
    return any(re.search(rf"\b{re.escape(name)}\b", line) for name in names)


def select_tests(
    target: Target, line: int, modules: dict[str, Scopes], covered: CoverageMap
) -> list[str]:
    """The tests that executed the code the mutant at ``line`` of ``target`` changes.

    ``modules`` holds the :class:`Scopes` of every module that may use the
    target's constants. In the target's order of tests; all of them when no
    test can be named.
    """
    span = modules[target.module].function_at(line)
    if span is not None:
        spans = [(target.module, *span)]
    else:
        names = modules[target.module].names_of_statement_at(line)
        spans = [
            (module, *function)
            for module, scopes in modules.items()
            for function in scopes.functions_mentioning(names)
        ]
    found = {
        test
        for module, first, last in spans
        for i in range(first, last + 1)
        for test in covered.lines.get(module, {}).get(i, ())
    }
    chosen = [test for test in found if _place(target, test) is not None]
    if not chosen:
        return [*target.always, *target.tests]
    return [*target.always, *sorted(chosen, key=lambda test: (_place(target, test), test))]


def _place(target: Target, test: str) -> int | None:
    """Where ``test`` comes in the target's list of tests (None: not in it)."""
    for index, chosen in enumerate(target.tests):
        if test == chosen or test.startswith((chosen + "::", chosen + "[")):
            return index
    return None


def seconds_of(tests: Sequence[str], covered: CoverageMap) -> float:
    """How long ``tests`` (node ids or whole modules) took in the coverage run."""
    return sum(
        seconds
        for test, seconds in covered.seconds.items()
        if any(test == t or test.startswith((t + "::", t + "[")) for t in tests)
    )
