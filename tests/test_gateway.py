"""examples/gateway.py end to end: over ASGI in this process, and served by uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
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
        "available": 92,
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


async def test_the_usage_endpoint_reports_the_callers_usage(
    client: httpx.AsyncClient, funded_user: Any, make_api_key: Any
) -> None:
    _, auth = await customer(funded_user, make_api_key, 100)
    session = (
        await client.post("/v1/chat/sessions", json={"model": "echo-1"}, headers=auth)
    ).json()
    sent = await client.post(
        f"/v1/chat/sessions/{session['id']}/messages", json={"content": "hi"}, headers=auth
    )
    assert sent.status_code == 200, sent.text
    today = datetime.now(UTC).date()
    span = {"since": str(today), "until": str(today + timedelta(days=1))}
    shown = await client.get("/v1/usage", params={**span, "group_by": "model"}, headers=auth)
    assert shown.status_code == 200, shown.text
    assert shown.json() == [
        {"day": None, "api_key_id": None, "model": "echo-1", "tokens": 1 + 3, "requests": 2}
    ]
    backwards = {"since": span["until"], "until": span["since"]}
    assert (await client.get("/v1/usage", params=backwards, headers=auth)).json() == []
    assert (await client.get("/v1/usage", params=span)).status_code == 401


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


@contextlib.asynccontextmanager
async def served_gateway(database_url: str) -> AsyncIterator[tuple[str, list[bytes]]]:
    """The gateway served by uvicorn in a child process; yields its base URL and output."""
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "uvicorn",
        "examples.gateway:app",
        "--port",
        str(port),
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output: list[bytes] = []
    base_url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base_url) as http:
            for _ in range(300):
                try:
                    await http.get("/openapi.json")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
        yield base_url, output
    finally:
        server.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(server.communicate(), 60)
        output.append(out)
    # uvicorn re-raises the SIGTERM it handled, after a graceful shutdown.
    assert server.returncode in (0, -signal.SIGTERM), out.decode()


async def test_uvicorn_serves_the_gateway_as_the_readme_shows(
    tokendb_clean: str, funded_user: Any, make_api_key: Any
) -> None:
    _, auth = await customer(funded_user, make_api_key, 50)
    async with (
        served_gateway(tokendb_clean) as (base_url, output),
        httpx.AsyncClient(base_url=base_url) as http,
    ):
        session = (await http.post("/v1/chat/sessions", json={}, headers=auth)).json()
        sent = await http.post(
            f"/v1/chat/sessions/{session['id']}/messages",
            json={"content": "ping"},
            headers=auth,
        )
        assert sent.status_code == 200 and sent.json()["balance"] == 50 - 1 - 3
    assert b"Application shutdown complete" in output[0]


# --- the HTTP contract: one error shape, declared everywhere; hostile bodies ----------------

ERROR_KEYS = {"error", "detail", "fields"}


async def test_fastapis_own_errors_have_tokendbs_shape(
    client: httpx.AsyncClient, funded_user: Any, make_api_key: Any
) -> None:
    _, auth = await customer(funded_user, make_api_key, 100)
    invalid = await client.post("/v1/chat/sessions", json={"model": 7}, headers=auth)
    assert invalid.status_code == 422
    body = invalid.json()
    assert set(body) == ERROR_KEYS and body["error"] == "ValidationError"
    assert body["fields"]["field"] == "body.model" and body["fields"]["errors"]
    missing = await client.post(f"/v1/chat/sessions/{uuid.uuid4()}/messages", json={}, headers=auth)
    assert missing.status_code == 422 and missing.json()["fields"]["field"] == "body.content"
    no_route = await client.get("/v1/nothing-here", headers=auth)
    assert no_route.status_code == 404 and no_route.json() == {
        "error": "NotFound",
        "detail": "Not Found",
        "fields": {},
    }
    wrong_method = await client.delete("/v1/balance", headers=auth)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"] == "MethodNotAllowed"
    assert wrong_method.headers["allow"] == "GET"


async def test_a_lone_surrogate_is_a_422_not_a_500(
    client: httpx.AsyncClient, funded_user: Any, make_api_key: Any
) -> None:
    user, auth = await customer(funded_user, make_api_key, 100)
    session = (await client.post("/v1/chat/sessions", json={}, headers=auth)).json()
    json_headers = {**auth, "Content-Type": "application/json"}
    # Valid JSON (an escaped lone surrogate), not valid Unicode: a 422 whose body
    # still encodes (FastAPI's own handler crashed on it with a 500).
    for path, field in [
        (f"/v1/chat/sessions/{session['id']}/messages", "content"),
        ("/v1/chat/sessions", "model"),
    ]:
        response = await client.post(
            path, content=f'{{"{field}": "a\\ud800b"}}'.encode(), headers=json_headers
        )
        assert response.status_code == 422, response.text
        assert response.json()["error"] == "ValidationError"
        assert response.json()["fields"]["field"] == f"body.{field}"
    assert await tokendb.get_balance(user=user) == 100


async def test_a_body_that_is_not_utf8_is_a_documented_400(
    client: httpx.AsyncClient, funded_user: Any, make_api_key: Any
) -> None:
    _, auth = await customer(funded_user, make_api_key, 100)
    response = await client.post(
        "/v1/chat/sessions",
        content=b'{"model": "\xff\xfe"}',
        headers={**auth, "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"] == "BadRequest"


async def test_a_body_over_the_limit_is_413_and_bills_nothing(
    client: httpx.AsyncClient, funded_user: Any, make_api_key: Any
) -> None:
    user, auth = await customer(funded_user, make_api_key, 10_000_000)
    session = (await client.post("/v1/chat/sessions", json={}, headers=auth)).json()
    url = f"/v1/chat/sessions/{session['id']}/messages"
    big = json.dumps({"content": "word " * (300 * 1024)}).encode()  # 1.5 MiB
    declared = await client.post(
        url, content=big, headers={**auth, "Content-Type": "application/json"}
    )
    assert declared.status_code == 413
    assert declared.json()["error"] == "RequestTooLarge"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    streamed = await client.post(
        url, content=chunks(), headers={**auth, "Content-Type": "application/json"}
    )
    assert streamed.status_code == 413 and streamed.json()["error"] == "RequestTooLarge"
    assert await tokendb.get_balance(user=user) == 10_000_000
    assert await tokendb.list_messages(session=session["id"]) == []


async def test_every_route_declares_the_error_shape_in_openapi(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for status in ("400", "401", "404", "413", "422", "500", "503"):
                content = operation["responses"][status]["content"]["application/json"]
                assert content["schema"] == {"$ref": "#/components/schemas/ErrorOut"}, (
                    method,
                    path,
                    status,
                )


async def test_a_streamed_reply_is_held_first_and_billed_from_the_hold(
    client: httpx.AsyncClient, funded_user: Any, make_api_key: Any
) -> None:
    user, auth = await customer(funded_user, make_api_key, 100)
    session = (await client.post("/v1/chat/sessions", json={}, headers=auth)).json()
    url = f"/v1/chat/sessions/{session['id']}/stream"
    streamed = await client.post(url, json={"content": "one two", "max_tokens": 10}, headers=auth)
    assert streamed.status_code == 200 and streamed.text == "You said: one two "
    # The prompt (2 tokens) and the reply (4 words) are billed; the hold of 10 is captured.
    assert await tokendb.get_balance(user=user) == 94
    assert await tokendb.get_available_balance(user=user) == 94
    (captured,) = await tokendb.list_holds(user=user)
    assert (captured.status, captured.amount, captured.captured_amount) == ("captured", 10, 4)
    messages = await tokendb.list_messages(session=session["id"])
    assert [(m.role, m.tokens) for m in messages] == [("user", 2), ("assistant", 4)]
    (usage, *_) = await tokendb.list_transactions(user=user)
    assert (usage.id, usage.reference_id) == (captured.captured_transaction_id, messages[1].id)
    # max_tokens cuts the reply; a hold the balance cannot cover is 402 before any streaming.
    short = await client.post(url, json={"content": "a b c", "max_tokens": 2}, headers=auth)
    assert short.text == "You said: "
    refused = await client.post(url, json={"content": "x", "max_tokens": 4096}, headers=auth)
    assert (
        refused.status_code == 402 and refused.json()["fields"]["balance"] == 88
    )  # the prompt is billed


async def test_a_stream_that_fails_releases_its_hold(
    client: httpx.AsyncClient, funded_user: Any, make_api_key: Any, monkeypatch: Any
) -> None:
    user, auth = await customer(funded_user, make_api_key, 100)
    session = (await client.post("/v1/chat/sessions", json={}, headers=auth)).json()
    gateway = load_gateway()

    def broken(prompt: str) -> str:
        raise RuntimeError("the provider went away")

    async with asgi_client(gateway.app, base_url="http://gateway") as http:
        monkeypatch.setattr(gateway, "generate", broken)
        url = f"/v1/chat/sessions/{session['id']}/stream"
        with contextlib.suppress(Exception):
            await http.post(url, json={"content": "hi", "max_tokens": 50}, headers=auth)
    (released,) = await tokendb.list_holds(user=user)
    assert released.status == "released"
    assert await tokendb.get_available_balance(user=user) == 99  # only the prompt is billed


def schemathesis_command() -> list[str]:
    script = Path(sys.executable).parent / "schemathesis"
    return [str(script)] if script.exists() else [shutil.which("schemathesis") or "schemathesis"]


async def test_schemathesis_finds_nothing_against_the_gateway(
    tokendb_clean: str, funded_user: Any, make_api_key: Any, tmp_path: Path
) -> None:
    """Every check schemathesis has, on every route, with a funded key: zero failures."""
    _, auth = await customer(funded_user, make_api_key, 100_000_000)
    async with served_gateway(tokendb_clean) as (base_url, _):
        run = await asyncio.create_subprocess_exec(
            *schemathesis_command(),
            "run",
            f"{base_url}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            os.environ.get("TOKENDB_SCHEMATHESIS_EXAMPLES", "25"),
            "--seed",
            "12",
            "--header",
            f"Authorization: {auth['Authorization']}",
            "--no-color",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,  # where it keeps its .schemathesis/ cache
        )
        output, _ = await asyncio.wait_for(run.communicate(), 300)
    report = output.decode()
    assert run.returncode == 0, report
    assert "No issues found" in report, report
