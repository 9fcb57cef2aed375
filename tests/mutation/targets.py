"""What the mutation runs change, and the tests that must notice: the one table to update.

When a module moves or a test module starts covering it, change this file
only. Each mutant runs the tests among ``tests`` that executed the code it
changes (:mod:`tests.mutation.selection`), in the order given, with
``pytest -x``: put the module's own tests first.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BACKSTOP_TESTS", "TARGETS", "Target"]


@dataclass(frozen=True)
class Target:
    """A module to mutate, and the test modules that cover it."""

    module: str
    """Path from the repository root."""
    tests: tuple[str, ...]
    """Test modules (or node ids), from the repository root."""
    definitions: tuple[str, ...] = ()
    """Mutate only inside these functions or classes (all of the module when empty)."""
    always: tuple[str, ...] = ()
    """Tests run for every mutant, besides those that executed the changed code: cheap
    checks of what happens at import (a decorator, a docstring), which coverage
    cannot tie to a test."""

    @property
    def name(self) -> str:
        return self.module.removeprefix("tokendb/").removesuffix(".py")


TARGETS: tuple[Target, ...] = (
    # The ledger: what to do (ledger.py) and how the database does it (_ledger_sql.py).
    Target(
        "tokendb/ledger.py",
        ("tests/test_ledger.py", "tests/test_coalescing.py", "tests/test_concurrency.py"),
        always=("tests/test_public_api.py",),
    ),
    Target(
        "tokendb/_ledger_sql.py",
        (
            "tests/test_ledger.py",
            "tests/test_coalescing.py",
            "tests/test_chats.py",
            "tests/test_users.py",
            "tests/test_concurrency.py",
            "tests/test_holds.py",
            "tests/test_usage.py",
        ),
    ),
    # The coalescer: the generic group-commit queue (its batch statement is in _ledger_sql).
    Target(
        "tokendb/_group_commit.py",
        (
            "tests/test_group_commit.py",
            "tests/test_coalescing.py",
            "tests/test_concurrency.py",
            "tests/test_faults.py",
        ),
    ),
    Target(
        "tokendb/api_keys.py",
        (
            "tests/test_api_keys.py",
            "tests/test_hostile_input.py",
            "tests/test_limits.py",
            "tests/test_verify_cache.py",
        ),
        always=("tests/test_public_api.py",),
    ),
    Target(
        "tokendb/users.py",
        ("tests/test_users.py", "tests/test_hostile_input.py"),
        always=("tests/test_public_api.py",),
    ),
    Target(
        "tokendb/chats.py",
        (
            "tests/test_chats.py",
            "tests/test_concurrency.py",
            "tests/test_hostile_input.py",
            "tests/test_holds.py",
            "tests/test_limits.py",
        ),
        always=("tests/test_public_api.py",),
    ),
    # Error translation.
    Target(
        "tokendb/_translate.py",
        (
            "tests/test_translate.py",
            "tests/test_db.py",
            "tests/test_config.py",
            "tests/test_faults.py",
        ),
        always=("tests/test_public_api.py",),
    ),
)

BACKSTOP_TESTS: tuple[str, ...] = (
    "tests/test_schema.py",
    # The refund trigger's lock on the charge, which only concurrent refunds show:
    "tests/test_ledger.py::test_refund_trigger_backstop_holds_for_concurrent_raw_refunds",
    # Migrations tested where their feature is (each sends what a backstop refuses):
    "tests/test_holds.py::test_the_application_role_cannot_fake_holds",  # 3, holds
    "tests/test_integrity.py::test_a_users_id_never_changes_so_no_balance_slips_past_its_check",
    "tests/test_integrity.py::test_an_api_keys_id_never_changes",  # 4, ids immutable
    # 7, usage: raw rows of the application role
    "tests/test_usage.py::test_the_application_role_cannot_write_the_rollup",
    "tests/test_usage.py::test_raw_usage_rows_of_the_application_role_are_rolled_up",
    "tests/test_usage.py::test_a_raw_usage_row_with_another_users_key_is_refused",
    "tests/test_usage.py::test_a_raw_refund_must_carry_its_charges_key_and_model",
)
"""The tests that must notice a CHECK, trigger or unique index of the migrations
removed or weakened (``python -m tests.mutation backstops``). Tests marked
``catalog`` (which list the backstops by name) are left out: removing a
backstop has to fail a test that sends what it refuses."""
