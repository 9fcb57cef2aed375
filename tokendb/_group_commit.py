"""Group commit: concurrent calls share one statement, with no timer.

A generic mechanism: it knows nothing of what it sends. Its owner hands it
``run_one`` (one item, as the plain single statement) and ``run_batch``
(several items as one statement, one outcome per item, in order); the ledger
uses it for ``charge()`` (:mod:`tokendb.ledger`)::

    submit() ─┐                      ┌─ batch in flight: one statement (run_batch)
    submit() ─┼─► queue (this lane) ─┤
    submit() ─┘                      └─ arrivals meanwhile form the next batch

*No timer.* A call that finds no batch in flight goes out on the loop's next
turn, and a batch of one is ``run_one``, so a lone call costs what it always
did. Batches form only from calls that arrive while a batch is in flight,
up to ``max_batch`` items. One batch is in flight per lane (an event loop and
a connection pool): two or three were measured, and their smaller batches
contending for the same locks were slower.

*Durable.* A caller resumes only after the statement carrying its item has
committed; nothing waits in memory across a crash.

*Context.* A batch runs in the context (:mod:`contextvars`) of its oldest
call, so a lone call runs in its own: settings a caller changed for a block
(:func:`tokendb._settings.using`), and a request's logging or tracing
context, reach its own statement, never one of a caller that came later.
Calls share a batch only with calls of the same ``group`` (the ledger's:
the caller's settings), so no call runs under another caller's settings.

*Cancellation.* A call cancelled while queued is dropped before its batch is
built: it is not sent. Once its batch is sent, the statement is not
cancelled with it (other callers ride on it): the item commits or fails as
if the caller had stayed, and the caller only stops waiting, so for it the
outcome is unknown, as for any write cancelled after it was sent.
"""

from __future__ import annotations

import asyncio
import contextvars
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Generic, TypeAlias, TypeVar

from tokendb.errors import DatabaseUnavailable

__all__ = ["GroupCommit"]

Item = TypeVar("Item")
Result = TypeVar("Result")
_Entry: TypeAlias = tuple[Item, "asyncio.Future[Result]", contextvars.Context, Hashable]
"""A queued call: its item, the future its caller awaits, the caller's context, its group."""


class GroupCommit(Generic[Item, Result]):
    """A queue per lane whose items go out together, group-commit style."""

    def __init__(
        self,
        *,
        run_one: Callable[[Item], Awaitable[Result]],
        run_batch: Callable[[Sequence[Item]], Awaitable[Sequence[Result | BaseException]]],
        max_batch: int,
    ) -> None:
        self.run_one = run_one
        self.run_batch = run_batch
        self.max_batch = max_batch
        self._lanes: weakref.WeakKeyDictionary[Any, _Lane[Item, Result]] = (
            weakref.WeakKeyDictionary()
        )

    def submit(self, item: Item, *, lane: object, group: Hashable = None) -> asyncio.Future[Result]:
        """Queue ``item`` on ``lane`` (what shares statements: a connection pool's client).

        ``item`` shares a batch only with items of an equal ``group``. Await
        the returned future: it holds ``item``'s result, or raises its error,
        once the statement carrying it has committed.
        """
        loop = asyncio.get_running_loop()
        queue = self._lanes.get(lane)
        if queue is None or queue.loop is not loop:
            queue = self._lanes[lane] = _Lane(self, loop)
        return queue.submit(item, group)


class _Lane(Generic[Item, Result]):
    """The items of one event loop waiting for one lane, and their flusher."""

    def __init__(self, owner: GroupCommit[Item, Result], loop: asyncio.AbstractEventLoop) -> None:
        self.owner = owner
        self.loop = loop
        self.queue: deque[_Entry[Item, Result]] = deque()
        self.flushing = False
        self._tasks: set[asyncio.Task[None]] = set()  # referenced while they run

    def submit(self, item: Item, group: Hashable) -> asyncio.Future[Result]:
        waiter: asyncio.Future[Result] = self.loop.create_future()
        self.queue.append((item, waiter, contextvars.copy_context(), group))
        if not self.flushing:
            self.flushing = True
            self._flush_soon(None)  # in the caller's own context
        return waiter

    def _flush_soon(self, context: contextvars.Context | None) -> None:
        """Send the next batch from a task of its own, in ``context`` (its oldest call's)."""
        task = self.loop.create_task(self._flush(), context=context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self) -> None:
        batch = self._take()
        try:
            outcomes: Sequence[Result | BaseException] = ()
            if len(batch) == 1:
                try:
                    outcomes = [await self.owner.run_one(batch[0][0])]
                except Exception as exc:  # the error is this caller's outcome
                    outcomes = [exc]
            elif batch:
                outcomes = await self.owner.run_batch([entry[0] for entry in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"{len(outcomes)} outcomes for {len(batch)} items")
        except BaseException:
            self._fail(batch, queued=self.queue)
            self.flushing = False
            raise
        # Calls that arrived meanwhile form the next batch, sent from a task
        # in its oldest call's context, scheduled before this batch's callers
        # resume: it goes out first, and the database works on it while they
        # run. With none, the flag is cleared in the same step that found the
        # queue empty: a call queued after this point starts a new flusher.
        while self.queue and self.queue[0][1].done():
            self.queue.popleft()  # cancelled while queued: not sent
        if self.queue:
            self._flush_soon(self.queue[0][2])
        else:
            self.flushing = False
        for (_, waiter, _, _), outcome in zip(batch, outcomes, strict=True):
            if waiter.done():
                continue  # cancelled in flight: the item stands, nobody waits for it
            if isinstance(outcome, BaseException):
                waiter.set_exception(outcome)
            else:
                waiter.set_result(outcome)

    def _take(self) -> list[_Entry[Item, Result]]:
        batch: list[_Entry[Item, Result]] = []
        limit = self.owner.max_batch
        while self.queue and len(batch) < limit:
            if batch and self.queue[0][3] != batch[0][3]:
                break  # another group: the next batch, in arrival order
            entry = self.queue.popleft()
            if not entry[1].done():  # a cancelled caller is not sent
                batch.append(entry)
        return batch

    @staticmethod
    def _fail(
        in_flight: list[_Entry[Item, Result]], *, queued: deque[_Entry[Item, Result]]
    ) -> None:
        """The flusher was stopped: its callers learn it, and how much they know."""
        for _, waiter, _, _ in in_flight:
            if not waiter.done():
                waiter.set_exception(
                    DatabaseUnavailable(
                        "the group commit was stopped while this call's statement was in "
                        "flight; the outcome is unknown: retry with the same reference_id",
                        outcome_unknown=True,
                    )
                )
        while queued:
            _, waiter, _, _ = queued.popleft()
            if not waiter.done():
                waiter.set_exception(
                    DatabaseUnavailable("the group commit was stopped; nothing was written")
                )
