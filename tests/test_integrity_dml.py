"""Random DML as the application role, committed or rolled back: the books hold after each commit.

Hypothesis sends sequences of transactions, each of one to three statements
that insert, update or delete random columns of the six tables (and TRUNCATE
them), of the usage rollup and of the incremental audit's tables, with values
drawn from the rows that exist: plausible movements (a balance and its ledger
row together, a hold and the user's held tokens, a capture) as well as
made-up ones, and NOTIFYs on the verify cache's channel. Whatever commits,
the invariants of README's "Guarantees" hold (:mod:`tests.books`), every
audit tokendb has finds nothing (the incremental one too: it must agree with
the full one), nothing that was written to the ledger changes, and revoked
or expired keys never verify again.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import tokendb
from tests import books
from tests.helpers import audit_books
from tokendb.testing import truncate_all

AMOUNTS = [1, 5, 40, 100, -1, -5, -40, 0, 2**31 - 1]
TIMES = ["clock_timestamp()", "now()", "'2000-01-01'", "'2999-01-01'", "now() + interval '1 s'"]
EMAILS = ["a@x.io", "A@X.io", " b@x.io", "not an email", "c@x.io", "ä@x.io", "Ä@x.io"]
KINDS = ["topup", "usage", "refund", "bonus", "gift"]
NEWEST = (
    "coalesce((SELECT balance_after FROM token_transactions WHERE user_id = {user} "
    "ORDER BY created_at DESC, id DESC LIMIT 1), 0)"
)
NEWEST_TOTAL = (
    "coalesce((SELECT tokens_used_after FROM chat_messages WHERE session_id = {session} "
    "ORDER BY created_at DESC, id DESC LIMIT 1), 0)"
)


@dataclass
class World:
    """What exists now, to draw ids from; the secrets of the keys tokendb issued."""

    users: list[uuid.UUID] = field(default_factory=list)
    keys: list[tuple[uuid.UUID, str]] = field(default_factory=list)  # (id, key_hash)
    sessions: list[uuid.UUID] = field(default_factory=list)
    messages: list[uuid.UUID] = field(default_factory=list)
    ledger: list[uuid.UUID] = field(default_factory=list)
    holds: list[uuid.UUID] = field(default_factory=list)
    secrets: dict[uuid.UUID, str] = field(default_factory=dict)

    async def refresh(self, conn: asyncpg.Connection) -> None:
        self.users = [r["id"] for r in await conn.fetch("SELECT id FROM users ORDER BY id")]
        self.keys = [
            (r["id"], r["key_hash"])
            for r in await conn.fetch("SELECT id, key_hash FROM api_keys ORDER BY id")
        ]
        self.sessions = [
            r["id"] for r in await conn.fetch("SELECT id FROM chat_sessions ORDER BY id")
        ]
        self.messages = [
            r["id"] for r in await conn.fetch("SELECT id FROM chat_messages ORDER BY id")
        ]
        self.ledger = [
            r["id"] for r in await conn.fetch("SELECT id FROM token_transactions ORDER BY id")
        ]
        self.holds = [r["id"] for r in await conn.fetch("SELECT id FROM token_holds ORDER BY id")]


def pick(data: st.DataObject, items: list[Any], fallback: Any = None) -> Any:
    """One of ``items`` (or a fresh UUID / ``fallback`` now and then, or when there is none)."""
    if not items or data.draw(st.integers(0, 9)) == 0:
        return fallback if fallback is not None else uuid.uuid4()
    return data.draw(st.sampled_from(items))


def literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def statements(data: st.DataObject, world: World) -> list[str]:
    """One to three statements of a random kind: what one transaction sends."""
    user = literal(pick(data, world.users))
    other = literal(pick(data, world.users))
    key_id, key_hash = pick(data, world.keys, (uuid.uuid4(), uuid.uuid4().hex))
    key = literal(key_id)
    session = literal(pick(data, world.sessions))
    message = literal(pick(data, world.messages))
    row = literal(pick(data, world.ledger))
    hold = literal(pick(data, world.holds))
    model = literal(data.draw(st.sampled_from([None, "m", "other"])))
    amount = data.draw(st.sampled_from(AMOUNTS))
    at = data.draw(st.sampled_from(TIMES))
    kind = data.draw(st.sampled_from(KINDS))
    email = literal(data.draw(st.sampled_from(EMAILS)))
    newest = NEWEST.format(user=user)
    tokens = max(amount, 0)
    total = data.draw(
        st.sampled_from([f"{NEWEST_TOTAL.format(session=session)} + {tokens}", str(tokens)])
    )
    after = data.draw(st.sampled_from([f"{newest} + {amount}", str(amount), "100", "0"]))
    reference = data.draw(st.sampled_from(["NULL", message, row, literal(uuid.uuid4())]))
    table = data.draw(
        st.sampled_from(
            [
                "users",
                "api_keys",
                "token_transactions",
                "chat_sessions",
                "chat_messages",
                "token_holds",
                "usage_daily",
            ]
        )
    )
    movement = [  # a balance and its ledger row, as tokendb writes them
        f"UPDATE users SET token_balance = {newest} + {amount} WHERE id = {user}",
        f"INSERT INTO token_transactions (user_id, amount, type, balance_after, "
        f"reference_id, created_at) VALUES ({user}, {amount}, '{kind}', {newest} + "
        f"{amount}, {reference}, {at})",
    ]
    billed = _billed_message(session, tokens % 50)
    attributed = [  # a usage row billed to a key and a model, and a refund of a charge
        f"UPDATE users SET token_balance = {newest} - {tokens % 50 + 1} WHERE id = {user}",
        f"INSERT INTO token_transactions (user_id, amount, type, balance_after, api_key_id, "
        f"model) VALUES ({user}, -{tokens % 50 + 1}, 'usage', {newest} - {tokens % 50 + 1}, "
        f"{data.draw(st.sampled_from([key, 'NULL']))}, {model})",
    ]
    refund = [
        f"UPDATE users SET token_balance = {newest} + 1 WHERE id = {user}",
        f"INSERT INTO token_transactions (user_id, amount, type, balance_after, reference_id, "
        f"api_key_id, model) SELECT {user}, 1, 'refund', {newest} + 1, {row}, "
        + data.draw(st.sampled_from(["api_key_id, model", f"{key}, {model}"]))
        + f" FROM token_transactions WHERE id = {row}",
    ]
    held = [  # a hold and the user's held tokens, as tokendb writes them
        f"UPDATE users SET held_tokens = held_tokens + {tokens % 50 + 1} WHERE id = {user}",
        f"INSERT INTO token_holds (id, user_id, amount, status, expires_at, created_at, "
        f"api_key_id, model) VALUES ({literal(uuid.uuid4())}, {user}, {tokens % 50 + 1}, "
        f"'active', clock_timestamp() + interval '1 min', clock_timestamp(), "
        f"{data.draw(st.sampled_from([key, 'NULL']))}, {model})",
    ]
    holder = f"(SELECT user_id FROM token_holds WHERE id = {hold})"
    captured = [  # a capture: the hold's tokens charged by a new usage row
        f"UPDATE users SET token_balance = token_balance - 1, held_tokens = held_tokens - "
        f"(SELECT amount FROM token_holds WHERE id = {hold}) WHERE id = {holder}",
        f"INSERT INTO token_transactions (id, user_id, amount, type, balance_after, api_key_id, "
        f"model) SELECT {literal(uuid.uuid4())}, u.id, -1, 'usage', u.token_balance, "
        + data.draw(st.sampled_from(["h.api_key_id, h.model", f"{key}, {model}"]))
        + f" FROM users u JOIN token_holds h ON h.user_id = u.id WHERE h.id = {hold}",
        f"UPDATE token_holds SET status = 'captured', captured_amount = 1, "
        f"captured_transaction_id = (SELECT id FROM token_transactions WHERE user_id = "
        f"{holder} ORDER BY seq DESC LIMIT 1) WHERE id = {hold}",
    ]
    new_session = [
        f"INSERT INTO chat_sessions (user_id, api_key_id, model) VALUES ({user}, {key}, 'm')"
    ]
    choices: list[list[str]] = [
        # users
        [
            f"INSERT INTO users (email, password_hash, name, token_balance) "
            f"VALUES ({email}, 'x', 'n', {tokens})"
        ],
        [f"UPDATE users SET token_balance = {amount} WHERE id = {user}"],
        [f"UPDATE users SET email = {email} WHERE id = {user}"],
        [f"UPDATE users SET role = 'admin', name = 'renamed' WHERE id = {user}"],
        [f"DELETE FROM users WHERE id = {user}"],
        # ids: a rename, and two users trading ids in one statement
        [f"UPDATE users SET id = {literal(uuid.uuid4())} WHERE id = {user}"],
        [
            f"UPDATE users SET id = CASE id WHEN {user} THEN {literal(uuid.uuid4())}::uuid "
            f"ELSE {user}::uuid END WHERE id IN ({user}, {other})"
        ],
        # the ledger: made-up rows, and movements that add up
        [
            f"INSERT INTO token_transactions (user_id, amount, type, balance_after, "
            f"reference_id, created_at) VALUES ({user}, {amount}, '{kind}', {after}, "
            f"{reference}, {at})"
        ],
        movement,
        [
            f"UPDATE token_transactions SET "
            f"{data.draw(st.sampled_from(['amount', 'balance_after', 'seq']))} = {amount} "
            f"WHERE id = {row}"
        ],
        [f"UPDATE token_transactions SET created_at = {at} WHERE id = {row}"],
        [f"DELETE FROM token_transactions WHERE id = {row}"],
        # API keys
        [
            f"INSERT INTO api_keys (user_id, key_hash, key_prefix, name, is_active, expires_at) "
            f"VALUES ({user}, {literal(data.draw(st.sampled_from([key_hash, uuid.uuid4().hex])))}"
            f", 'sk_live_abcd', 'k', {literal(data.draw(st.booleans()))}, "
            f"{data.draw(st.sampled_from(['NULL', at]))})"
        ],
        [f"UPDATE api_keys SET is_active = {literal(data.draw(st.booleans()))} WHERE id = {key}"],
        [
            f"UPDATE api_keys SET expires_at = "
            f"{data.draw(st.sampled_from(['NULL', at, 'now() - interval ' + literal('1 s')]))} "
            f"WHERE id = {key}"
        ],
        [f"UPDATE api_keys SET key_hash = {literal(uuid.uuid4().hex)} WHERE id = {key}"],
        [f"UPDATE api_keys SET user_id = {user} WHERE id = {key}"],
        [f"DELETE FROM api_keys WHERE id = {key}"],
        [f"UPDATE api_keys SET id = {literal(uuid.uuid4())} WHERE id = {key}"],
        # chat sessions
        new_session,
        [f"UPDATE chat_sessions SET tokens_used = {tokens} WHERE id = {session}"],
        [
            f"UPDATE chat_sessions SET ended_at = "
            f"{data.draw(st.sampled_from(['NULL', 'now()', at]))} WHERE id = {session}"
        ],
        [f"UPDATE chat_sessions SET user_id = {user}, api_key_id = {key} WHERE id = {session}"],
        [f"DELETE FROM chat_sessions WHERE id = {session}"],
        # chat messages: made-up, and billed as tokendb bills them
        [
            f"INSERT INTO chat_messages (session_id, role, content, tokens, tokens_used_after, "
            f"created_at) VALUES ({session}, 'user', 'x', {tokens}, {total}, {at})"
        ],
        billed,
        [f"UPDATE chat_messages SET content = 'redacted' WHERE id = {message}"],
        [f"UPDATE chat_messages SET tokens = {tokens} WHERE id = {message}"],
        [f"DELETE FROM chat_messages WHERE id = {message}"],
        # this round: attribution, holds, limits, the rollup, the audit's marks, the cache
        attributed,
        refund,
        held,
        captured,
        [f"UPDATE token_holds SET api_key_id = {key}, model = {model} WHERE id = {hold}"],
        [
            f"UPDATE token_holds SET status = "
            f"{literal(data.draw(st.sampled_from(['released', 'expired', 'active'])))}"
            f" WHERE id = {hold}"
        ],
        [f"UPDATE token_holds SET user_id = {user}, amount = {tokens} WHERE id = {hold}"],
        [f"UPDATE users SET held_tokens = held_tokens + {amount} WHERE id = {user}"],
        [f"DELETE FROM token_holds WHERE id = {hold}"],
        [
            f"UPDATE api_keys SET token_limit = {max(amount, 1)}, limit_period = "
            f"{literal(data.draw(st.sampled_from(['day', 'month', 'total'])))} WHERE id = {key}"
        ],
        [f"UPDATE usage_daily SET tokens = tokens + {amount} WHERE user_id = {user}"],
        [
            f"INSERT INTO usage_daily (user_id, api_key_id, model, day, tokens, requests) "
            f"VALUES ({user}, {key}, {model}, current_date, {tokens}, 1)"
        ],
        [f"DELETE FROM usage_daily WHERE user_id = {user}"],
        [
            "UPDATE tokendb_audit_marks m SET seq = t.seq, balance_after = t.balance_after, "
            "transaction_id = t.id FROM token_transactions t "
            f"WHERE t.id = {row} AND m.user_id = t.user_id"
        ],
        [
            "INSERT INTO tokendb_audit_marks (user_id, seq, balance_after, transaction_id, "
            f"checkpoint_id) SELECT user_id, seq, balance_after, id, id FROM token_transactions "
            f"WHERE id = {row}"
        ],
        [f"DELETE FROM tokendb_audit_marks WHERE user_id = {user}"],
        [f"SELECT pg_notify('tokendb_api_keys', {literal(key_hash)})"],
        ["SELECT pg_notify('tokendb_api_keys', '*')"],
        # the escape hatches that are no more
        [f"TRUNCATE {table} CASCADE"],
        ["SET LOCAL tokendb.allow_truncate = on", "TRUNCATE token_transactions"],
    ]
    # Mostly one change per transaction, so that enough of them commit.
    plausible = [movement, movement, billed, billed, new_session, attributed, held, captured]
    chosen: list[str] = []
    for _ in range(data.draw(st.sampled_from([1, 1, 1, 2, 3]))):
        chosen += data.draw(st.sampled_from(choices + plausible))
    return chosen


def _billed_message(session: str, tokens: int) -> list[str]:
    """What tokendb's add_message does, in four statements."""
    message_id = literal(uuid.uuid4())
    user = f"(SELECT user_id FROM chat_sessions WHERE id = {session})"
    statements = [
        f"UPDATE chat_sessions SET tokens_used = tokens_used + {tokens} WHERE id = {session}",
        f"INSERT INTO chat_messages (id, session_id, role, content, tokens, tokens_used_after) "
        f"SELECT {message_id}, id, 'user', 'x', {tokens}, tokens_used FROM chat_sessions "
        f"WHERE id = {session}",
    ]
    if tokens:
        statements += [
            f"UPDATE users SET token_balance = token_balance - {tokens} WHERE id = {user}",
            f"INSERT INTO token_transactions (user_id, amount, type, reference_id, balance_after) "
            f"SELECT id, -{tokens}, 'usage', {message_id}, token_balance FROM users "
            f"WHERE id = {user}",
        ]
    return statements


async def seed(world: World) -> None:
    """Two users, each with a live and a revoked key, a chat with messages, a charge through
    the live key and two active holds (one through that key)."""
    for name in ("ada", "bob"):
        user = await tokendb.create_user(
            email=f"{name}-{uuid.uuid4().hex[:6]}@example.com", password="long enough", name=name
        )
        await tokendb.top_up(user=user, amount=500)
        live, live_secret = await tokendb.issue_api_key(user=user, name="live")
        revoked, revoked_secret = await tokendb.issue_api_key(user=user, name="revoked")
        await tokendb.revoke_api_key(api_key=revoked)
        world.secrets.update({live.id: live_secret, revoked.id: revoked_secret})
        session = await tokendb.start_chat(api_key=live, model="m")
        for tokens in (3, 0, 9):
            await tokendb.add_message(session=session, role="user", content="hi", tokens=tokens)
        await tokendb.charge(user=user, amount=7, api_key=live, model="m")
        await tokendb.hold(user=user, amount=20, ttl=600, api_key=live, model="m")
        await tokendb.hold(user=user, amount=10, ttl=600)


@given(data=st.data())
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
async def test_random_dml_as_the_application_role_never_breaks_the_books(
    data: st.DataObject, app_role: str, tokendb_db: str
) -> None:
    await truncate_all(database_url=tokendb_db)
    world = World()
    await seed(world)
    owner = await asyncpg.connect(tokendb_db)
    app = await asyncpg.connect(app_role)
    try:
        assert await books.problems(owner) == []
        before = await books.Snapshot.take(owner)
        for _ in range(data.draw(st.integers(3, 15), label="transactions")):
            await world.refresh(owner)
            sent = statements(data, world)
            commit = data.draw(st.sampled_from([True, True, True, False]), label="commit")
            transaction = app.transaction()
            await transaction.start()
            try:
                for sql in sent:
                    await app.execute(sql)
            except asyncpg.PostgresError as exc:
                event(f"refused: {getattr(exc, 'constraint_name', None) or type(exc).__name__}")
                await transaction.rollback()
                continue
            if not commit:
                await transaction.rollback()
                continue
            try:
                await transaction.commit()
            except asyncpg.PostgresError as exc:
                # Refused at commit by a deferred check: nothing was written.
                event(f"refused at commit: {exc.constraint_name}")
                continue
            event("committed")
            now = await books.Snapshot.take(owner)
            assert await books.problems(owner) == [], sent
            assert now.broken_since(before) == [], sent
            assert await tokendb.audit_ledger(since_checkpoint=True) == [], sent
            assert all(found == [] for found in (await audit_books()).values()), sent
            for key_id in (*now.revoked, *now.expired):
                if key_id in world.secrets:
                    with pytest.raises(tokendb.InvalidApiKey):
                        await tokendb.verify_api_key(secret=world.secrets[key_id])
            before = now
    finally:
        await app.close()
        await owner.close()
