"""tokendb in hosts that are not FastAPI/Starlette: aiohttp and Quart, each registered its way.

Each app runs in a child process (it initialises Tortoise itself; this
process's context belongs to ``tokendb_db``), with the framework's own test
client: verify the key, charge, read the balance, and the errors' shape.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import tokendb

ROOT = Path(__file__).resolve().parent.parent

AIOHTTP = """
import asyncio, json, sys, uuid
from aiohttp.test_utils import TestClient, TestServer
from examples.aiohttp_app import create_app

async def main(url, secret):
    auth = {"Authorization": f"Bearer {secret}"}
    async with TestClient(TestServer(create_app(database_url=url))) as client:
        once = {"tokens": 30, "reference_id": str(uuid.uuid4())}
        first = await client.post("/v1/charge", json=once, headers=auth)
        again = await client.post("/v1/charge", json=once, headers=auth)
        balance = await client.get("/v1/balance", headers=auth)
        refused = await client.post("/v1/charge", json={"tokens": 1000}, headers=auth)
        anonymous = await client.get("/v1/balance")
        return {
            "charged": [first.status, await first.json(), await again.json()],
            "balance": [balance.status, await balance.json()],
            "refused": [refused.status, await refused.json()],
            "anonymous": [
                anonymous.status, await anonymous.json(), anonymous.headers.get("WWW-Authenticate")
            ],
        }

print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2]))))
"""

QUART = """
import asyncio, json, os, sys, uuid
from examples.quart_app import app

async def main(secret):
    auth = {"Authorization": f"Bearer {secret}"}
    async with app.test_app() as test_app:
        client = test_app.test_client()
        once = {"tokens": 30, "reference_id": str(uuid.uuid4())}
        first = await client.post("/v1/charge", json=once, headers=auth)
        again = await client.post("/v1/charge", json=once, headers=auth)
        balance = await client.get("/v1/balance", headers=auth)
        refused = await client.post("/v1/charge", json={"tokens": 1000}, headers=auth)
        anonymous = await client.get("/v1/balance")
        return {
            "charged": [first.status_code, await first.get_json(), await again.get_json()],
            "balance": [balance.status_code, await balance.get_json()],
            "refused": [refused.status_code, await refused.get_json()],
            "anonymous": [
                anonymous.status_code,
                await anonymous.get_json(),
                anonymous.headers.get("WWW-Authenticate"),
            ],
        }

print(json.dumps(asyncio.run(main(sys.argv[2]))))
"""

# Quart with Tortoise's own register_tortoise: its context stays in the hook's task.
QUART_REGISTER_TORTOISE = """
import asyncio, json, sys
from quart import Quart
from tortoise.contrib.quart import register_tortoise
import tokendb
from tokendb.http import http_error

app = Quart(__name__)
register_tortoise(app, config=tokendb.tortoise_orm(sys.argv[1]))
seen = []

@app.errorhandler(tokendb.TokenDBError)
async def tokendb_error(exc):
    seen.append([type(exc).__name__, str(exc)])
    error = http_error(exc)
    return error.body, error.status, error.headers

@app.get("/v1/balance")
async def balance():
    return {"balance": await tokendb.get_balance(user="01900000-0000-7000-8000-000000000001")}

async def main():
    async with app.test_app() as test_app:
        response = await test_app.test_client().get("/v1/balance")
        return {"status": response.status_code, "body": await response.get_json(), "seen": seen}

print(json.dumps(asyncio.run(main())))
"""


def run_app(script: str, url: str, secret: str = "") -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), url, secret],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    facts: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return facts


@pytest.mark.parametrize("script", [AIOHTTP, QUART], ids=["aiohttp", "quart"])
async def test_verify_charge_balance(
    script: str, tokendb_clean: str, funded_user: Any, make_api_key: Any
) -> None:
    user = await funded_user(balance=100)
    _, secret = await make_api_key(user=user, permissions=["chat"])
    facts = run_app(script, tokendb_clean, secret)
    assert facts["charged"] == [200, {"balance_after": 70}, {"balance_after": 70}]  # idempotent
    assert facts["balance"] == [200, {"balance": 70}]
    status, body = facts["refused"]
    assert status == 402 and body == {
        "error": "InsufficientTokens",
        "detail": f"user {user.id} has 70 tokens, 1000 requested",
        "fields": {"user_id": str(user.id), "balance": 70, "requested": 1000},
    }
    status, body, challenge = facts["anonymous"]
    assert (status, body["error"], challenge) == (401, "InvalidApiKey", "Bearer")
    assert await tokendb.get_balance(user=user) == 70


def test_quart_with_register_tortoise_gets_a_configuration_error_with_the_fix(
    tokendb_clean: str,
) -> None:
    facts = run_app(QUART_REGISTER_TORTOISE, tokendb_clean)
    assert facts["status"] == 500 and facts["body"]["error"] == "ConfigurationError"
    ((kind, message),) = facts["seen"]
    assert kind == "ConfigurationError" and "register_tortoise" in message
    assert "tokendb.init(" in message
