"""Tests for the mutation tooling (tests/mutation): what it changes; its table is current."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

# The tooling's own dependencies come with the dev extra, not the test extra.
pytest.importorskip("cosmic_ray", reason="mutation tooling: pip install -e '.[dev]'")
pytest.importorskip("pytest_cov", reason="mutation tooling: pip install -e '.[dev]'")

import parso

from tests.mutation import backstops, runner, sql
from tests.mutation.operators import OPERATORS, _holds_sql
from tests.mutation.runner import enumerate_mutants
from tests.mutation.selection import CoverageMap, Scopes, select_tests
from tests.mutation.targets import BACKSTOP_TESTS, TARGETS, Target
from tokendb.schema import CHECK_CONSTRAINTS

REPOSITORY = Path(__file__).resolve().parents[1]


def test_every_target_and_test_module_exists() -> None:
    """A module moved without updating tests/mutation/targets.py fails here, not mid-run."""
    for target in TARGETS:
        assert (REPOSITORY / target.module).is_file(), target.module
        for test in (*target.tests, *target.always, *BACKSTOP_TESTS):
            assert (REPOSITORY / test.split("::")[0]).is_file(), test


@pytest.mark.parametrize(
    ("before", "rule", "after"),
    [
        ("WHERE a >= 0", "comparison", "WHERE a > 0"),
        ("WHERE a <> b", "comparison", "WHERE a = b"),
        ("WHERE a AND b", "and-or", "WHERE a OR b"),
        ("WHERE NOT EXISTS (SELECT 1)", "not", "WHERE EXISTS (SELECT 1)"),
        ("WHERE $1::uuid IS NULL", "null-check", "WHERE $1::uuid IS NOT NULL"),
        ("WHERE a IS NOT DISTINCT FROM b", "null-check", "WHERE a IS DISTINCT FROM b"),
        ("WHERE id = $1 FOR UPDATE OF u", "lock", "WHERE id = $1 "),
        ("WHERE type = 'usage'\n FOR UPDATE;", "lock", "WHERE type = 'usage'\n ;"),
        ("SET at = clock_timestamp()", "clock", "SET at = now()"),
        ("SET b = b + $2", "arithmetic", "SET b = b - $2"),
        ("ORDER BY created_at DESC", "order", "ORDER BY created_at ASC"),
    ],
)
def test_sql_changes(before: str, rule: str, after: str) -> None:
    [site] = sql.sites(before, rule)
    assert sql.apply(before, site) == after


def test_sql_changes_are_listed_in_order_of_position() -> None:
    text = "WHERE a >= 0 AND b < $1"
    assert [(s.rule, text[s.start : s.end]) for s in sql.sites(text)] == [
        ("comparison", ">="),
        ("and-or", "AND"),
        ("comparison", "<"),
    ]


def test_sql_comments_literals_and_casts_are_left_alone() -> None:
    text = "SELECT $1::uuid[] -- a < b AND c\nWHERE t = 'x > y OR z' AND a->>'k' = '1'"
    assert [(s.rule, text[s.start : s.end]) for s in sql.sites(text)] == [("and-or", "AND")]


def test_sql_operators_change_statements_not_docstrings() -> None:
    module = parso.parse(
        '"""SELECT doc WHERE a < b"""\n'
        'MOVE = f"UPDATE t SET a = {x} WHERE b < 1"\n'
        'PAIR = ("SELECT 1 " "WHERE c > 2")\n'
        'TEXT = "a < b, not SQL"\n'
    )
    leaves = []
    leaf = module.get_first_leaf()
    while leaf is not None:
        if _holds_sql(leaf):
            leaves.append(leaf.value)
        leaf = leaf.get_next_leaf()
    assert leaves == ["UPDATE t SET a = ", " WHERE b < 1", '"SELECT 1 "', '"WHERE c > 2"']


def test_a_mutant_runs_the_tests_that_executed_the_code_it_changes() -> None:
    """Inside a function: the tests that ran that function. In a module-level constant:
    the tests that ran the functions using it, in any module. Else every test."""
    source = 'SQL = "SELECT 1"\nOTHER = 2\n\n\ndef f():\n    return SQL\n'
    modules = {"m.py": Scopes(source), "n.py": Scopes("def g():\n    return m.SQL\n")}
    target = Target("m.py", ("tests/test_a.py", "tests/test_b.py"), always=("tests/test_c.py",))
    covered = CoverageMap(
        lines={
            "m.py": {6: {"tests/test_b.py::t1", "tests/other.py::t"}},
            "n.py": {2: {"tests/test_a.py::t2"}},
        },
        seconds={},
        elapsed=0,
    )
    assert select_tests(target, 6, modules, covered) == ["tests/test_c.py", "tests/test_b.py::t1"]
    assert select_tests(target, 1, modules, covered) == [
        "tests/test_c.py",
        "tests/test_a.py::t2",
        "tests/test_b.py::t1",
    ]
    assert select_tests(target, 2, modules, covered) == [
        "tests/test_c.py",
        "tests/test_a.py",
        "tests/test_b.py",
    ]


def test_every_target_can_be_mutated() -> None:
    mutants = enumerate_mutants(TARGETS)
    assert {m.module for m in mutants} == {t.module for t in TARGETS}


def test_runs_of_one_module_at_a_time_add_up_to_one_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run --module X`` replaces X's results and keeps the other modules' (each
    with the commit and date it was measured at); a whole run replaces them all."""
    monkeypatch.setattr(runner, "RESULTS", tmp_path)

    def mutant(module: str, outcome: str) -> runner.Mutant:
        return runner.Mutant(module, "op", 0, 1, None, (), outcome=outcome, key=module)

    # Results written before runs were recorded per module are added to, not a crash.
    (tmp_path / "results.json").write_text('{"seconds": 1, "mutants": []}')
    runner.save([mutant("a.py", "killed")], 60, started="2026-01-01 10:00", replace=False)
    runner.save([mutant("b.py", "survived")], 120, started="2026-01-01 11:00", replace=False)
    runner.save([mutant("b.py", "killed")], 120, started="2026-01-01 12:00", replace=False)
    mutants, runs = runner.load()
    assert [(m.module, m.outcome) for m in mutants] == [("a.py", "killed"), ("b.py", "killed")]
    assert [runs[m].date for m in ("a.py", "b.py")] == ["2026-01-01 10:00", "2026-01-01 12:00"]
    assert runs["a.py"].commit == runner.measured_commit()
    assert "| a.py | 1 | 1 | 0 | 0 | 100.0% |" in (tmp_path / "report.md").read_text()
    runner.save([mutant("c.py", "killed")], 60, started="2026-01-02 10:00")
    assert [m.module for m in runner.load()[0]] == ["c.py"]


def test_every_operator_is_known_to_cosmic_ray() -> None:
    from cosmic_ray.plugins import operator_names

    assert set(OPERATORS) <= set(operator_names())
    assert any(name.startswith("sql/") for name in OPERATORS)


AMOUNT_SIGN = (
    "CHECK (((((type)::text <> 'usage'::text) OR (amount < 0)) AND (((type)::text <> ALL "
    "((ARRAY['topup'::character varying, 'refund'::character varying])::text[])) "
    "OR (amount > 0))))"
)


def test_a_check_is_weakened_one_condition_or_one_listed_value_at_a_time() -> None:
    changes = list(backstops._check_changes("sign", "t", AMOUNT_SIGN))
    assert [c.what for c in changes] == [
        "removed",
        "without ((type)::text <> 'usage'::text) OR (amount < 0)",
        "without ((type)::text <> ALL ((ARRAY['topup'::character varying, 'refund'::character "
        "varying])::text[])) OR (amount > 0)",
        "without 'topup' in its list",
        "without 'refund' in its list",
    ]
    assert "ARRAY['topup'::character varying]" in changes[-1].sql


def test_a_trigger_is_weakened_one_event_or_condition_at_a_time() -> None:
    definition = (
        "CREATE TRIGGER k BEFORE UPDATE OR DELETE ON public.t FOR EACH ROW "
        "WHEN (((NOT old.a) AND new.a) OR (old.b <> new.b)) EXECUTE FUNCTION f()"
    )
    whats = [c.what for c in backstops._trigger_changes("k", "t", definition)]
    assert whats[:5] == [
        "removed",
        "not on UPDATE",
        "not on DELETE",
        "without (NOT old.a) AND new.a",
        "without old.b <> new.b",
    ]


async def test_backstops_are_read_from_the_migrated_catalog(tokendb_db: str) -> None:
    """Every CHECK the schema tests know, every trigger and unique index, found by the run
    (but aerich_record_once, the migrations' own guard: test_migrations covers it)."""
    found = await backstops.changes(tokendb_db)
    removed = {c.backstop for c in found if c.removed}
    conn = await asyncpg.connect(tokendb_db)
    try:
        triggers = {
            row["tgname"]
            for row in await conn.fetch("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")
        } - {"aerich_record_once"}
    finally:
        await conn.close()
    assert removed >= set(CHECK_CONSTRAINTS)
    assert removed >= triggers
    assert removed >= {"token_transactions_idempotency_key", "users_email_lower_key"}
