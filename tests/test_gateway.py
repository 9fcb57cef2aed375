"""examples/gateway.py end to end: over ASGI in this process, and served by uvicorn."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest_asyncio

import tokendb
from tests.helpers import asgi_client, free_port, load_module

ROOT = Path(__file__).resolve().parent.parent


def load_gateway() -> ModuleType:
    return load_module("gateway_example", ROOT / "examples" / "gateway.py")


@pytest_asyncio.fixture(loop_scope="session")
async def client(tokendb_clean: str) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(load_gateway().app, base_url="http://gateway") as http:
        yield http


async def customer(funded_user: Any, make_api_key: Any, balance: int) -> tuple[Any, dict[str, str]]:
    user = await funded_user(balance=balance)
    _, secret = await make_api_key(user=user, permissions=["chat"])
    return user, {"Authorization": f"Bearer {secret}"}


async def test_a_chat_is_billed_over_http(
    client: httpx.AsyncClient, funded_user: Any, make_api_key: Any
) -> None:
    user, auth = await customer(funded_user, make_api_key, 100)
    created = await client.post("/v1/chat/sessions", json={"model": "echo-1"}, headers=auth)
    assert created.status_code == 201
    session = created.json()
    assert session["user_id"] == str(user.id) and session["tokens_used"] == 0

    sent = await client.post(
        f"/v1/chat/sessions/{session['id']}/messages",
        json={"content": "hello there world"},
        headers=auth,
    )
    assert sent.status_code == 200, sent.text
    exchange = sent.json()
    assert exchange["prompt"]["tokens"] == 3
    assert exchange["reply"] == exchange["reply"] | {
        "role": "assistant",
        "content": "You said: hello there world",
        "tokens": 5,
    }
    assert exchange["balance"] == 92

    assert (await client.get("/v1/balance", headers=auth)).json() == {
        "user_id": str(user.id),
        "balance": 92,
    }
    ledger = (await client.get("/v1/transactions", headers=auth)).json()
    assert [(row["type"], row["amount"]) for row in ledger] == [
        ("usage", -5),
        ("usage", -3),
        ("bonus", 100),
    ]
    older = await client.get(
        "/v1/transactions", params={"limit": 1, "before": ledger[0]["id"]}, headers=auth
    )
    assert [row["amount"] for row in older.json()] == [-3]
    assert (await tokendb.get_chat(session=session["id"])).tokens_used == 8
    assert await tokendb.audit_ledger() == [] and await tokendb.audit_chats() == []


async def test_an_unpaid_reply_is_402_and_only_the_prompt_is_billed(
    client: httpx.AsyncClient, funded_user: Any, make_api_key: Any
) -> None:
    user, auth = await customer(funded_user, make_api_key, 4)
    session = (await client.post("/v1/chat/sessions", json={}, headers=auth)).json()
    refused = await client.post(
        f"/v1/chat/sessions/{session['id']}/messages",
        json={"content": "one two three"},
        headers=auth,
    )
    assert refused.status_code == 402
    assert refused.json()["fields"] == {"user_id": str(user.id), "balance": 1, "requested": 5}
    assert await tokendb.get_balance(user=user) == 1
    messages = await tokendb.list_messages(session=session["id"])
    assert [message.role for message in messages] == ["user"]


async def test_other_users_sessions_and_unscoped_keys_are_refused(
    client: httpx.AsyncClient, funded_user: Any, make_api_key: Any
) -> None:
    _, alice = await customer(funded_user, make_api_key, 100)
    bob_user, bob = await customer(funded_user, make_api_key, 100)
    session = (await client.post("/v1/chat/sessions", json={}, headers=alice)).json()
    stolen = await client.post(
        f"/v1/chat/sessions/{session['id']}/messages", json={"content": "hi"}, headers=bob
    )
    assert stolen.status_code == 404 and stolen.json()["error"] == "NotFound"
    assert await tokendb.get_balance(user=bob_user) == 100

    _, billing_only = await make_api_key(permissions=["billing"])
    refused = await client.get("/v1/balance", headers={"Authorization": f"Bearer {billing_only}"})
    assert refused.status_code == 403
    assert (await client.get("/v1/balance")).status_code == 401
    invalid = await client.post("/v1/chat/sessions", json={"model": ""}, headers=alice)
    assert invalid.status_code == 422


async def test_uvicorn_serves_the_gateway_as_the_readme_shows(
    tokendb_clean: str, funded_user: Any, make_api_key: Any
) -> None:
    _, auth = await customer(funded_user, make_api_key, 50)
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "uvicorn",
        "examples.gateway:app",
        "--port",
        str(port),
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": tokendb_clean},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(300):
                try:
                    await http.get("/docs")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            session = (await http.post("/v1/chat/sessions", json={}, headers=auth)).json()
            sent = await http.post(
                f"/v1/chat/sessions/{session['id']}/messages",
                json={"content": "ping"},
                headers=auth,
            )
            assert sent.status_code == 200 and sent.json()["balance"] == 50 - 1 - 3
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(server.communicate(), 60)
    # uvicorn re-raises the SIGTERM it handled, after a graceful shutdown.
    assert server.returncode in (0, -signal.SIGTERM), output.decode()
    assert b"Application shutdown complete" in output
