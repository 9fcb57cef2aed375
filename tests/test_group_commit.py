"""Tests for tokendb._group_commit: the generic queue, without a database.

The ledger's use of it (outcomes, cancellation, lost batches) is tested in
``tests/test_coalescing.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Sequence
from contextvars import ContextVar
from typing import TypeVar

import pytest

import tokendb
from tokendb._group_commit import GroupCommit

WHO: ContextVar[str] = ContextVar("who", default="nobody")


class Lane:
    """A lane key (weakly referenced, as a connection pool's client is)."""


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

    async def run_batch(items: Sequence[str]) -> list[str]:
        seen.append((tuple(items), WHO.get()))
        return list(items)

    queue: GroupCommit[str, str] = GroupCommit(run_one=run_one, run_batch=run_batch, max_batch=8)
    lane = Lane()

    async def call(item: str, who: str) -> str:
        WHO.set(who)
        return await queue.submit(item, lane=lane)

    first = asyncio.create_task(call("first", "A"))
    await in_flight.wait()
    alone = asyncio.create_task(call("alone", "B"))
    await asyncio.sleep(0)
    gate.set()
    assert list(await asyncio.gather(first, alone)) == ["first", "alone"]
    gate.clear()
    in_flight.clear()

    # Two that arrive while a batch is in flight share the next one, in the older's context.
    first = asyncio.create_task(call("first", "A"))
    await in_flight.wait()
    together = [asyncio.create_task(call(item, who)) for item, who in (("c", "C"), ("d", "D"))]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(first, *together) == ["first", "c", "d"]
    assert seen == [("first", "A"), ("alone", "B"), ("first", "A"), (("c", "d"), "C")]


class ExecutorBug(Exception):
    """What a broken executor raises (tokendb's never raise: each item's error is its outcome)."""


async def outcomes(calls: list[asyncio.Future[str]]) -> list[object]:
    """Each call's result or error; a call left without an outcome fails the test (timeout)."""
    return list(await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5))


async def test_a_failing_lone_call_gets_its_error_and_the_queue_goes_on() -> None:
    async def run_one(item: str) -> str:
        if item == "bad":
            raise ExecutorBug(item)
        return item

    async def run_batch(items: Sequence[str]) -> list[str]:
        return list(items)

    queue: GroupCommit[str, str] = GroupCommit(run_one=run_one, run_batch=run_batch, max_batch=8)
    lane = Lane()
    (failed,) = await outcomes([queue.submit("bad", lane=lane)])
    assert isinstance(failed, ExecutorBug)
    assert await outcomes([queue.submit("good", lane=lane)]) == ["good"]


@pytest.mark.parametrize("stop", ["executor raises", "flusher cancelled"])
async def test_a_stopped_flusher_leaves_no_caller_without_an_outcome(stop: str) -> None:
    """Every caller gets exactly one outcome: the batch in flight learns its outcome is
    unknown, the calls queued behind it that nothing was written; the lane works again."""
    gate, in_flight = asyncio.Event(), asyncio.Event()

    async def run_one(item: str) -> str:
        return item

    async def run_batch(items: Sequence[str]) -> list[str]:
        if "first" in items:
            in_flight.set()
            await gate.wait()
            raise ExecutorBug("a broken executor")
        return list(items)

    queue: GroupCommit[str, str] = GroupCommit(run_one=run_one, run_batch=run_batch, max_batch=2)
    lane = Lane()
    calls = [queue.submit(item, lane=lane) for item in ("first", "second", "queued")]
    await in_flight.wait()
    (flusher,) = queue._lanes[lane]._tasks
    if stop == "flusher cancelled":
        flusher.cancel()
    else:
        gate.set()
    first, second, queued = await outcomes(calls)
    with contextlib.suppress(ExecutorBug, asyncio.CancelledError):
        await flusher
    for lost in (first, second):
        assert isinstance(lost, tokendb.DatabaseUnavailable) and lost.outcome_unknown
    assert isinstance(queued, tokendb.DatabaseUnavailable) and not queued.outcome_unknown
    assert await outcomes([queue.submit("later", lane=lane)]) == ["later"]


async def test_the_next_batch_is_sent_before_the_last_ones_callers_resume() -> None:
    """The database works on the next batch while the callers of the last one run their
    own code (the overlap that group commit's throughput rests on)."""
    gate, in_flight = asyncio.Event(), asyncio.Event()
    events: list[str] = []

    async def run_one(item: str) -> str:
        events.append(f"sent {item}")
        if item == "first":
            in_flight.set()
            await gate.wait()
        return item

    async def run_batch(items: Sequence[str]) -> list[str]:
        events.append(f"sent {'+'.join(items)}")
        return list(items)

    queue: GroupCommit[str, str] = GroupCommit(run_one=run_one, run_batch=run_batch, max_batch=8)
    lane = Lane()

    async def call(item: str) -> None:
        await queue.submit(item, lane=lane)
        events.append(f"resumed {item}")

    calls = [asyncio.create_task(call("first"))]
    await in_flight.wait()
    calls += [asyncio.create_task(call(item)) for item in ("b", "c")]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*calls)
    assert events.index("sent b+c") < events.index("resumed first")


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

    async def run_batch(items: Sequence[str]) -> list[str]:
        sent.append(tuple(items))
        return list(items)

    queue: GroupCommit[str, str] = GroupCommit(run_one=run_one, run_batch=run_batch, max_batch=8)
    lane = Lane()
    calls = [queue.submit("first", lane=lane, group="x")]
    await in_flight.wait()
    calls += [
        queue.submit(item, lane=lane, group=group)
        for item, group in (("a", "x"), ("b", "x"), ("c", "y"), ("d", "x"))
    ]
    gate.set()
    assert await outcomes(calls) == ["first", "a", "b", "c", "d"]
    assert sent == [("first",), ("a", "b"), ("c",), ("d",)]  # arrival order kept


# --- batches, lanes and cancellation, with recording runners ------------------------

T = TypeVar("T")


async def settled(call: Awaitable[T]) -> T:
    """``await call``, failing (not hanging) when the queue lost it."""
    return await asyncio.wait_for(call, 5)


class Runners:
    """``run_one``/``run_batch`` that record each call and wait for ``gate`` first."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []
        self.gate = asyncio.Event()

    async def run_one(self, item: int) -> str:
        self.calls.append(("one", [item]))
        await self.gate.wait()
        return f"r{item}"

    async def run_batch(self, items: Sequence[int]) -> list[str | BaseException]:
        self.calls.append(("batch", list(items)))
        await self.gate.wait()
        return [f"r{item}" if item >= 0 else ValueError(item) for item in items]

    def queue(self, max_batch: int = 3) -> GroupCommit[int, str]:
        return GroupCommit(run_one=self.run_one, run_batch=self.run_batch, max_batch=max_batch)


async def test_a_lone_call_goes_alone_and_calls_meanwhile_form_batches_of_at_most_max() -> None:
    runners = Runners()
    queue, lane = runners.queue(max_batch=3), Lane()
    first = queue.submit(0, lane=lane)
    await asyncio.sleep(0)  # in flight, waiting at the gate
    rest = [queue.submit(item, lane=lane) for item in range(1, 8)]
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
    first = queue.submit(0, lane=lane)
    await asyncio.sleep(0)
    batch = [queue.submit(item, lane=lane) for item in (1, -2, 3)]
    runners.gate.set()
    await settled(first)
    outcomes = await settled(asyncio.gather(*batch, return_exceptions=True))
    assert outcomes[0] == "r1" and outcomes[2] == "r3"
    assert isinstance(outcomes[1], ValueError)


async def test_lanes_do_not_share_batches() -> None:
    runners = Runners()
    queue = runners.queue()
    calls = [queue.submit(item, lane=lane) for item, lane in ((0, Lane()), (1, Lane()))]
    runners.gate.set()
    assert await settled(asyncio.gather(*calls)) == ["r0", "r1"]
    assert runners.calls == [("one", [0]), ("one", [1])]


async def test_a_caller_cancelled_while_queued_is_not_sent_and_one_in_flight_stands() -> None:
    runners = Runners()
    queue, lane = runners.queue(), Lane()
    in_flight = queue.submit(0, lane=lane)
    await asyncio.sleep(0)
    cancelled, kept = queue.submit(1, lane=lane), queue.submit(2, lane=lane)
    cancelled.cancel()
    in_flight.cancel()  # its item is already sent: nobody waits for it any more
    runners.gate.set()
    assert await settled(kept) == "r2"
    assert runners.calls == [("one", [0]), ("one", [2])]


async def test_a_batch_runner_that_loses_an_outcome_fails_its_callers_rather_than_hang() -> None:
    """run_batch must give one outcome per item; when it does not, nobody is left
    waiting for ever: the batch's callers learn that their outcome is unknown."""
    runners = Runners()

    async def loses_one(items: Sequence[int]) -> list[str | BaseException]:
        outcomes: list[str | BaseException] = [f"r{item}" for item in items]
        return outcomes[:-1]

    queue = GroupCommit(run_one=runners.run_one, run_batch=loses_one, max_batch=3)
    lane = Lane()
    calls = [queue.submit(item, lane=lane) for item in (0, 1, 2)]  # one batch
    lost = await settled(asyncio.gather(*calls, return_exceptions=True))
    assert all(isinstance(o, tokendb.DatabaseUnavailable) and o.outcome_unknown for o in lost)
