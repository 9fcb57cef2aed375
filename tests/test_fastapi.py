"""tokendb.contrib.fastapi and tokendb.contrib.schemas: API-key auth and output schemas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import httpx
import pydantic
import pytest
import pytest_asyncio
from asgi_lifespan import LifespanManager
from fastapi import Depends, FastAPI
from pydantic import BaseModel

import tokendb
from tests.helpers import asgi_client
from tokendb import holds
from tokendb.contrib import schemas
from tokendb.contrib.fastapi import exception_handlers, lifespan, require_api_key
from tokendb.models import public_fields

SCHEMAS: list[tuple[type[BaseModel], type[Any]]] = [
    (schemas.UserOut, tokendb.User),
    (schemas.ApiKeyOut, tokendb.ApiKey),
    (schemas.TransactionOut, tokendb.TokenTransaction),
    (schemas.ChatSessionOut, tokendb.ChatSession),
    (schemas.ChatMessageOut, tokendb.ChatMessage),
    (schemas.HoldOut, tokendb.TokenHold),
]


@pytest.mark.parametrize("schema, model", SCHEMAS, ids=lambda value: value.__name__)
def test_schemas_expose_every_column_but_the_secrets(
    tokendb_db: str, schema: type[BaseModel], model: type[Any]
) -> None:
    assert set(schema.model_fields) == set(public_fields(model))
    assert not set(schema.model_fields) & {"password_hash", "key_hash"}


async def test_the_hold_schemas_take_a_hold_and_give_it_back(funded_user: Any) -> None:
    request = schemas.HoldIn.model_validate({"amount": 40, "ttl": 300})
    user = await funded_user(balance=100)
    held = await tokendb.hold(user=user, **request.model_dump())
    out = schemas.HoldOut.model_validate(held)
    assert (out.id, out.amount, out.status) == (held.id, 40, tokendb.HoldStatus.ACTIVE)
    for bad in ({"amount": 0, "ttl": 1}, {"amount": 1, "ttl": 0}, {"amount": 1, "ttl": 86401}):
        with pytest.raises(pydantic.ValidationError):
            schemas.HoldIn.model_validate(bad)
    # The schema's limits are tokendb.hold's: at the edge, both accept; past it, both refuse.
    longest = holds.MAX_HOLD_TTL.total_seconds()
    text = "x" * holds.MAX_DESCRIPTION_LENGTH
    edge: dict[str, Any] = {"amount": 1, "ttl": longest, "description": text}
    schemas.HoldIn.model_validate(edge)
    for past in ({"ttl": longest + 1}, {"description": text + "x"}):
        with pytest.raises(pydantic.ValidationError):
            schemas.HoldIn.model_validate(edge | past)
        with pytest.raises(tokendb.ValidationError):
            await tokendb.hold(user=user, **(edge | past))
    await tokendb.release(hold=held)


async def test_schemas_validate_model_instances(make_api_key: Any) -> None:
    key, secret = await make_api_key(permissions=["chat"])
    user = await tokendb.get_user(user_id=key.user_id)
    dumped = schemas.UserOut.model_validate(user).model_dump_json()
    assert user.password_hash not in dumped and "password_hash" not in dumped
    key_out = schemas.ApiKeyOut.model_validate(key)
    assert key_out.key_prefix == secret[:12] and key.key_hash not in key_out.model_dump_json()
    issued = schemas.IssuedApiKeyOut.model_validate({**key_out.model_dump(), "secret": secret})
    assert issued.secret == secret


def build_app() -> FastAPI:
    app = FastAPI(lifespan=lifespan(), exception_handlers=exception_handlers())

    @app.get("/me")
    async def me(
        key: Annotated[tokendb.ApiKey, Depends(require_api_key())],
    ) -> schemas.ApiKeyOut:
        return schemas.ApiKeyOut.model_validate(key)

    @app.get("/chat")
    async def chat(
        key: Annotated[tokendb.ApiKey, Depends(require_api_key("chat"))],
    ) -> schemas.UserOut:
        # key.user carries no balance (a cached one could be stale): read the user afresh.
        return schemas.UserOut.model_validate(await tokendb.get_user(user_id=key.user_id))

    return app


@pytest_asyncio.fixture(loop_scope="session")
async def client(tokendb_clean: str) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app()
    async with asgi_client(app) as http:
        yield http


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def test_require_api_key_returns_the_verified_key(
    client: httpx.AsyncClient, make_api_key: Any
) -> None:
    key, secret = await make_api_key(permissions=["chat"])
    response = await client.get("/me", headers=bearer(secret))
    assert response.status_code == 200
    assert response.json()["id"] == str(key.id) and "key_hash" not in response.text
    user = (await client.get("/chat", headers=bearer(secret))).json()
    assert user["id"] == str(key.user_id) and "password_hash" not in user


@pytest.mark.parametrize(
    "headers, error",
    [
        ({}, "InvalidApiKey"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "InvalidApiKey"),
        ({"Authorization": "Bearer not-a-key"}, "InvalidApiKey"),
        ({"Authorization": "Bearer sk_live_" + "x" * 40}, "InvalidApiKey"),
    ],
)
async def test_missing_or_unknown_keys_are_401(
    client: httpx.AsyncClient, headers: dict[str, str], error: str
) -> None:
    response = await client.get("/me", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"] == error


async def test_revoked_expired_and_unscoped_keys_are_refused(
    client: httpx.AsyncClient, make_api_key: Any
) -> None:
    key, secret = await make_api_key(permissions=["billing"])
    denied = await client.get("/chat", headers=bearer(secret))
    assert denied.status_code == 403
    assert denied.json()["fields"] == {"permission": "chat", "key_prefix": key.key_prefix}

    soon = datetime.now(UTC) + timedelta(milliseconds=300)
    _, expiring = await make_api_key(expires_at=soon)
    assert (await client.get("/me", headers=bearer(expiring))).status_code == 200
    await asyncio.sleep((soon - datetime.now(UTC)).total_seconds() + 0.1)
    expired = await client.get("/me", headers=bearer(expiring))
    assert expired.status_code == 401 and expired.json()["error"] == "ApiKeyExpired"

    await tokendb.revoke_api_key(api_key=key)
    revoked = await client.get("/me", headers=bearer(secret))
    assert revoked.status_code == 401 and revoked.json()["error"] == "ApiKeyRevoked"


async def test_apps_cannot_be_added_to_an_already_initialised_tokendb(tokendb_db: str) -> None:
    """Under the tokendb_db fixture tokendb owns Tortoise's one global context:
    an app's own models would go unregistered, so the lifespan refuses to start."""
    from tokendb.contrib.fastapi import RegisterTokenDB

    app = FastAPI(lifespan=lambda app: RegisterTokenDB(app, apps={"shop": {"models": []}}))
    with pytest.raises(tokendb.ConfigurationError, match="shop"):
        async with LifespanManager(app):
            pass
    assert await tokendb.audit_ledger() == []
