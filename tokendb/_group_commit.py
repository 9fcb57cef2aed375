"""Group commit: concurrent calls share one statement, with no timer.

A generic mechanism: it knows nothing of what it sends. Its owner hands it
``run_one`` (one item, as the plain single statement) and ``run_batch``
(several items as one statement, one outcome per item, in order); the ledger
uses it for ``charge()`` (:mod:`tokendb.ledger`)::

    call() ──► lane free? ── yes ──► run_one on the caller's own task (holds the lane)
                   │ no
                   ▼
    call() ─┐                        ┌─ in flight: a lone call, or one batch (run_batch)
    call() ─┼─► queue (this lane) ───┤
    call() ─┘                        └─ arrivals meanwhile form the next batch

*No timer on the way.* A call that finds the lane free is sent at once, on
its caller's own task, as the plain single statement, so a lone call costs
what it always did. Batches form only from calls that arrive while the lane
is busy, up to ``max_batch`` items; one of them alone is handed back to its
caller to send on its own task, like a lone call. One batch is in flight per
lane (an event loop and a connection pool): two or three were measured, and
their smaller batches contending for the same locks were slower.

*Durable.* A caller resumes only after the statement carrying its item has
committed; nothing waits in memory across a crash.

*Context.* A batch runs in the context (:mod:`contextvars`) of its oldest
call, and a lone call on its caller's task, in its own: settings a caller
changed for a block (:func:`tokendb._settings.using`), and a request's
logging or tracing context, reach its own statement, never one of a caller
that came later. Calls share a batch only with calls of the same ``group``
(the ledger's: the caller's settings), so no call runs under another
caller's settings.

*Isolation.* Nobody waits for someone else's slow call for longer than
the lane's patience: ``patience`` seconds, or :data:`PATIENCE_FACTOR` times
the lane's usual statement time when the machine is slower than that (an
average of its recent lone calls and batches), so a loaded machine does not
take every statement for a stuck one. A lone call still in flight after it
stops holding the lane (it goes on, on its
caller's task, and the queue behind it is sent), and ``run_batch`` is
handed the lane's patience and expected to bound its own waits by it (the ledger's batch runs
with that ``lock_timeout``) and to answer :data:`ALONE` for an item it could
not decide in time: that item's caller then sends it with ``run_one`` on its
own task, outside the lane, with the normal bounds.

*Cancellation.* A caller that gives up before its item is sent is never
charged with it: a lone call is its caller's own statement, so cancelling
the caller cancels the statement, as without coalescing; a queued call is
dropped before its batch is built, and ``run_batch`` is told (``given_up``)
who gave up meanwhile, to leave them out when it finally sends. Once the
statement carrying an item is sent, it might commit: the outcome is what the
database did. A lone statement is cancelled with its caller (the server
rolls it back unless it had committed already); a batch is not cancelled
(other callers ride on it) and its item commits or fails as if the caller
had stayed. Either way the caller does not learn which: retry with the same
``reference_id``.
"""

from __future__ import annotations

import asyncio
import contextvars
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Sequence
from typing import Any, Final, Generic, TypeAlias, TypeVar, cast

from tokendb.errors import DatabaseUnavailable

__all__ = ["ALONE", "Alone", "GroupCommit"]

Item = TypeVar("Item")
Result = TypeVar("Result")


class Alone:
    """The type of :data:`ALONE`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ALONE"


ALONE: Final = Alone()
"""``run_batch``'s outcome for an item it did not decide: its caller sends it alone."""


class _Turn:
    """A queued call's outcome that says: the lane is yours, send your item alone."""

    __slots__ = ()


_TURN: Final = _Turn()

_Entry: TypeAlias = tuple[Item, "asyncio.Future[Any]", contextvars.Context, Hashable]
"""A queued call: its item, the future its caller awaits, the caller's context, its group."""

PATIENCE_FACTOR = 4.0
"""A lane's patience is at least this many times its usual statement time."""

GivenUp: TypeAlias = Callable[[int], bool]
"""``given_up(i)``: whether the caller of item ``i`` of a batch stopped waiting."""


class GroupCommit(Generic[Item, Result]):
    """A queue per lane whose items go out together, group-commit style."""

    def __init__(
        self,
        *,
        run_one: Callable[[Item], Awaitable[Result]],
        run_batch: Callable[
            [Sequence[Item], GivenUp, float],
            Awaitable[Sequence[Result | BaseException | Alone]],
        ],
        max_batch: int,
        patience: float,
    ) -> None:
        self.run_one = run_one
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.patience = patience
        """Seconds a call in flight may hold the lane (and a batch wait for a lock), at least."""
        self._lanes: weakref.WeakKeyDictionary[Any, _Lane[Item, Result]] = (
            weakref.WeakKeyDictionary()
        )

    def call(
        self, item: Item, *, lane: object, group: Hashable = None
    ) -> Coroutine[Any, Any, Result]:
        """Send ``item`` on ``lane`` (what shares statements: a connection pool's client).

        ``item`` shares a batch only with items of an equal ``group``. Await
        the returned coroutine: it returns ``item``'s result, or raises its
        error, once the statement carrying it has committed.
        """
        loop = asyncio.get_running_loop()
        queue = self._lanes.get(lane)
        if queue is None or queue.loop is not loop:
            queue = self._lanes[lane] = _Lane(self, loop)
        return queue.call(item, group)  # one coroutine less on every call's path


class _Lane(Generic[Item, Result]):
    """The calls of one event loop waiting for one lane, and who holds the lane."""

    def __init__(self, owner: GroupCommit[Item, Result], loop: asyncio.AbstractEventLoop) -> None:
        self.owner = owner
        self.loop = loop
        self.queue: deque[_Entry[Item]] = deque()
        self.busy = False
        """A lone call or a batch holds the lane: new calls queue."""
        self.holder: object | None = None
        """The lone call holding the lane (None: a batch, or a call about to take its turn)."""
        self.since = 0.0
        self.usual = 0.0
        """Seconds a statement of this lane usually takes (a moving average)."""
        self.timer: asyncio.TimerHandle | None = None
        """Armed while calls queue behind a lone call: ``patience`` after it started."""
        self._tasks: set[asyncio.Task[None]] = set()  # referenced while they run

    async def call(self, item: Item, group: Hashable) -> Result:
        if self.busy:
            waiter: asyncio.Future[Any] = self.loop.create_future()
            self.queue.append((item, waiter, contextvars.copy_context(), group))
            if self.holder is not None and self.timer is None:
                self._arm()
            try:
                outcome = await waiter
            except asyncio.CancelledError:
                if _holds(waiter, _TURN):
                    self._release()  # handed the lane as it gave up: pass it on
                raise
            if outcome is ALONE:
                return await self.owner.run_one(item)  # outside the lane
            if outcome is not _TURN:
                return cast(Result, outcome)
        else:
            self.busy = True
        # Alone, on the caller's own task, holding the lane.
        hold = self.holder = object()
        self.since = self.loop.time()
        if self.queue:
            self._arm()
        try:
            result = await self.owner.run_one(item)
            if self.holder is hold:  # not overdue: a usual statement
                self._took(self.loop.time() - self.since)
            return result
        finally:
            if self.holder is hold:
                self._release()

    def _arm(self) -> None:
        self.timer = self.loop.call_at(self.since + self.patience(), self._overdue)

    def patience(self) -> float:
        return max(self.owner.patience, PATIENCE_FACTOR * self.usual)

    def _took(self, seconds: float) -> None:
        self.usual += (seconds - self.usual) / 16

    def _overdue(self) -> None:
        # The lone call in flight goes on, on its caller's task; the calls
        # queued behind it no longer wait for it.
        self.timer = None
        self._release()

    def _release(self) -> None:
        """The lane is free: hand it to the next call alone or the next batch, or clear it."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.holder = None
        batch = self._take() if self.queue else []
        if not batch:
            self.busy = False
        elif len(batch) == 1:
            batch[0][1].set_result(_TURN)  # the lane is its caller's once it resumes
        else:
            # From a task in the batch's oldest call's context, scheduled before
            # the last batch's callers resume: it goes out first, and the
            # database works on it while they run.
            task = self.loop.create_task(self._flush(batch), context=batch[0][2])
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _flush(self, batch: list[_Entry[Item]]) -> None:
        try:
            started = self.loop.time()
            outcomes = await self.owner.run_batch(
                [entry[0] for entry in batch],
                lambda index: batch[index][1].done(),
                self.patience(),
            )
            self._took(self.loop.time() - started)
            if len(outcomes) != len(batch):
                raise RuntimeError(f"{len(outcomes)} outcomes for {len(batch)} items")
        except BaseException:
            self._fail(batch, queued=self.queue)
            self.busy = False
            raise
        self._release()
        for (_, waiter, _, _), outcome in zip(batch, outcomes, strict=True):
            if waiter.done():
                continue  # gave up: nobody waits for it any more
            if isinstance(outcome, BaseException):
                waiter.set_exception(outcome)
            else:
                waiter.set_result(outcome)

    def _take(self) -> list[_Entry[Item]]:
        batch: list[_Entry[Item]] = []
        limit = self.owner.max_batch
        while self.queue and len(batch) < limit:
            if batch and self.queue[0][3] != batch[0][3]:
                break  # another group: the next batch, in arrival order
            entry = self.queue.popleft()
            if not entry[1].done():  # a caller who gave up is not sent
                batch.append(entry)
        return batch

    @staticmethod
    def _fail(in_flight: list[_Entry[Item]], *, queued: deque[_Entry[Item]]) -> None:
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


def _holds(future: asyncio.Future[Any], value: object) -> bool:
    """Whether ``future`` completed with the result ``value``."""
    return (
        future.done()
        and not future.cancelled()
        and future.exception() is None
        and future.result() is value
    )
