"""The seam's runtime settings: what :func:`tokendb.init` chose, and changes for one block.

:func:`tokendb.init` fixes the settings of the connection it opens, once,
before any call runs (:func:`initialise`), as it fixes the connection
itself. Changing them afterwards is scoped: :func:`using` changes them for
one block, in a context variable, so only the block's task and the tasks it
starts see the change; a concurrent caller keeps the settings it had.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

__all__ = ["Settings", "current", "initialise", "using"]


@dataclass(frozen=True, slots=True)
class Settings:
    """Runtime knobs of the seam, set by :func:`tokendb.init`."""

    acquire_timeout: float = 10.0
    """Seconds to wait for a free pooled connection (and for its release)."""
    max_attempts: int = 8
    """Attempts of a transaction that hit a deadlock or serialization failure."""
    coalesce_charges: bool = True
    """Coalesce concurrent ``charge()`` calls into shared statements (:mod:`tokendb.ledger`)."""
    verify_cache: bool = False
    """Answer ``verify_api_key`` from the verify cache when it is synchronised
    (:mod:`tokendb._key_cache`; ``init`` turns it on when it has a connection to listen on)."""
    server_settings: tuple[str, ...] | None = None
    """The server settings tokendb's config put on the connection (``statement_timeout``,
    ``lock_timeout``); None until :func:`tokendb.init` or :func:`tokendb.tortoise_orm` ran."""


_initialised = Settings()
_in_block: ContextVar[Settings | None] = ContextVar("tokendb_settings", default=None)


def current() -> Settings:
    """The settings in force for the calling task."""
    changed = _in_block.get()
    return _initialised if changed is None else changed


def initialise(settings: Settings) -> None:
    """Fix the settings of the connection :func:`tokendb.init` (or
    :func:`tokendb.tortoise_orm`) configures (called by them only)."""
    global _initialised
    _initialised = settings


@contextmanager
def using(**changes: Any) -> Iterator[Settings]:
    """``with using(coalesce_charges=False):`` the current settings changed for the block.

    Only the block (and tasks started in it) see the change.
    """
    changed = dataclasses.replace(current(), **changes)
    token = _in_block.set(changed)
    try:
        yield changed
    finally:
        _in_block.reset(token)
