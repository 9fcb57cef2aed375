"""Surviving mutants that no test can tell apart from the code: equivalent, with the reason.

Keyed as the run reports them (:attr:`tests.mutation.runner.Mutant.key`):
the module, the enclosing definition and the changed lines, so an entry
survives line numbers moving and goes stale (and shows as a survivor again)
when the code it describes changes.
"""

from __future__ import annotations

__all__ = ["EQUIVALENT"]

EQUIVALENT: dict[str, str] = {}
