"""Tests for tokendb._group_commit: the generic queue, without a database.

The ledger's use of it (outcomes, cancellation, lost batches, locked users) is
tested in ``tests/test_coalescing.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable, Sequence
from contextvars import ContextVar
from typing import Any, TypeVar

import pytest

import tokendb
from tokendb._group_commit import ALONE, Alone, GroupCommit

WHO: ContextVar[str] = ContextVar("who", default="nobody")
PATIENT = 60.0  # seconds: no call in these tests is ever overdue unless it says so


class Lane:
    """A lane key (weakly referenced, as a connection pool's client is)."""


def submit(
    queue: GroupCommit[Any, Any], item: Any, lane: Lane, group: Hashable = None
) -> asyncio.Task[Any]:
    return asyncio.ensure_future(queue.call(item, lane=lane, group=group))


async def test_each_batch_runs_in_the_context_of_its_oldest_caller() -> None:
    """A call's context (tokendb's settings of a ``using`` block, a request's logging or
    tracing context) reaches the statement that carries it, not a later caller's: the
    queue does not run every later batch in the context of whoever started it."""
    gate, in_flight = asyncio.Event(), asyncio.Event()
    seen: list[tuple[object, str]] = []

    async def run_one(item: str) -> str:
        seen.append((item, WHO.get()))
        if item == "first":
            in_flight.set()
            await gate.wait()  # in flight while the others arrive
        return item

    async def run_batch(items: Sequence[str], given_up: object, patience: float) -> list[str]:
        seen.append((tuple(items), WHO.get()))
        return list(items)

    queue: GroupCommit[str, str] = GroupCommit(
        run_one=run_one, run_batch=run_batch, max_batch=8, patience=PATIENT
    )
    lane = Lane()

    async def call(item: str, who: str) -> str:
        WHO.set(who)
        return await queue.call(item, lane=lane)

    first = asyncio.create_task(call("first", "A"))
    await in_flight.wait()
    alone = asyncio.create_task(call("alone", "B"))
    await asyncio.sleep(0)
    gate.set()
    assert list(await asyncio.gather(first, alone)) == ["first", "alone"]
    gate.clear()
    in_flight.clear()

    # Two that arrive while a call is in flight share the next batch, in the older's context.
    first = asyncio.create_task(call("first", "A"))
    await in_flight.wait()
    together = [asyncio.create_task(call(item, who)) for item, who in (("c", "C"), ("d", "D"))]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(first, *together) == ["first", "c", "d"]
    assert seen == [("first", "A"), ("alone", "B"), ("first", "A"), (("c", "d"), "C")]


class ExecutorBug(Exception):
    """What a broken executor raises (tokendb's never raise: each item's error is its outcome)."""


async def outcomes(calls: Sequence[Awaitable[Any]]) -> list[object]:
    """Each call's result or error; a call left without an outcome fails the test (timeout)."""
    return list(await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5))


async def test_a_failing_lone_call_gets_its_error_and_the_queue_goes_on() -> None:
    async def run_one(item: str) -> str:
        if item == "bad":
            raise ExecutorBug(item)
        return item

    async def run_batch(items: Sequence[str], given_up: object, patience: float) -> list[str]:
        return list(items)

    queue: GroupCommit[str, str] = GroupCommit(
        run_one=run_one, run_batch=run_batch, max_batch=8, patience=PATIENT
    )
    lane = Lane()
    (failed,) = await outcomes([submit(queue, "bad", lane)])
    assert isinstance(failed, ExecutorBug)
    assert await outcomes([submit(queue, "good", lane)]) == ["good"]


@pytest.mark.parametrize("stop", ["executor raises", "flusher cancelled"])
async def test_a_stopped_flusher_leaves_no_caller_without_an_outcome(stop: str) -> None:
    """Every caller gets exactly one outcome: the batch in flight learns its outcome is
    unknown, the calls queued behind it that nothing was written; the lane works again."""
    gate, in_flight = asyncio.Event(), asyncio.Event()

    async def run_one(item: str) -> str:
        await asyncio.sleep(0)  # in flight while the others queue
        return item

    async def run_batch(items: Sequence[str], given_up: object, patience: float) -> list[str]:
        if "first" in items:
            in_flight.set()
            await gate.wait()
            raise ExecutorBug("a broken executor")
        return list(items)

    queue: GroupCommit[str, str] = GroupCommit(
        run_one=run_one, run_batch=run_batch, max_batch=2, patience=PATIENT
    )
    lane = Lane()
    calls = [submit(queue, item, lane) for item in ("lone", "first", "second", "queued")]
    await in_flight.wait()
    (flusher,) = queue._lanes[lane]._tasks
    if stop == "flusher cancelled":
        flusher.cancel()
    else:
        gate.set()
    lone, first, second, queued = await outcomes(calls)
    with contextlib.suppress(ExecutorBug, asyncio.CancelledError):
        await flusher
    assert lone == "lone"
    for lost in (first, second):
        assert isinstance(lost, tokendb.DatabaseUnavailable) and lost.outcome_unknown
    assert isinstance(queued, tokendb.DatabaseUnavailable) and not queued.outcome_unknown
    assert await outcomes([submit(queue, "later", lane)]) == ["later"]


async def test_the_next_batch_is_sent_before_the_last_ones_callers_resume() -> None:
    """The database works on the next batch while the callers of the last one run their
    own code (the overlap that group commit's throughput rests on)."""
    gate, in_flight = asyncio.Event(), asyncio.Event()
    events: list[str] = []

    async def run_one(item: str) -> str:
        events.append(f"sent {item}")
        await asyncio.sleep(0)
        return item

    async def run_batch(items: Sequence[str], given_up: object, patience: float) -> list[str]:
        events.append(f"sent {'+'.join(items)}")
        if "b" in items:
            in_flight.set()
            await gate.wait()
        return list(items)

    queue: GroupCommit[str, str] = GroupCommit(
        run_one=run_one, run_batch=run_batch, max_batch=8, patience=PATIENT
    )
    lane = Lane()

    async def call(item: str) -> None:
        await queue.call(item, lane=lane)
        events.append(f"resumed {item}")

    calls = [asyncio.create_task(call(item)) for item in ("first", "b", "c")]
    await in_flight.wait()
    calls += [asyncio.create_task(call(item)) for item in ("d", "e")]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*calls)
    assert events.index("sent d+e") < events.index("resumed b")


async def test_calls_share_a_batch_only_with_calls_of_their_group() -> None:
    """The ledger groups by the caller's settings: a call never runs under another's."""
    gate, in_flight = asyncio.Event(), asyncio.Event()
    sent: list[tuple[str, ...]] = []

    async def run_one(item: str) -> str:
        sent.append((item,))
        if item == "first":
            in_flight.set()
            await gate.wait()
        return item

    async def run_batch(items: Sequence[str], given_up: object, patience: float) -> list[str]:
        sent.append(tuple(items))
        return list(items)

    queue: GroupCommit[str, str] = GroupCommit(
        run_one=run_one, run_batch=run_batch, max_batch=8, patience=PATIENT
    )
    lane = Lane()
    calls = [submit(queue, "first", lane, "x")]
    await in_flight.wait()
    calls += [
        submit(queue, item, lane, group)
        for item, group in (("a", "x"), ("b", "x"), ("c", "y"), ("d", "x"))
    ]
    await asyncio.sleep(0)
    gate.set()
    assert await outcomes(calls) == ["first", "a", "b", "c", "d"]
    assert sent == [("first",), ("a", "b"), ("c",), ("d",)]  # arrival order kept


# --- batches, lanes, isolation and cancellation, with recording runners -------------

T = TypeVar("T")


async def settled(call: Awaitable[T]) -> T:
    """``await call``, failing (not hanging) when the queue lost it."""
    return await asyncio.wait_for(call, 5)


class Runners:
    """``run_one``/``run_batch`` that record each call and wait for ``gate`` first."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []
        self.gate = asyncio.Event()
        self.batch_gate = asyncio.Event()  # batches wait for both gates
        self.batch_gate.set()
        self.cancelled: list[int] = []
        self.gave_up: list[list[int]] = []
        self.alone: set[int] = set()  # items run_batch leaves to their callers

    async def run_one(self, item: int) -> str:
        self.calls.append(("one", [item]))
        try:
            await asyncio.sleep(0)  # in flight for a turn at least, gate or not
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled.append(item)
            raise
        return f"r{item}"

    async def run_batch(
        self, items: Sequence[int], given_up: Callable[[int], bool], patience: float
    ) -> list[str | BaseException | Alone]:
        self.calls.append(("batch", list(items)))
        await self.gate.wait()
        await self.batch_gate.wait()
        self.gave_up.append([item for index, item in enumerate(items) if given_up(index)])
        return [
            ALONE if item in self.alone else f"r{item}" if item >= 0 else ValueError(item)
            for item in items
        ]

    def queue(self, max_batch: int = 3, patience: float = PATIENT) -> GroupCommit[int, str]:
        return GroupCommit(
            run_one=self.run_one, run_batch=self.run_batch, max_batch=max_batch, patience=patience
        )


async def test_a_lone_call_goes_alone_and_calls_meanwhile_form_batches_of_at_most_max() -> None:
    runners = Runners()
    queue, lane = runners.queue(max_batch=3), Lane()
    first = submit(queue, 0, lane)
    await asyncio.sleep(0)  # in flight, waiting at the gate
    rest = [submit(queue, item, lane) for item in range(1, 8)]
    await asyncio.sleep(0)
    runners.gate.set()
    assert await settled(asyncio.gather(first, *rest)) == [f"r{item}" for item in range(8)]
    assert runners.calls == [
        ("one", [0]),
        ("batch", [1, 2, 3]),
        ("batch", [4, 5, 6]),
        ("one", [7]),
    ]


async def test_each_caller_gets_its_own_outcome_from_a_batch() -> None:
    runners = Runners()
    queue, lane = runners.queue(), Lane()
    first = submit(queue, 0, lane)
    await asyncio.sleep(0)
    batch = [submit(queue, item, lane) for item in (1, -2, 3)]
    await asyncio.sleep(0)
    runners.gate.set()
    await settled(first)
    outcomes = await settled(asyncio.gather(*batch, return_exceptions=True))
    assert outcomes[0] == "r1" and outcomes[2] == "r3"
    assert isinstance(outcomes[1], ValueError)


async def test_lanes_do_not_share_batches() -> None:
    runners = Runners()
    queue = runners.queue()
    calls = [submit(queue, item, lane) for item, lane in ((0, Lane()), (1, Lane()))]
    await asyncio.sleep(0)
    runners.gate.set()
    assert await settled(asyncio.gather(*calls)) == ["r0", "r1"]
    assert runners.calls == [("one", [0]), ("one", [1])]


async def test_a_lone_call_runs_on_its_callers_task_and_giving_up_cancels_it() -> None:
    """Cancelling a lone call cancels what it runs (the statement), as without
    coalescing; the lane is free again for the calls queued behind it."""
    runners = Runners()
    queue, lane = runners.queue(), Lane()
    lone = submit(queue, 0, lane)
    await asyncio.sleep(0)
    behind = submit(queue, 1, lane)
    await asyncio.sleep(0)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(lone, 0.01)
    assert runners.cancelled == [0]
    runners.gate.set()
    assert await settled(behind) == "r1"


async def test_a_caller_cancelled_while_queued_is_not_sent_and_one_in_a_batch_stands() -> None:
    runners = Runners()
    runners.batch_gate.clear()
    queue, lane = runners.queue(), Lane()
    lone = submit(queue, 0, lane)
    await asyncio.sleep(0)
    cancelled, batched, kept = (
        submit(queue, 1, lane),
        submit(queue, 2, lane),
        submit(queue, 3, lane),
    )
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.sleep(0)
    runners.gate.set()
    assert await settled(lone) == "r0"
    assert runners.calls[-1] == ("batch", [2, 3])  # in flight
    batched.cancel()  # its item was handed to the runner: it stands, nobody waits for it
    runners.batch_gate.set()
    assert await settled(kept) == "r3"
    assert runners.calls == [("one", [0]), ("batch", [2, 3])]
    assert runners.gave_up == [[2]]  # what the runner learns, to leave out what it has not sent


async def test_a_batch_runner_learns_who_gave_up_before_it_sends() -> None:
    """``given_up`` answers when asked: a caller who stops waiting while its batch waits
    (for a connection, say) can still be left out of the statement."""
    runners = Runners()
    runners.batch_gate.clear()
    queue, lane = runners.queue(), Lane()
    lone = submit(queue, 0, lane)
    await asyncio.sleep(0)
    waiting = [submit(queue, item, lane) for item in (1, 2)]
    await asyncio.sleep(0)
    runners.gate.set()
    assert await settled(lone) == "r0"
    assert runners.calls[-1] == ("batch", [1, 2])  # waits at the gate
    waiting[0].cancel()
    runners.batch_gate.set()
    assert await settled(waiting[1]) == "r2"
    assert runners.gave_up == [[1]]


async def test_a_lone_call_past_its_patience_stops_holding_up_the_queue() -> None:
    """One slow call never delays the others beyond ``patience``: they go out while it is
    still in flight (it goes on, on its own caller's task)."""
    sent: list[Any] = []
    slow_gate = asyncio.Event()

    async def run_one(item: str) -> str:
        sent.append(item)
        if item == "slow":
            await slow_gate.wait()
        return item

    async def run_batch(items: Sequence[str], given_up: object, patience: float) -> list[str]:
        sent.append(tuple(items))
        return list(items)

    queue: GroupCommit[str, str] = GroupCommit(
        run_one=run_one, run_batch=run_batch, max_batch=8, patience=0.05
    )
    lane = Lane()
    slow = submit(queue, "slow", lane)
    await asyncio.sleep(0)
    others = [submit(queue, item, lane) for item in ("a", "b")]
    assert await settled(asyncio.gather(*others)) == ["a", "b"]
    assert not slow.done()
    later = await settled(submit(queue, "c", lane))  # the lane is free again
    assert later == "c" and not slow.done()
    slow_gate.set()
    assert await settled(slow) == "slow"
    assert sent == ["slow", ("a", "b"), "c"]


async def test_an_item_a_batch_leaves_alone_is_sent_by_its_caller() -> None:
    runners = Runners()
    runners.alone = {2}
    queue, lane = runners.queue(), Lane()
    lone = submit(queue, 0, lane)
    await asyncio.sleep(0)
    batch = [submit(queue, item, lane) for item in (1, 2, 3)]
    await asyncio.sleep(0)
    runners.gate.set()
    assert await settled(asyncio.gather(lone, *batch)) == ["r0", "r1", "r2", "r3"]
    assert runners.calls == [("one", [0]), ("batch", [1, 2, 3]), ("one", [2])]


async def test_a_caller_handed_the_lane_as_it_gives_up_passes_it_on() -> None:
    runners = Runners()
    queue, lane = runners.queue(), Lane()
    lone = submit(queue, 0, lane)
    await asyncio.sleep(0)
    turn = submit(queue, 1, lane)
    await asyncio.sleep(0)
    runners.gate.set()
    await asyncio.sleep(0)  # the lone call ends and hands the lane to item 1 ...
    assert lone.done() and not turn.done()
    turn.cancel()  # ... whose caller gives up before it resumes
    with pytest.raises(asyncio.CancelledError):
        await turn
    assert await settled(submit(queue, 2, lane)) == "r2"
    assert runners.calls == [("one", [0]), ("one", [2])]


async def test_a_batch_runner_that_loses_an_outcome_fails_its_callers_rather_than_hang() -> None:
    """run_batch must give one outcome per item; when it does not, nobody is left
    waiting for ever: the batch's callers learn that their outcome is unknown."""
    runners = Runners()
    runners.gate.set()

    async def loses_one(
        items: Sequence[int], given_up: Callable[[int], bool], patience: float
    ) -> list[str | BaseException | Alone]:
        outcomes: list[str | BaseException | Alone] = [f"r{item}" for item in items]
        return outcomes[:-1]

    queue = GroupCommit(run_one=runners.run_one, run_batch=loses_one, max_batch=3, patience=PATIENT)
    lane = Lane()
    calls = [submit(queue, item, lane) for item in (0, 1, 2)]  # one alone, one batch
    lone, *lost = await settled(asyncio.gather(*calls, return_exceptions=True))
    assert lone == "r0"
    assert all(isinstance(o, tokendb.DatabaseUnavailable) and o.outcome_unknown for o in lost)


async def test_on_a_slow_machine_the_patience_follows_the_usual_statement_time() -> None:
    """A lane whose statements all take 30 ms does not take the next 30 ms call for a
    stuck one (patience 10 ms): the calls queued behind it wait for it, as a batch."""
    sent: list[Any] = []

    async def run_one(item: int) -> int:
        sent.append(item)
        await asyncio.sleep(0.03)
        return item

    async def run_batch(items: Sequence[int], given_up: object, patience: float) -> list[int]:
        sent.append(tuple(items))
        return list(items)

    queue: GroupCommit[int, int] = GroupCommit(
        run_one=run_one, run_batch=run_batch, max_batch=8, patience=0.01
    )
    lane = Lane()
    for item in range(40):
        await queue.call(item, lane=lane)
    assert queue._lanes[lane].patience() > 0.09
    sent.clear()
    slow = submit(queue, 100, lane)
    await asyncio.sleep(0)
    behind = [submit(queue, item, lane) for item in (101, 102)]
    assert await settled(asyncio.gather(slow, *behind)) == [100, 101, 102]
    assert sent == [100, (101, 102)]  # not sent while 100 was in flight
