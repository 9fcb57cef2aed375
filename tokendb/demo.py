"""The end-to-end scenario behind ``tokendb demo``: every operation once, on real data.

It only uses the public API, in the order a gateway would: register a user,
issue an API key, verify it, run a short chat whose messages are billed, top
up, refund a message, then read the balance, the ledger page and the audit.
Optionally it first seeds ``seed_users`` users (each topped up once), for a
database that looks lived in.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import tokendb
from tokendb import passwords
from tokendb.chats import ChatDiscrepancy
from tokendb.ledger import LedgerDiscrepancy
from tokendb.models import ApiKey, ChatMessage, ChatSession, TokenTransaction, User

__all__ = ["CHAT", "DemoReport", "run_demo", "seed_users"]

CHAT: tuple[tuple[str, str, int], ...] = (
    ("system", "You are a helpful assistant.", 0),
    ("user", "What does tokendb keep?", 7),
    ("assistant", "Users, hashed API keys, an append-only ledger and billed chats.", 23),
    ("user", "And it never overdraws?", 6),
    ("assistant", "Never: the balance check and the debit are one statement.", 19),
)
"""The demo chat: ``(role, content, tokens)``; each message's tokens are billed."""
TOP_UP = 500
SEED_CONCURRENCY = 8


@dataclass
class DemoReport:
    """Everything the demo did, for the CLI to print (``--json`` prints it as is)."""

    user: User
    api_key: ApiKey
    key_verified: bool
    chat: ChatSession
    messages: list[ChatMessage]
    top_up: TokenTransaction
    refund: TokenTransaction
    balance: int
    ledger: list[TokenTransaction]
    ledger_discrepancies: list[LedgerDiscrepancy] = field(default_factory=list)
    chat_discrepancies: list[ChatDiscrepancy] = field(default_factory=list)
    seeded_users: int = 0

    @property
    def books_balance(self) -> bool:
        return not self.ledger_discrepancies and not self.chat_discrepancies


async def seed_users(count: int, *, on_progress: Callable[[int], None] | None = None) -> int:
    """Create ``count`` demo users, each topped up once; return how many were created.

    Seeded users get cheap (weak) password hashes: they are demo data, and
    production-strength argon2 would make 10,000 users take minutes. The
    previous parameters are restored afterwards.
    """
    run = secrets.token_hex(4)
    semaphore = asyncio.Semaphore(SEED_CONCURRENCY)

    async def one(number: int) -> None:
        async with semaphore:
            user = await tokendb.create_user(
                email=f"seed-{run}-{number}@example.com",
                password=secrets.token_urlsafe(12),
                name=f"Seed user {number}",
            )
            await tokendb.top_up(user=user, amount=100 + number % 900, description="seed")
        if on_progress is not None:
            on_progress(1)

    with passwords.parameters(**passwords.CHEAP_PARAMETERS):
        await asyncio.gather(*(one(number) for number in range(count)))
    return count


async def run_demo(
    *, seed: int = 0, on_progress: Callable[[int], None] | None = None
) -> DemoReport:
    """Run the scenario on the database tokendb is initialised on; return what happened.

    Raises whatever the operations raise (all :class:`~tokendb.TokenDBError`).
    """
    seeded = await seed_users(seed, on_progress=on_progress) if seed else 0
    user = await tokendb.create_user(
        email=f"demo-{secrets.token_hex(4)}@example.com",
        password=secrets.token_urlsafe(16),
        name="Demo User",
    )
    api_key, secret = await tokendb.issue_api_key(user=user, name="demo key", permissions=["chat"])
    verified = await tokendb.verify_api_key(secret=secret, permission="chat")
    chat = await tokendb.start_chat(api_key=verified, model="demo-model")
    messages = [
        await tokendb.add_message(session=chat, role=role, content=content, tokens=tokens)
        for role, content, tokens in CHAT
    ]
    chat = await tokendb.end_chat(session=chat)
    top_up = await tokendb.top_up(user=user, amount=TOP_UP, description="demo top-up")
    # Refund the last billed message, found through the ledger like support would.
    usage = [tx for tx in await tokendb.list_transactions(user=user) if tx.amount < 0]
    refund = await tokendb.refund(transaction=usage[0], description="demo refund")
    return DemoReport(
        user=await tokendb.get_user(user_id=user.id),
        api_key=api_key,
        key_verified=verified.id == api_key.id,
        chat=chat,
        messages=messages,
        top_up=top_up,
        refund=refund,
        balance=await tokendb.get_balance(user=user),
        ledger=await tokendb.list_transactions(user=user, limit=20),
        ledger_discrepancies=await tokendb.audit_ledger(),
        chat_discrepancies=await tokendb.audit_chats(),
        seeded_users=seeded,
    )
