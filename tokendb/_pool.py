"""The pooled connection: no reset round trip after tokendb's own statements.

asyncpg's pool resets every connection it takes back (``Connection.reset``):
an open transaction is rolled back, and then one more round trip, ``SELECT
pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;``, clears the
session state the last holder may have left (settings, cursors, LISTENs,
advisory locks). tokendb's statements leave none: their settings are
transaction-local (``set_config(…, true)``), they open no cursor, listen on
no pooled connection (the verify cache's listener has its own) and take no
session advisory lock. After them that round trip is pure cost: on a lookup
like ``verify_api_key``'s it is one of the two round trips a call makes, and
most of what tokendb added over hand-written asyncpg (``bench/README.md``).

:class:`Connection` is the pool's connection class in every Tortoise config
tokendb builds (:func:`tokendb.config.tortoise_config`). tokendb calls
:func:`release_unchanged` on a connection it held for its own statements only,
right before handing it back; the pool's next reset of it then skips the
query (asyncpg's own part, rolling back an open transaction, still runs). Any
other holder, the application's ORM code or its own transactions, gets
asyncpg's full reset, as does a pool built from a config tokendb did not make.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg

__all__ = ["Connection", "release_unchanged"]


class Connection(asyncpg.Connection):
    """asyncpg's connection, whose next reset may be declared unneeded (:meth:`skip_next_reset`)."""

    __slots__ = ("_reset_unneeded",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reset_unneeded = False

    def skip_next_reset(self) -> None:
        """The session is as the pool handed it out: the next release sends no reset query."""
        self._reset_unneeded = True

    def get_reset_query(self) -> str:
        # asyncpg's documented hook: Connection.reset() sends what this returns.
        if self._reset_unneeded:
            self._reset_unneeded = False
            return ""
        query: str = super().get_reset_query()
        return query


def release_unchanged(conn: object) -> None:
    """Declare that ``conn`` (a pool's proxy, about to be released) ran only tokendb's
    statements, which leave no session state. Never raises: a connection of another
    class, or one the pool already took back, keeps asyncpg's full reset."""
    # The proxy forwards attribute reads to its connection (AttributeError once detached).
    skip: Callable[[], None] | None = getattr(conn, "skip_next_reset", None)
    if skip is not None:
        skip()
