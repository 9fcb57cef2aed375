"""tokendb.contrib.starlette: TokenDBError → HTTP, and the lifespan registration."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest
import pytest_asyncio
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import tokendb
from tests.helpers import asgi_client
from tokendb.contrib.starlette import error_response, exception_handlers, lifespan

ID = uuid.UUID("01900000-0000-7000-8000-000000000001")

CASES = [
    (tokendb.InvalidApiKey(), 401),
    (tokendb.ApiKeyRevoked("sk_live_AbCd"), 401),
    (tokendb.ApiKeyExpired("sk_live_AbCd", datetime(2026, 1, 1, tzinfo=UTC)), 401),
    (tokendb.InvalidCredentials(), 401),
    (tokendb.PermissionDenied("chat", "sk_live_AbCd"), 403),
    (tokendb.InsufficientTokens(ID, 5, 40), 402),
    (tokendb.NotFound("user", ID), 404),
    (tokendb.EmailTaken("ada@example.com"), 409),
    (tokendb.ReferenceConflict(ID, existing_amount=10, requested_amount=20), 409),
    (tokendb.RefundExceedsCharge(ID, 3, 4), 409),
    (tokendb.ChatSessionEnded(ID), 409),
    (tokendb.HoldNotActive(ID, "released"), 409),
    (tokendb.HoldExpired(ID, datetime(2026, 1, 1, tzinfo=UTC)), 409),
    (tokendb.ValidationError("amount", "must be at least 1, got 0"), 422),
    (tokendb.CaptureExceedsHold(ID, 10, 11), 422),
    (tokendb.DatabaseUnavailable("connection refused", outcome_unknown=True), 503),
    (tokendb.DatabaseTimeout("lock_timeout"), 503),
    (tokendb.DatabaseError("boom at db.internal", sqlstate="XX000"), 500),
    (tokendb.ConfigurationError("DATABASE_URL=postgres://u:pw@db.internal/x"), 500),
]


@pytest.mark.parametrize("exc, status", CASES, ids=lambda value: type(value).__name__)
def test_each_error_maps_to_its_status_with_a_json_body(
    exc: tokendb.TokenDBError, status: int
) -> None:
    response = error_response(exc)
    assert response.status_code == status
    body = httpx.Response(status, content=bytes(response.body)).json()
    assert body["error"] == type(exc).__name__
    if status < 500:
        assert body["detail"] == str(exc)
        public = {key: value for key, value in vars(exc).items() if not key.startswith("_")}
        assert set(body["fields"]) == set(public)
    else:
        assert "db.internal" not in bytes(response.body).decode()  # no deployment details leak
    assert (response.headers.get("www-authenticate") == "Bearer") == (status == 401)
    assert ("retry-after" in response.headers) == (status == 503)


def test_fields_are_json_values() -> None:
    body = httpx.Response(402, content=bytes(error_response(CASES[5][0]).body)).json()
    assert body["fields"] == {"user_id": str(ID), "balance": 5, "requested": 40}
    expired = httpx.Response(401, content=bytes(error_response(CASES[2][0]).body)).json()
    assert expired["fields"]["expired_at"] == "2026-01-01T00:00:00Z"


async def charge(request: Request) -> JSONResponse:
    tx = await tokendb.charge(
        user=request.path_params["user_id"], amount=int(request.query_params["amount"])
    )
    return JSONResponse({"balance_after": tx.balance_after})


@pytest_asyncio.fixture(loop_scope="session")
async def client(tokendb_clean: str) -> AsyncIterator[httpx.AsyncClient]:
    app = Starlette(
        routes=[Route("/users/{user_id}/charge", charge, methods=["POST"])],
        lifespan=lifespan(),
        exception_handlers=exception_handlers(),
    )
    async with asgi_client(app) as http:
        yield http


async def test_a_starlette_app_maps_real_errors_and_shares_the_session_database(
    client: httpx.AsyncClient, funded_user: object
) -> None:
    user = await funded_user(balance=50)  # type: ignore[operator]
    ok = await client.post(f"/users/{user.id}/charge", params={"amount": 20})
    assert ok.status_code == 200 and ok.json() == {"balance_after": 30}
    refused = await client.post(f"/users/{user.id}/charge", params={"amount": 31})
    assert refused.status_code == 402
    assert refused.json()["fields"] == {"user_id": str(user.id), "balance": 30, "requested": 31}
    assert await tokendb.get_balance(user=user) == 30  # nothing written by the refusal
    missing = await client.post(f"/users/{ID}/charge", params={"amount": 1})
    assert missing.status_code == 404 and missing.json()["error"] == "NotFound"


async def test_the_app_leaves_the_session_connection_open_at_shutdown(tokendb_clean: str) -> None:
    app = Starlette(lifespan=lifespan(), exception_handlers=exception_handlers())
    async with LifespanManager(app):
        assert app.state._tortoise_context is not None
    # tokendb_db initialised tokendb before the app started; the app did not close it.
    assert await tokendb.list_users() == []
