"""The host app end to end: its models, its migrations and tokendb's ledger, over HTTP."""

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from hostapp.main import app
from hostapp.models import Project, ProjectCharge
from tortoise.exceptions import IntegrityError

import tokendb


@pytest.fixture
async def client(tokendb_clean: str) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://host") as http:
            yield http


async def customer(funded_user: Any, make_api_key: Any, balance: int) -> tuple[Any, dict[str, str]]:
    user = await funded_user(balance=balance)
    _, secret = await make_api_key(user=user, permissions=["projects"])
    return user, {"Authorization": f"Bearer {secret}"}


async def test_a_project_is_billed_through_the_ledger(
    client: httpx.AsyncClient, funded_user: Any, make_api_key: Any
) -> None:
    user, auth = await customer(funded_user, make_api_key, 100)
    project = (await client.post("/projects", json={"name": "apollo"}, headers=auth)).json()
    charged = await client.post(
        f"/projects/{project['id']}/charges", json={"tokens": 30}, headers=auth
    )
    assert charged.status_code == 200, charged.text
    assert charged.json() == {"project": {**project, "spent": 30}, "balance": 70}
    (row, *_) = await tokendb.list_transactions(user=user)
    assert (row.amount, row.description) == (-30, "apollo")
    assert (await ProjectCharge.get(transaction_id=row.id)).tokens == 30
    assert await tokendb.audit_ledger() == []


async def test_a_refused_charge_writes_neither_row(
    client: httpx.AsyncClient, funded_user: Any, make_api_key: Any
) -> None:
    user, auth = await customer(funded_user, make_api_key, 10)
    project = (await client.post("/projects", json={"name": "gemini"}, headers=auth)).json()
    refused = await client.post(
        f"/projects/{project['id']}/charges", json={"tokens": 11}, headers=auth
    )
    assert refused.status_code == 402 and refused.json()["error"] == "InsufficientTokens"
    assert await ProjectCharge.all().count() == 0
    assert await tokendb.get_balance(user=user) == 10


async def test_another_users_project_is_not_found(
    client: httpx.AsyncClient, funded_user: Any, make_api_key: Any
) -> None:
    _, alice = await customer(funded_user, make_api_key, 100)
    bob_user, bob = await customer(funded_user, make_api_key, 100)
    project = (await client.post("/projects", json={"name": "mercury"}, headers=alice)).json()
    stolen = await client.post(
        f"/projects/{project['id']}/charges", json={"tokens": 1}, headers=bob
    )
    assert stolen.status_code == 404 and stolen.json()["error"] == "NotFound"
    assert await tokendb.get_balance(user=bob_user) == 100


async def test_the_foreign_keys_to_tokendb_hold_in_the_database(make_user: Any) -> None:
    user = await make_user()
    project = await Project.create(name="skylab", owner_id=user.id)
    unknown = "01900000-0000-7000-8000-000000000001"
    with pytest.raises(IntegrityError):  # projects.owner_id -> users
        await Project.create(name="orphan", owner_id=unknown)
    with pytest.raises(IntegrityError):  # project_charges.transaction_id -> token_transactions
        await ProjectCharge.create(project=project, transaction_id=unknown, tokens=1)
