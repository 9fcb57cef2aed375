"""A randomized concurrent workload over tokendb's public API, and a Python model of it.

Used by the stress and fault suites (``tests/test_stress.py``). Each worker
task draws operations (charge, top_up, grant_bonus, refund, add_message,
idempotent repeats and conflicting repeats, verify_api_key, revoke_api_key,
and holds: hold, capture, release, some with a ttl short enough to expire
during the run)
on random users and records in :class:`Model` what tokendb *accepted*. Every
operation carries a unique nonce (the ledger row's ``description``, the
message's ``content``) so that afterwards the database can be compared with
the model row by row:

* an accepted operation's rows are in the database, with the amounts returned;
* a refused operation (any ``TokenDBError`` whose outcome is known) left no row;
* an operation whose outcome is unknown (``DatabaseUnavailable.outcome_unknown``)
  is resolved by looking its nonce up, and then counts as accepted or refused;
* nothing else is in the database: no lost charge, no half-written call.

Sizes come from ``TOKENDB_STRESS_*`` environment variables (see :class:`Sizes`).
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import asyncpg

import tokendb
from tests.helpers import audit_books
from tokendb import MessageRole

OP_WEIGHTS = {
    "charge": 24,
    "top_up": 8,
    "grant_bonus": 4,
    "refund": 10,
    "add_message": 20,
    "repeat": 10,
    "conflicting_repeat": 3,
    "verify": 18,
    "revoke": 1,
    "hold": 10,
    "capture": 6,
    "release": 4,
    "charge_key": 12,
}
SHORT_TTL = 0.2  # seconds: a hold that expires during the run, nobody sweeping
STARTING_TOP_UP = 900  # with the signup bonus: 1,000 tokens, so some charges are refused
KEYS_PER_USER = 3  # key 0 is never revoked (sessions are started from it)
KEY_LIMIT = 400  # key 1 of every user spends at most this a day (charge_key)
MODELS = ("gpt-a", "gpt-b")
SESSIONS_PER_USER = 2
CALL_TIMEOUT = 60.0  # seconds: a call that takes longer is a hang, and fails the test
UNKNOWN_RETRIES = 5  # re-sends of an idempotent call whose outcome was unknown


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


@dataclass(frozen=True)
class Sizes:
    """How big a run is. Defaults fit CI; raise them for a long local run.

    ``TOKENDB_STRESS_OPS`` (operations of the plain load, default 10,000),
    ``TOKENDB_STRESS_FAULT_OPS`` (operations of each fault run, default 3,000),
    ``TOKENDB_STRESS_USERS`` (20), ``TOKENDB_STRESS_TASKS`` (32 concurrent
    tasks), ``TOKENDB_STRESS_POOL`` (16 pooled connections) and
    ``TOKENDB_STRESS_SEED`` (random by default; printed so a failure can be replayed).
    """

    operations: int
    fault_operations: int
    users: int
    tasks: int
    pool: int
    seed: int

    @classmethod
    def from_env(cls) -> Sizes:
        return cls(
            operations=_env_int("TOKENDB_STRESS_OPS", 10_000),
            fault_operations=_env_int("TOKENDB_STRESS_FAULT_OPS", 3_000),
            users=_env_int("TOKENDB_STRESS_USERS", 20),
            tasks=_env_int("TOKENDB_STRESS_TASKS", 32),
            pool=_env_int("TOKENDB_STRESS_POOL", 16),
            seed=_env_int("TOKENDB_STRESS_SEED", random.randrange(2**32)),
        )


@dataclass
class Held:
    """A hold the model knows: its amount, whether it may expire during the run, and how a
    call resolved it (``None``: not yet; ``captured``: by ``transaction``)."""

    amount: int
    short: bool
    resolved: str | None = None
    transaction: UUID | None = None
    captured: int | None = None


@dataclass
class Account:
    """What the model knows of one user."""

    user_id: UUID
    rows: dict[UUID, int] = field(default_factory=dict)  # accepted ledger rows: id -> amount
    referenced: list[tokendb.TokenTransaction] = field(default_factory=list)  # repeatable
    charges: list[UUID] = field(default_factory=list)  # refundable usage rows
    messages: dict[UUID, int] = field(default_factory=dict)  # accepted message id -> tokens
    keys: list[tuple[UUID, str]] = field(default_factory=list)  # (key id, secret)
    sessions: list[UUID] = field(default_factory=list)
    holds: dict[UUID, Held] = field(default_factory=dict)  # every hold the model knows
    open_holds: list[UUID] = field(default_factory=list)  # not resolved by any call yet
    key_rows: dict[UUID, tuple[UUID, str]] = field(default_factory=dict)  # row -> (key, model)

    def expected_balance(self) -> int:
        return sum(self.rows.values()) - sum(self.messages.values())


@dataclass
class Model:
    accounts: dict[UUID, Account] = field(default_factory=dict)
    revoked: set[UUID] = field(default_factory=set)  # revoke_api_key returned
    revoking: Counter[UUID] = field(default_factory=Counter)  # revokes in flight
    uncertain_keys: set[UUID] = field(default_factory=set)  # a revoke of unknown outcome
    refused_nonces: set[str] = field(default_factory=set)  # must not be in the database
    unknown: list[tuple[str, str, UUID]] = field(default_factory=list)  # (kind, nonce, user)
    unknown_holds: list[tuple[UUID, UUID, bool]] = field(default_factory=list)  # (ref, user, short)
    outcomes: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)


class Workload:
    """Drives the operations; ``faults=True`` admits ``DatabaseUnavailable`` as an outcome."""

    def __init__(self, *, seed: int, faults: bool = False) -> None:
        self.rng = random.Random(seed)
        self.faults = faults
        self.model = Model()
        self._nonce = 0

    def nonce(self, kind: str) -> str:
        self._nonce += 1
        return f"{kind}-{self._nonce}-{uuid.uuid4().hex[:8]}"

    # -- setup -------------------------------------------------------------

    async def setup(self, users: int) -> None:
        """Create the users, fund them, issue keys and start sessions (no faults yet)."""
        for index in range(users):
            user = await tokendb.create_user(
                email=f"stress-{index}-{uuid.uuid4().hex[:8]}@example.com",
                password="stress test password",
                name=f"Stress {index}",
            )
            account = Account(user.id)
            await tokendb.top_up(user=user, amount=STARTING_TOP_UP, description="funding")
            for row in await tokendb.list_transactions(user=user, limit=1000):
                account.rows[row.id] = row.amount
            for number in range(KEYS_PER_USER):
                limited = number == 1
                key, secret = await tokendb.issue_api_key(
                    user=user,
                    name=f"key {number}",
                    token_limit=KEY_LIMIT if limited else None,
                    limit_period="day" if limited else None,
                )
                account.keys.append((key.id, secret))
            for _ in range(SESSIONS_PER_USER):
                session = await tokendb.start_chat(api_key=account.keys[0][0], model="gpt-test")
                account.sessions.append(session.id)
            self.model.accounts[user.id] = account

    # -- the load ----------------------------------------------------------

    async def run(
        self, operations: int, tasks: int, *, until: Callable[[], bool] | None = None
    ) -> None:
        """Run ``operations`` operations from ``tasks`` tasks (and on, until ``until()``)."""
        remaining = operations

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0 or (until is not None and not until()):
                remaining -= 1
                await self.one()

        await asyncio.gather(*(worker() for _ in range(tasks)))

    async def one(self) -> None:
        kind = self.rng.choices(list(OP_WEIGHTS), weights=list(OP_WEIGHTS.values()))[0]
        account = self.rng.choice(list(self.model.accounts.values()))
        self.model.outcomes["operations"] += 1
        await getattr(self, f"_op_{kind}")(account)

    async def _call(self, kind: str, call: Callable[[], Awaitable[Any]]) -> tuple[str, Any]:
        """Run one call; return ``("ok", result)``, ``("refused", exc)`` or ``("unknown", exc)``.

        A non-TokenDBError, a hang, or an infrastructure error in a run
        without faults is recorded as a problem (and returned as refused).
        """
        try:
            result = await asyncio.wait_for(call(), CALL_TIMEOUT)
        except TimeoutError:
            self.model.problems.append(f"{kind}: no answer within {CALL_TIMEOUT:g} s (a hang)")
            return "refused", None
        except tokendb.DatabaseUnavailable as exc:
            self.model.outcomes[f"{kind}: {type(exc).__name__}"] += 1
            if not self.faults:
                self.model.problems.append(f"{kind}: {type(exc).__name__}: {exc}")
            return ("unknown" if exc.outcome_unknown else "refused"), exc
        except tokendb.DatabaseError as exc:
            self.model.problems.append(f"{kind}: untranslated database error: {exc!r}")
            return "refused", exc
        except tokendb.TokenDBError as exc:
            self.model.outcomes[f"{kind}: {type(exc).__name__}"] += 1
            return "refused", exc
        except Exception as exc:  # the very thing this workload looks for
            self.model.problems.append(f"{kind}: untyped {type(exc).__module__}.{exc!r}")
            return "refused", exc
        self.model.outcomes[f"{kind}: ok"] += 1
        return "ok", result

    def _expect(self, kind: str, exc: Any, *allowed: type[BaseException]) -> None:
        if exc is None or isinstance(exc, (tokendb.DatabaseUnavailable, *allowed)):
            return
        if isinstance(exc, tokendb.TokenDBError):
            self.model.problems.append(f"{kind}: unexpected {exc!r}")

    async def _movement(
        self,
        kind: str,
        account: Account,
        operation: Callable[..., Awaitable[tokendb.TokenTransaction]],
        amount: int,
    ) -> tokendb.TokenTransaction | None:
        """Run one idempotent movement to a known outcome; its row when it was accepted."""
        nonce, reference = self.nonce(kind), uuid.uuid4()

        def call() -> Awaitable[tokendb.TokenTransaction]:
            return operation(
                user=account.user_id, amount=amount, description=nonce, reference_id=reference
            )

        # A reference_id makes a retry safe: re-send until the outcome is known.
        status, value = await self._until_known(kind, call)
        if status == "ok":
            account.rows[value.id] = value.amount
            account.referenced.append(value)
            if kind == "charge":
                account.charges.append(value.id)
            return value
        elif status == "unknown":
            self.model.unknown.append((kind, nonce, account.user_id))
        else:
            self.model.refused_nonces.add(nonce)
            if isinstance(value, tokendb.InsufficientTokens) and not (
                value.requested == amount and value.balance < value.requested
            ):
                self.model.problems.append(f"{kind}: inconsistent {value!r}")
            if isinstance(value, tokendb.KeyLimitExceeded) and not (
                value.requested == amount and value.used + value.requested > value.limit
            ):
                self.model.problems.append(f"{kind}: inconsistent {value!r}")
            self._expect(kind, value, tokendb.InsufficientTokens, tokendb.KeyLimitExceeded)
        return None

    async def _op_charge(self, account: Account) -> None:
        await self._movement("charge", account, tokendb.charge, self.rng.randint(1, 60))

    async def _op_charge_key(self, account: Account) -> None:
        """A charge through one of the user's keys (key 1 has a daily limit), for a model."""
        key_id = self.rng.choice(account.keys)[0]
        model = self.rng.choice(MODELS)
        amount = self.rng.randint(1, 60)

        def charge(**arguments: Any) -> Awaitable[tokendb.TokenTransaction]:
            return tokendb.charge(api_key=key_id, model=model, **arguments)

        row = await self._movement("charge_key", account, charge, amount)
        if row is not None:
            account.key_rows[row.id] = (key_id, model)
            if (row.api_key_id, row.model) != (key_id, model):
                self.model.problems.append(f"charge_key: row {row.id} lost its key or model")

    async def _op_top_up(self, account: Account) -> None:
        await self._movement("top_up", account, tokendb.top_up, self.rng.randint(1, 80))

    async def _op_grant_bonus(self, account: Account) -> None:
        await self._movement("grant_bonus", account, tokendb.grant_bonus, self.rng.randint(1, 20))

    async def _op_refund(self, account: Account) -> None:
        if not account.charges:
            return
        charge_id = self.rng.choice(account.charges)
        amount = None if self.rng.random() < 0.3 else self.rng.randint(1, 30)
        nonce = self.nonce("refund")
        status, value = await self._call(
            "refund",
            lambda: tokendb.refund(
                transaction=charge_id, amount=amount, description=nonce, user=account.user_id
            ),
        )
        if status == "ok":
            account.rows[value.id] = value.amount
        elif status == "unknown":
            self.model.unknown.append(("refund", nonce, account.user_id))
        else:
            self.model.refused_nonces.add(nonce)
            if isinstance(value, tokendb.RefundExceedsCharge) and not (
                value.requested > value.refundable or value.refundable == 0
            ):
                self.model.problems.append(f"refund: inconsistent {value!r}")
            self._expect("refund", value, tokendb.RefundExceedsCharge)

    async def _op_add_message(self, account: Account) -> None:
        session_id = self.rng.choice(account.sessions)
        tokens = self.rng.choice([0, self.rng.randint(1, 40)])
        nonce = self.nonce("message")
        status, value = await self._call(
            "add_message",
            lambda: tokendb.add_message(
                session=session_id,
                role=self.rng.choice(list(MessageRole)),
                content=nonce,
                tokens=tokens,
                user=account.user_id,
            ),
        )
        if status == "ok":
            account.messages[value.id] = value.tokens
        elif status == "unknown":
            self.model.unknown.append(("add_message", nonce, account.user_id))
        else:
            self.model.refused_nonces.add(nonce)
            if isinstance(value, tokendb.InsufficientTokens) and not (
                value.requested == tokens and value.balance < value.requested
            ):
                self.model.problems.append(f"add_message: inconsistent {value!r}")
            self._expect("add_message", value, tokendb.InsufficientTokens)

    async def _resend(
        self, kind: str, account: Account, extra: int
    ) -> tuple[tokendb.TokenTransaction, str, Any] | None:
        """Re-send an accepted movement (its amount plus ``extra``); a re-send writes no row."""
        if not account.referenced:
            return None
        original = self.rng.choice(account.referenced)
        operation = {
            tokendb.TransactionType.USAGE: tokendb.charge,
            tokendb.TransactionType.TOPUP: tokendb.top_up,
            tokendb.TransactionType.BONUS: tokendb.grant_bonus,
        }[original.type]
        nonce = self.nonce(kind)
        status, value = await self._call(
            kind,
            lambda: operation(
                user=account.user_id,
                amount=abs(original.amount) + extra,
                description=nonce,
                reference_id=original.reference_id,
            ),
        )
        self.model.refused_nonces.add(nonce)
        return original, status, value

    async def _op_repeat(self, account: Account) -> None:
        """Re-send an accepted movement: it must return the same row and move nothing."""
        sent = await self._resend("repeat", account, 0)
        if sent is None:
            return
        original, status, value = sent
        if status == "ok" and (value.id, value.amount) != (original.id, original.amount):
            self.model.problems.append(f"repeat of {original.id} returned {value!r}")
        self._expect("repeat", value if status != "ok" else None)

    async def _op_conflicting_repeat(self, account: Account) -> None:
        """Re-send an accepted movement with another amount: ReferenceConflict, nothing moved."""
        sent = await self._resend("conflicting_repeat", account, 1)
        if sent is None:
            return
        original, status, value = sent
        if status == "ok":
            self.model.problems.append(f"conflicting repeat of {original.id} accepted: {value!r}")
        elif isinstance(value, tokendb.ReferenceConflict):
            if value.existing_amount != abs(original.amount):
                self.model.problems.append(f"conflict reports the wrong amount: {value!r}")
        else:
            self._expect("conflicting_repeat", value)

    async def _op_verify(self, account: Account) -> None:
        key_id, secret = self.rng.choice(account.keys)
        revoked_before = key_id in self.model.revoked
        touched = self.model.revoking[key_id] > 0 or key_id in self.model.uncertain_keys
        status, value = await self._call("verify", lambda: tokendb.verify_api_key(secret=secret))
        touched = touched or self.model.revoking[key_id] > 0 or key_id in self.model.revoked
        if status == "ok":
            if revoked_before:
                self.model.problems.append(f"verify accepted revoked key {key_id}")
            if (value.id, value.user_id) != (key_id, account.user_id):
                self.model.problems.append(f"verify returned another key: {value!r}")
        elif isinstance(value, tokendb.ApiKeyRevoked):
            if not (revoked_before or touched):
                self.model.problems.append(f"verify refused active key {key_id}")
        else:
            self._expect("verify", value)

    async def _op_revoke(self, account: Account) -> None:
        key_id, _ = self.rng.choice(account.keys[1:])
        self.model.revoking[key_id] += 1
        try:
            status, value = await self._call(
                "revoke", lambda: tokendb.revoke_api_key(api_key=key_id, user=account.user_id)
            )
        finally:
            self.model.revoking[key_id] -= 1
        if status == "ok":
            if value.is_active:
                self.model.problems.append(f"revoke left key {key_id} active")
            self.model.revoked.add(key_id)
        elif status == "unknown":
            self.model.uncertain_keys.add(key_id)
        else:
            self._expect("revoke", value)

    async def _until_known(self, kind: str, call: Callable[[], Awaitable[Any]]) -> tuple[str, Any]:
        """Run an idempotent call, re-sending it while its outcome is unknown."""
        status, value = await self._call(kind, call)
        for _ in range(UNKNOWN_RETRIES):
            if status != "unknown":
                break
            self.model.outcomes[f"{kind}: re-sent after unknown outcome"] += 1
            await asyncio.sleep(0.05)
            status, value = await self._call(kind, call)
        return status, value

    async def _op_hold(self, account: Account) -> None:
        amount, short = self.rng.randint(1, 80), self.rng.random() < 0.3
        reference, nonce = uuid.uuid4(), self.nonce("hold")

        def call() -> Awaitable[tokendb.TokenHold]:
            return tokendb.hold(
                user=account.user_id,
                amount=amount,
                ttl=SHORT_TTL if short else 600,
                reference_id=reference,
                description=nonce,
            )

        status, value = await self._until_known("hold", call)
        if status == "ok":
            if (value.amount, value.reference_id, value.status) != (amount, reference, "active"):
                self.model.problems.append(f"hold returned {value!r}")
            account.holds[value.id] = Held(amount, short)
            account.open_holds.append(value.id)
        elif status == "unknown":
            self.model.unknown_holds.append((reference, account.user_id, short))
        else:
            if isinstance(value, tokendb.InsufficientTokens) and not (
                value.requested == amount and 0 <= value.balance < value.requested
            ):
                self.model.problems.append(f"hold: inconsistent {value!r}")
            self._expect("hold", value, tokendb.InsufficientTokens)

    def _take_open_hold(self, account: Account) -> UUID | None:
        """An unresolved hold, which no other call will resolve (each is resolved once)."""
        if not account.open_holds:
            return None
        return account.open_holds.pop(self.rng.randrange(len(account.open_holds)))

    async def _op_capture(self, account: Account) -> None:
        hold_id = self._take_open_hold(account)
        if hold_id is None:
            return
        held = account.holds[hold_id]
        amount, nonce = self.rng.randint(1, held.amount), self.nonce("capture")
        status, value = await self._until_known(
            "capture", lambda: tokendb.capture(hold=hold_id, amount=amount, description=nonce)
        )
        if status == "ok":
            if (value.amount, value.reference_id) != (-amount, hold_id):
                self.model.problems.append(f"capture of {hold_id} returned {value!r}")
            account.rows[value.id] = value.amount
            account.charges.append(value.id)
            held.resolved, held.transaction, held.captured = "captured", value.id, amount
        elif status == "unknown":
            self.model.unknown.append(("capture", nonce, account.user_id))
            held.resolved = "unknown"
        else:
            self.model.refused_nonces.add(nonce)
            if isinstance(value, tokendb.HoldExpired) and held.short:
                held.resolved = "expired"
            elif not isinstance(value, tokendb.DatabaseUnavailable):
                self.model.problems.append(f"capture of {hold_id} refused: {value!r}")
            else:
                account.open_holds.append(hold_id)  # not sent: still open

    async def _op_release(self, account: Account) -> None:
        hold_id = self._take_open_hold(account)
        if hold_id is None:
            return
        held = account.holds[hold_id]
        status, value = await self._until_known("release", lambda: tokendb.release(hold=hold_id))
        if status == "ok":
            expected = {"released", "expired"} if held.short else {"released"}
            if value.status not in expected:
                self.model.problems.append(f"release of {hold_id} returned {value!r}")
            held.resolved = value.status
        elif status == "unknown":
            held.resolved = "unknown"
        else:
            self._expect("release", value)
            account.open_holds.append(hold_id)

    # -- afterwards --------------------------------------------------------

    async def resolve_unknown(self, conn: asyncpg.Connection) -> None:
        """Settle every call whose outcome was unknown by looking its nonce up."""
        for kind, nonce, user_id in self.model.unknown:
            account = self.model.accounts[user_id]
            if kind == "add_message":
                rows = await conn.fetch(
                    "SELECT id, tokens FROM chat_messages WHERE content = $1", nonce
                )
                for row in rows:
                    account.messages[row["id"]] = row["tokens"]
            else:
                rows = await conn.fetch(
                    "SELECT id, amount FROM token_transactions WHERE description = $1", nonce
                )
                for row in rows:
                    account.rows[row["id"]] = row["amount"]
            verdict = "written" if rows else "not written"
            self.model.outcomes[f"unknown outcome resolved as {verdict}"] += 1
        for reference, user_id, short in self.model.unknown_holds:
            account = self.model.accounts[user_id]
            found = await conn.fetchrow(
                "SELECT id, amount FROM token_holds WHERE user_id = $1 AND reference_id = $2",
                user_id,
                reference,
            )
            if found is not None:
                account.holds[found["id"]] = Held(found["amount"], short, resolved="unknown")
            verdict = "written" if found is not None else "not written"
            self.model.outcomes[f"unknown hold resolved as {verdict}"] += 1

    async def discrepancies(self, conn: asyncpg.Connection) -> list[str]:
        """Everything in which the database and the model disagree (empty when none)."""
        found = list(self.model.problems)
        found += [f"{audit}: {d}" for audit, rows in (await audit_books()).items() for d in rows]
        over_limit = await conn.fetch(
            "SELECT u.api_key_id, sum(u.tokens) AS used FROM usage_daily u "
            "JOIN api_keys k ON k.id = u.api_key_id AND k.token_limit IS NOT NULL "
            "WHERE u.day = (now() AT TIME ZONE 'UTC')::date "
            "GROUP BY u.api_key_id HAVING sum(u.tokens) > $1",
            KEY_LIMIT,
        )
        found += [
            f"key {row['api_key_id']} spent {row['used']} > {KEY_LIMIT}" for row in over_limit
        ]
        for account in self.model.accounts.values():
            for row_id, paid_for in account.key_rows.items():
                stored = await conn.fetchrow(
                    "SELECT api_key_id, model FROM token_transactions WHERE id = $1", row_id
                )
                if stored is None or (stored["api_key_id"], stored["model"]) != paid_for:
                    found.append(f"charge_key row {row_id}: stored {stored}, sent {paid_for}")
        negative = await conn.fetchval("SELECT count(*) FROM users WHERE token_balance < 0")
        if negative:
            found.append(f"{negative} users with a negative balance")
        for account in self.model.accounts.values():
            found += await self._account_discrepancies(conn, account)
        written = await conn.fetch(
            "SELECT description AS nonce FROM token_transactions WHERE description = ANY($1) "
            "UNION ALL SELECT content FROM chat_messages WHERE content = ANY($1)",
            sorted(self.model.refused_nonces),
        )
        found += [f"a refused call was written: {row['nonce']}" for row in written]
        over_refunded = await conn.fetch(
            "SELECT c.id FROM token_transactions c JOIN token_transactions r "
            "ON r.reference_id = c.id AND r.type = 'refund' WHERE c.type = 'usage' "
            "GROUP BY c.id, c.amount HAVING sum(r.amount) > -c.amount"
        )
        found += [f"charge {row['id']} refunded beyond its amount" for row in over_refunded]
        for key_id in self.model.revoked:
            if await conn.fetchval("SELECT is_active FROM api_keys WHERE id = $1", key_id):
                found.append(f"revoked key {key_id} is active again")
        return found

    async def _account_discrepancies(self, conn: asyncpg.Connection, account: Account) -> list[str]:
        found: list[str] = []
        balance = await conn.fetchval(
            "SELECT token_balance FROM users WHERE id = $1", account.user_id
        )
        if balance != account.expected_balance():
            found.append(
                f"user {account.user_id}: balance {balance}, model {account.expected_balance()}"
            )
        rows = await conn.fetch(
            "SELECT id, amount, type, reference_id FROM token_transactions WHERE user_id = $1",
            account.user_id,
        )
        message_rows = {row["reference_id"]: row for row in rows if row["id"] not in account.rows}
        for row in rows:
            if row["id"] in account.rows:
                if row["amount"] != account.rows[row["id"]]:
                    found.append(f"row {row['id']}: amount {row['amount']}, model says otherwise")
            elif row["reference_id"] not in account.messages:
                found.append(f"user {account.user_id}: unexpected ledger row {dict(row)}")
        missing = set(account.rows) - {row["id"] for row in rows}
        found += [f"accepted ledger row {row_id} is missing" for row_id in missing]
        for message_id, tokens in account.messages.items():
            billed = message_rows.get(message_id)
            if tokens and (billed is None or billed["amount"] != -tokens):
                found.append(f"message {message_id} ({tokens} tokens) not billed: {billed}")
            if not tokens and billed is not None:
                found.append(f"free message {message_id} billed: {dict(billed)}")
        found += await self._hold_discrepancies(conn, account)
        stored = {
            row["id"]
            for row in await conn.fetch(
                "SELECT m.id FROM chat_messages m JOIN chat_sessions s ON s.id = m.session_id "
                "WHERE s.user_id = $1",
                account.user_id,
            )
        }
        if stored != set(account.messages):
            found.append(
                f"user {account.user_id}: messages stored {len(stored)}, "
                f"model {len(account.messages)} (diff {len(stored ^ set(account.messages))})"
            )
        return found

    async def _hold_discrepancies(self, conn: asyncpg.Connection, account: Account) -> list[str]:
        """The user's holds, row by row, against the model: the same holds, each in a state
        the calls made allow, a capture billed by the row the call returned."""
        found: list[str] = []
        rows = {
            row["id"]: row
            for row in await conn.fetch(
                "SELECT id, amount, status, captured_amount, captured_transaction_id, "
                "expires_at <= clock_timestamp() AS past FROM token_holds WHERE user_id = $1",
                account.user_id,
            )
        }
        if set(rows) != set(account.holds):
            found.append(
                f"user {account.user_id}: holds stored {len(rows)}, model {len(account.holds)} "
                f"(diff {sorted(map(str, set(rows) ^ set(account.holds)))[:3]})"
            )
        for hold_id, held in account.holds.items():
            row = rows.get(hold_id)
            if row is None:
                continue
            if row["amount"] != held.amount:
                found.append(f"hold {hold_id}: amount {row['amount']}, model {held.amount}")
            if held.resolved == "unknown":
                allowed = {"active", "captured", "released", "expired"}
            elif held.resolved is None:  # nobody resolved it: active, or expired if short
                allowed = {"active", "expired"} if held.short else {"active"}
            elif held.resolved == "expired":  # refused as expired: marked since, or not yet
                allowed = {"active", "expired"}
                if not row["past"]:
                    found.append(f"hold {hold_id} was refused as expired before its expiry")
            else:
                allowed = {held.resolved}
            if row["status"] not in allowed:
                found.append(f"hold {hold_id}: {row['status']}, model allows {sorted(allowed)}")
            if row["status"] == "captured":
                tx = row["captured_transaction_id"]
                if held.transaction is not None and tx != held.transaction:
                    found.append(f"hold {hold_id}: captured by {tx}, the call returned another")
                if account.rows.get(tx) != -row["captured_amount"]:
                    found.append(f"hold {hold_id}: its capture {tx} is not a row of the model")
            if row["status"] == "active" and row["past"] and not held.short:
                found.append(f"hold {hold_id} of 600 s is past its expiry")
        return found
