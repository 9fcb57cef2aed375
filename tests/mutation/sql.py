"""Bug-like changes to SQL text: where they can be made, and what each one is.

The money paths are SQL: a ``>=`` that should be ``>``, an ``AND`` that should
be ``OR``, a lost ``FOR UPDATE`` are the bugs that matter most here, and no
Python mutation tool looks inside string literals. :func:`sites` finds such
changes in one piece of SQL; the mutation run applies them to the statements
in tokendb's modules (:mod:`tests.mutation.operators`) and the backstop run
to the bodies of the migrations' trigger functions
(:mod:`tests.mutation.backstops`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import NamedTuple

__all__ = ["RULES", "Site", "looks_like_sql", "sites"]


class Site(NamedTuple):
    """Replace ``text[start:end]`` with ``replacement``."""

    start: int
    end: int
    replacement: str
    rule: str


_COMPARISON = {"<>": "=", "!=": "=", ">=": ">", "<=": "<", "<": "<=", ">": ">="}

# rule -> (pattern, replacement of a match). Equality (``=``) is left alone: it
# is also SQL's assignment, and ``id = $1`` -> ``id <> $1`` breaks every test.
RULES: dict[str, tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = {
    "comparison": (
        re.compile(r"(?<![<>=!:|@-])(<>|!=|>=|<=|<|>)(?![=>@|])"),
        lambda m: _COMPARISON[m[1]],
    ),
    "and-or": (re.compile(r"\b(AND|OR)\b"), lambda m: "OR" if m[1] == "AND" else "AND"),
    "not": (re.compile(r"(?<!IS )\bNOT\s+"), lambda m: ""),
    "null-check": (
        re.compile(r"\bIS (NOT )?(NULL|DISTINCT FROM)\b"),
        lambda m: f"IS {'' if m[1] else 'NOT '}{m[2]}",
    ),
    "lock": (re.compile(r"(?<=\s)FOR UPDATE(?: OF \w+)?\b"), lambda m: ""),
    "clock": (re.compile(r"\bclock_timestamp\(\)"), lambda m: "now()"),
    "arithmetic": (re.compile(r"(?<=\s)([+-])(?=\s)"), lambda m: "-" if m[1] == "+" else "+"),
    "order": (re.compile(r"\b(ASC|DESC)\b"), lambda m: "DESC" if m[1] == "ASC" else "ASC"),
}

_SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|WHERE)\b")
# Text that is not SQL code: comments and quoted literals (their length kept).
_INERT = re.compile(r"--[^\n]*|'(?:[^']|'')*'")


def looks_like_sql(text: str) -> bool:
    """True for text that holds a statement (an uppercase SELECT, INSERT, UPDATE, DELETE, WHERE)."""
    return _SQL.search(text) is not None


def sites(text: str, rule: str | None = None) -> Iterator[Site]:
    """Every change of ``rule`` (all rules when None) in ``text``, in order of position.

    Comments (``-- …``) and quoted literals are left alone.
    """
    code = _INERT.sub(lambda m: " " * len(m[0]), text)
    found: list[Site] = []
    for name, (pattern, replace) in RULES.items():
        if rule is not None and name != rule:
            continue
        found.extend(Site(m.start(), m.end(), replace(m), name) for m in pattern.finditer(code))
    yield from sorted(found)


def apply(text: str, site: Site) -> str:
    return text[: site.start] + site.replacement + text[site.end :]
