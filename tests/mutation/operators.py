"""The mutation operators of the run: a chosen set of cosmic-ray's, and SQL ones.

cosmic-ray's core operators mutate Python (comparisons, arithmetic, boolean
logic, exceptions caught, numbers, decorators …). Of each family we keep
the changes that look like real bugs (``<`` -> ``<=``, ``+`` -> ``-``, a
``not`` dropped) and leave out those that mostly make code that cannot run
(``+`` -> ``<<``) or cost much and tell little (variable insertion).

The ``sql/…`` operators make the changes of :mod:`tests.mutation.sql` inside
the string literals that hold SQL statements (docstrings excluded). They are
registered with cosmic-ray by :func:`register`, in the process that runs the
mutations (no entry point: they exist for this repository only).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import cosmic_ray.plugins
from cosmic_ray.operators.operator import Operator

from tests.mutation import sql

__all__ = ["OPERATORS", "register"]

_CORE = (
    # comparisons: boundaries and negations
    "ReplaceComparisonOperator_Lt_LtE",
    "ReplaceComparisonOperator_LtE_Lt",
    "ReplaceComparisonOperator_Gt_GtE",
    "ReplaceComparisonOperator_GtE_Gt",
    "ReplaceComparisonOperator_Lt_GtE",
    "ReplaceComparisonOperator_LtE_Gt",
    "ReplaceComparisonOperator_Gt_LtE",
    "ReplaceComparisonOperator_GtE_Lt",
    "ReplaceComparisonOperator_Eq_NotEq",
    "ReplaceComparisonOperator_NotEq_Eq",
    "ReplaceComparisonOperator_Is_IsNot",
    "ReplaceComparisonOperator_IsNot_Is",
    # arithmetic
    "ReplaceBinaryOperator_Add_Sub",
    "ReplaceBinaryOperator_Sub_Add",
    "ReplaceBinaryOperator_Mul_Div",
    "ReplaceBinaryOperator_Div_Mul",
    "ReplaceBinaryOperator_Pow_Mul",
    "ReplaceUnaryOperator_USub_UAdd",
    "ReplaceUnaryOperator_Delete_USub",
    # boolean logic
    "ReplaceUnaryOperator_Delete_Not",
    "AddNot",
    "ReplaceTrueWithFalse",
    "ReplaceFalseWithTrue",
    "ReplaceAndWithOr",
    "ReplaceOrWithAnd",
    # control flow, errors, constants
    "ReplaceBreakWithContinue",
    "ReplaceContinueWithBreak",
    "ZeroIterationForLoop",
    "ExceptionReplacer",
    "NumberReplacer",
    "RemoveDecorator",
)


class _SqlOperator(Operator):
    """The changes of one rule of :data:`tests.mutation.sql.RULES` in SQL string literals."""

    rule = ""

    def mutation_positions(self, node: Any) -> Iterator[tuple[tuple[int, int], tuple[int, int]]]:
        if _holds_sql(node):
            for site in sql.sites(node.value, self.rule):
                yield _position(node, site.start), _position(node, site.end)

    def mutate(self, node: Any, index: int) -> Any:
        site = list(sql.sites(node.value, self.rule))[index]
        node.value = sql.apply(node.value, site)
        return node

    @classmethod
    def examples(cls) -> tuple[()]:
        return ()


def _holds_sql(node: Any) -> bool:
    """A string literal (or a piece of an f-string) that is part of a SQL statement."""
    if node.type not in ("string", "fstring_string"):
        return False
    whole = node
    while whole.parent is not None and whole.parent.type in ("fstring", "strings"):
        whole = whole.parent
    if whole.parent is not None and whole.parent.type == "simple_stmt":
        return False  # a docstring, or a string on its own
    return sql.looks_like_sql(whole.get_code())


def _position(node: Any, offset: int) -> tuple[int, int]:
    line, column = node.start_pos
    before = node.value[:offset]
    newlines = before.count("\n")
    if newlines == 0:
        return line, column + offset
    return line + newlines, offset - before.rindex("\n") - 1


def _operator_class(rule: str) -> type[_SqlOperator]:
    name = "".join(part.capitalize() for part in rule.split("-"))
    return type(f"Sql{name}", (_SqlOperator,), {"rule": rule})


class _SqlProvider:
    """A cosmic-ray operator provider for the ``sql/…`` operators."""

    def __init__(self) -> None:
        self._operators = {cls.__name__: cls for cls in map(_operator_class, sql.RULES)}

    def __iter__(self) -> Iterator[str]:
        return iter(self._operators)

    def __getitem__(self, name: str) -> type[_SqlOperator]:
        return self._operators[name]


def register() -> None:
    """Make the ``sql/…`` operators known to cosmic-ray in this process."""
    cosmic_ray.plugins.OPERATOR_PROVIDERS.setdefault("sql", _SqlProvider())


register()

OPERATORS: tuple[str, ...] = tuple(f"core/{name}" for name in _CORE) + tuple(
    f"sql/{name}" for name in cosmic_ray.plugins.OPERATOR_PROVIDERS["sql"]
)
"""Every operator of the run, as cosmic-ray names them."""

_unknown = set(OPERATORS) - set(cosmic_ray.plugins.operator_names())
assert not _unknown, f"cosmic-ray has no operators {sorted(_unknown)}"
