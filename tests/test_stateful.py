"""Hypothesis stateful test: random sequences of public calls against a Python model of the books.

The model has holds too: what a user can spend is its balance minus its
active holds; a hold is captured, released, or expires (its ``expires_at``
moved into the past as the owner, so time is the test's), and expiry takes
effect without ``expire_holds`` (which is a rule of its own).

The state machine runs in a worker thread and hands each call to the test's
event loop (where tokendb's pool lives), so hypothesis drives real async
calls on the real database and shrinks a failing sequence to a minimal one.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

import tokendb
from tests.helpers import tamper
from tokendb.testing import truncate_all

T = TypeVar("T")


@dataclass
class Charge:
    id: uuid.UUID
    user_id: uuid.UUID
    amount: int
    refunded: int = 0


@dataclass
class Session:
    id: uuid.UUID
    user_id: uuid.UUID
    ended: bool = False
    tokens_used: int = 0


@dataclass
class Hold:
    id: uuid.UUID
    user_id: uuid.UUID
    amount: int
    state: str = "active"  # captured, released, expired (marked or not)
    captured: tuple[int, uuid.UUID] | None = None


@dataclass
class Books:
    balances: dict[uuid.UUID, int] = field(default_factory=dict)
    references: dict[tuple[uuid.UUID, str, uuid.UUID], tuple[int, uuid.UUID]] = field(
        default_factory=dict
    )


amounts = st.integers(min_value=1, max_value=150)


def make_machine(loop: asyncio.AbstractEventLoop, owner_url: str) -> type[RuleBasedStateMachine]:
    class LedgerMachine(RuleBasedStateMachine):
        users = Bundle("users")
        charges = Bundle("charges")
        sessions = Bundle("sessions")
        references = Bundle("references")
        holds = Bundle("holds")

        def __init__(self) -> None:
            super().__init__()
            self.books = Books()
            self.charge_rows: dict[uuid.UUID, Charge] = {}
            self.session_rows: dict[uuid.UUID, Session] = {}
            self.hold_rows: dict[uuid.UUID, Hold] = {}

        def available(self, user_id: uuid.UUID) -> int:
            held = sum(
                h.amount
                for h in self.hold_rows.values()
                if h.user_id == user_id and h.state == "active"
            )
            return self.books.balances[user_id] - held

        def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
            return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=60)

        @initialize()
        def empty_database(self) -> None:
            self.run(truncate_all(database_url=owner_url))

        @rule(target=users)
        def create_user(self) -> uuid.UUID:
            user = self.run(
                tokendb.create_user(
                    email=f"{uuid.uuid4().hex[:12]}@example.com", password="password!", name="M"
                )
            )
            self.books.balances[user.id] = 100
            return user.id

        @rule(target=references)
        def new_reference(self) -> uuid.UUID:
            return uuid.uuid4()

        def _move(
            self,
            operation: Any,
            kind: str,
            user_id: uuid.UUID,
            amount: int,
            reference: uuid.UUID | None,
        ) -> tokendb.TokenTransaction | None:
            delta = -amount if kind == "usage" else amount
            key = (user_id, kind, reference) if reference is not None else None
            if key is not None and key in self.books.references:
                known_amount, known_id = self.books.references[key]
                if known_amount != delta:
                    try:
                        self.run(operation(user=user_id, amount=amount, reference_id=reference))
                    except tokendb.ReferenceConflict as exc:
                        assert exc.existing_amount == abs(known_amount)
                        return None
                    raise AssertionError("expected ReferenceConflict")
                tx = self.run(operation(user=user_id, amount=amount, reference_id=reference))
                assert tx.id == known_id
                return None  # a repeat moves nothing
            balance = self.books.balances[user_id]
            if self.available(user_id) + delta < 0:
                try:
                    self.run(operation(user=user_id, amount=amount, reference_id=reference))
                except tokendb.InsufficientTokens as exc:
                    assert (exc.balance, exc.requested) == (self.available(user_id), amount)
                    return None
                raise AssertionError("expected InsufficientTokens")
            tx = self.run(operation(user=user_id, amount=amount, reference_id=reference))
            assert tx.amount == delta and tx.balance_after == balance + delta
            self.books.balances[user_id] = balance + delta
            if key is not None:
                self.books.references[key] = (delta, tx.id)
            return tx

        @rule(target=charges, user=users, amount=amounts, reference=st.none() | references)
        def charge(self, user: uuid.UUID, amount: int, reference: uuid.UUID | None) -> Any:
            tx = self._move(tokendb.charge, "usage", user, amount, reference)
            if tx is None:
                return multiple()
            self.charge_rows[tx.id] = Charge(tx.id, user, amount)
            return tx.id

        @rule(user=users, amount=amounts, reference=st.none() | references)
        def top_up(self, user: uuid.UUID, amount: int, reference: uuid.UUID | None) -> None:
            self._move(tokendb.top_up, "topup", user, amount, reference)

        @rule(user=users, amount=amounts, reference=st.none() | references)
        def grant_bonus(self, user: uuid.UUID, amount: int, reference: uuid.UUID | None) -> None:
            self._move(tokendb.grant_bonus, "bonus", user, amount, reference)

        @rule(charge=charges, amount=st.none() | amounts)
        def refund(self, charge: uuid.UUID, amount: int | None) -> None:
            row = self.charge_rows[charge]
            refundable = row.amount - row.refunded
            wanted = refundable if amount is None else amount
            if wanted == 0 or wanted > refundable:
                try:
                    self.run(tokendb.refund(transaction=charge, amount=amount))
                except tokendb.RefundExceedsCharge as exc:
                    assert (exc.refundable, exc.requested) == (refundable, wanted)
                    return
                raise AssertionError("expected RefundExceedsCharge")
            tx = self.run(tokendb.refund(transaction=charge, amount=amount))
            assert tx.amount == wanted and tx.reference_id == charge
            row.refunded += wanted
            self.books.balances[row.user_id] += wanted

        @rule(target=sessions, user=users)
        def start_chat(self, user: uuid.UUID) -> uuid.UUID:
            api_key, _ = self.run(tokendb.issue_api_key(user=user, name="k"))
            session = self.run(tokendb.start_chat(api_key=api_key, model="m"))
            self.session_rows[session.id] = Session(session.id, user)
            return session.id

        @rule(session=sessions, tokens=st.integers(min_value=0, max_value=80))
        def add_message(self, session: uuid.UUID, tokens: int) -> None:
            row = self.session_rows[session]
            balance = self.available(row.user_id)
            call = tokendb.add_message(session=session, role="user", content="m", tokens=tokens)
            if row.ended:
                try:
                    self.run(call)
                except tokendb.ChatSessionEnded:
                    return
                raise AssertionError("expected ChatSessionEnded")
            if tokens > balance:
                try:
                    self.run(call)
                except tokendb.InsufficientTokens as exc:
                    assert (exc.balance, exc.requested) == (balance, tokens)
                    return
                raise AssertionError("expected InsufficientTokens")
            self.run(call)
            row.tokens_used += tokens
            self.books.balances[row.user_id] -= tokens

        @rule(target=holds, user=users, amount=amounts)
        def hold(self, user: uuid.UUID, amount: int) -> Any:
            available = self.available(user)
            if amount > available:
                try:
                    self.run(tokendb.hold(user=user, amount=amount, ttl=600))
                except tokendb.InsufficientTokens as exc:
                    assert (exc.balance, exc.requested) == (available, amount)
                    return multiple()
                raise AssertionError("expected InsufficientTokens")
            held = self.run(tokendb.hold(user=user, amount=amount, ttl=600))
            assert (held.user_id, held.amount, held.status) == (user, amount, "active")
            self.hold_rows[held.id] = Hold(held.id, user, amount)
            return held.id

        @rule(hold=holds, amount=st.integers(min_value=1, max_value=160))
        def capture(self, hold: uuid.UUID, amount: int) -> None:
            row = self.hold_rows[hold]
            call = tokendb.capture(hold=hold, amount=amount)
            if row.state == "captured":
                assert row.captured is not None
                if amount == row.captured[0]:
                    assert self.run(call).id == row.captured[1]
                    return
            if row.state != "active" or amount > row.amount:
                expected: type[tokendb.TokenDBError] = {
                    "expired": tokendb.HoldExpired,
                    "active": tokendb.CaptureExceedsHold,
                }.get(row.state, tokendb.HoldNotActive)
                try:
                    self.run(call)
                except expected as exc:
                    if isinstance(exc, tokendb.HoldNotActive):
                        assert exc.status == row.state
                    return
                raise AssertionError(f"expected {expected.__name__}")
            tx = self.run(call)
            balance = self.books.balances[row.user_id]
            assert (tx.amount, tx.balance_after, tx.reference_id) == (
                -amount,
                balance - amount,
                hold,
            )
            self.books.balances[row.user_id] = balance - amount
            row.state, row.captured = "captured", (amount, tx.id)
            self.charge_rows[tx.id] = Charge(tx.id, row.user_id, amount)

        @rule(hold=holds)
        def release(self, hold: uuid.UUID) -> None:
            row = self.hold_rows[hold]
            if row.state == "captured":
                try:
                    self.run(tokendb.release(hold=hold))
                except tokendb.HoldNotActive as exc:
                    assert exc.status == "captured"
                    return
                raise AssertionError("expected HoldNotActive")
            released = self.run(tokendb.release(hold=hold))
            if row.state == "active":
                row.state = "released"
            assert released.status == row.state

        @rule(hold=holds)
        def let_expire(self, hold: uuid.UUID) -> None:
            """Time passes for one hold: its expiry moves into the past (nothing marks it)."""
            row = self.hold_rows[hold]
            if row.state != "active":
                return
            self.run(
                tamper(
                    owner_url,
                    "UPDATE token_holds SET expires_at = clock_timestamp() - interval '1 s', "
                    "created_at = clock_timestamp() - interval '2 s' WHERE id = $1",
                    hold,
                )
            )
            row.state = "expired"

        @rule()
        def expire_holds(self) -> None:
            stored = {
                h.id: h.status
                for user in self.books.balances
                for h in self.run(tokendb.list_holds(user=user, limit=1000))
            }
            unmarked = [h for h in self.hold_rows.values() if h.state == "expired"]
            due = sum(1 for h in unmarked if stored[h.id] == "active")
            assert self.run(tokendb.expire_holds()) == due

        @rule(session=sessions)
        def end_chat(self, session: uuid.UUID) -> None:
            self.run(tokendb.end_chat(session=session))
            self.session_rows[session].ended = True

        @invariant()
        def balances_match_the_model(self) -> None:
            for user_id, balance in self.books.balances.items():
                assert self.run(tokendb.get_balance(user=user_id)) == balance

        @invariant()
        def available_balances_and_holds_match_the_model(self) -> None:
            for user_id in self.books.balances:
                assert self.run(tokendb.get_available_balance(user=user_id)) == self.available(
                    user_id
                )
                for stored in self.run(tokendb.list_holds(user=user_id, limit=1000)):
                    row = self.hold_rows[stored.id]
                    # an expired hold is marked by the user's next debit or hold, or the sweeper
                    allowed = {"expired", "active"} if row.state == "expired" else {row.state}
                    assert stored.status in allowed, (stored, row)
                    if row.captured is not None:
                        assert (stored.captured_amount, stored.captured_transaction_id) == (
                            row.captured
                        )

        @invariant()
        def books_balance(self) -> None:
            assert self.run(tokendb.audit_ledger()) == []
            assert self.run(tokendb.audit_chats()) == []
            assert self.run(tokendb.audit_holds()) == []

        def teardown(self) -> None:
            for session in self.session_rows.values():
                stored = self.run(tokendb.get_chat(session=session.id))
                assert stored.tokens_used == session.tokens_used

    return LedgerMachine


async def test_random_call_sequences_agree_with_the_model(tokendb_clean: str) -> None:
    machine = make_machine(asyncio.get_running_loop(), tokendb_clean)
    await asyncio.to_thread(
        run_state_machine_as_test,
        machine,
        settings=settings(
            max_examples=30,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
