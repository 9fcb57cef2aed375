"""Bounded waits: acquiring and releasing a pooled connection never waits forever.

The server bounds statements and lock waits itself (``statement_timeout``,
``lock_timeout``, set on the pool's connections by :func:`tokendb.init`), and
the client bounds opening a connection and every statement a little beyond
them (asyncpg's connect timeout and ``command_timeout``), for a server that
stops answering. What is left is the client's own waits, bounded here:
waiting for a free pooled connection (:func:`acquire`) and handing it back
(:func:`release`), each within ``acquire_timeout``.

``asyncio.timeout()`` (and asyncpg's ``timeout=``) schedule a timer per wait
and cancel it afterwards: on every statement's path, for acquiring and for
releasing, that is ~12 µs of CPU per call under load (measured by ``python
-m bench``), most of what the seam costs over raw asyncpg. The bounds are
seconds long, so one timer per event loop checks them all every :data:`TICK`
seconds while any is running (:class:`Watchdog`): an overdue wait is
cancelled at most ``TICK`` late, and the ``CancelledError`` leaves the block
as ``TimeoutError`` when it was the deadline's, not the caller's own
cancellation (the rule of ``asyncio.timeout``).
"""

from __future__ import annotations

import asyncio
import weakref
from contextlib import suppress
from typing import Any, Literal, cast

import asyncpg

from tokendb._translate import is_connection_loss, translate
from tokendb.errors import DatabaseTimeout

__all__ = ["TICK", "Deadline", "Watchdog", "acquire", "discard", "is_open", "release"]

TICK = 0.1
"""Seconds between two checks of the running deadlines of an event loop."""


class Deadline:
    """``with Deadline(seconds):`` bounds the awaits in the block, like ``asyncio.timeout()``."""

    __slots__ = ("_cancelling", "_seconds", "_task", "_watchdog", "expired")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def __enter__(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Deadline must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self.expired = False
        loop = task.get_loop()
        watchdog = _last  # almost always: one event loop per process (Watchdog.of, inlined)
        if watchdog is None or watchdog.loop is not loop:
            watchdog = Watchdog.of(loop)
        self._watchdog = watchdog
        watchdog.deadlines[self] = watchdog.loop.time() + self._seconds
        if watchdog.timer is None:
            watchdog.timer = watchdog.loop.call_later(TICK, watchdog.check)

    def __exit__(
        self, kind: object, exc: BaseException | None, traceback: object
    ) -> Literal[False]:
        self._watchdog.deadlines.pop(self, None)
        if (
            self.expired
            and isinstance(exc, asyncio.CancelledError)
            and self._task.uncancel() <= self._cancelling
        ):
            raise TimeoutError from exc
        return False

    def expire(self) -> None:
        self.expired = True
        self._task.cancel()


class Watchdog:
    """The running deadlines of one event loop, and the one timer that enforces them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.deadlines: dict[Deadline, float] = {}
        self.timer: asyncio.TimerHandle | None = None

    @staticmethod
    def of(loop: asyncio.AbstractEventLoop) -> Watchdog:
        global _last
        if _last is not None and _last.loop is loop:
            return _last  # almost always: one event loop per process
        watchdog = _watchdogs.get(loop)
        if watchdog is None:
            watchdog = _watchdogs[loop] = Watchdog(loop)
        _last = watchdog
        return watchdog

    def check(self) -> None:
        now = self.loop.time()
        overdue = [deadline for deadline, at in self.deadlines.items() if at <= now]
        for deadline in overdue:
            del self.deadlines[deadline]
            deadline.expire()
        self.timer = self.loop.call_later(TICK, self.check) if self.deadlines else None


_watchdogs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Watchdog] = (
    weakref.WeakKeyDictionary()
)
_last: Watchdog | None = None


async def acquire(pool: asyncpg.Pool, seconds: float) -> asyncpg.Connection:
    """A connection from ``pool`` within ``seconds``.

    Raises :class:`DatabaseTimeout` when none became free in time, and
    :class:`DatabaseUnavailable` when the server cannot be reached.
    """
    try:
        with Deadline(seconds):
            proxy = await pool.acquire()
    except TimeoutError as exc:
        raise DatabaseTimeout(
            f"no pooled connection became free within {seconds:g} s "
            "(pool too small for the load, or the database is stuck)"
        ) from exc
    except Exception as exc:
        if is_connection_loss(exc):
            raise translate(exc) from exc
        raise
    # The pool's proxy forwards every Connection method; the domain modules
    # are typed against Connection.
    return cast(asyncpg.Connection, proxy)


async def release(pool: asyncpg.Pool, conn: asyncpg.Connection, seconds: float) -> None:
    """Give ``conn`` back to ``pool`` within ``seconds``; never raises.

    Releasing resets the connection (a round trip): a connection that cannot
    be reset in time is dropped rather than allowed to replace the error that
    may be propagating.
    """
    try:
        with Deadline(seconds):
            await pool.release(cast(Any, conn))
    except (Exception, asyncio.CancelledError):
        discard(conn)


def is_open(conn: asyncpg.Connection) -> bool:
    # When a connection closes under us the pool takes it back and detaches
    # our proxy, whose every method then raises InterfaceError ("connection
    # has been released back to the pool"): that too means "not open".
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False


def discard(conn: asyncpg.Connection) -> None:
    """Close ``conn`` without a round trip; the pool replaces it on the next acquire.

    Never raises: it runs while another error is propagating, and a
    connection the pool already took back (see :func:`is_open`) needs nothing.
    """
    with suppress(asyncpg.InterfaceError):
        conn.terminate()
