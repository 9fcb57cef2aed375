"""tokendb.http: errors as HTTP responses and Bearer keys, without any web framework."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

import tokendb
from tests.test_starlette import CASES
from tokendb.http import bearer_secret, error_body, http_error, jsonable, verify_bearer


@pytest.mark.parametrize("exc, status", CASES, ids=lambda value: type(value).__name__)
def test_every_error_is_a_status_and_a_json_body(exc: tokendb.TokenDBError, status: int) -> None:
    error = http_error(exc)
    assert error.status == status
    encoded = json.dumps(error.body).encode("utf-8")  # plain json, no framework's encoder
    body = json.loads(encoded)
    assert set(body) == {"error", "detail", "fields"} and body["error"] == type(exc).__name__
    if status < 500:
        assert body["detail"] == str(exc)
    else:
        assert "db.internal" not in encoded.decode()
    assert (error.headers.get("WWW-Authenticate") == "Bearer") == (status == 401)
    assert ("Retry-After" in error.headers) == (status == 503)


def test_fields_hold_strings_for_uuids_and_datetimes() -> None:
    user_id = uuid.UUID("01900000-0000-7000-8000-000000000001")
    body = http_error(tokendb.InsufficientTokens(user_id, 5, 40)).body
    assert body["fields"] == {"user_id": str(user_id), "balance": 5, "requested": 40}
    expired = http_error(tokendb.ApiKeyExpired("sk_live_AbCd", datetime(2026, 1, 1, tzinfo=UTC)))
    assert expired.body["fields"]["expired_at"] == "2026-01-01T00:00:00Z"


def test_echoed_input_with_a_lone_surrogate_still_encodes() -> None:
    body = error_body("NotFound", "user not found: a\ud800b", {"key": "a\ud800b"})
    json.dumps(body, ensure_ascii=False).encode("utf-8")
    assert body["fields"]["key"] == "a?b"
    assert jsonable({"at": [datetime(2026, 1, 1, tzinfo=UTC)], 1: tokendb.UserRole.ADMIN}) == {
        "at": ["2026-01-01T00:00:00Z"],
        "1": "admin",
    }


def test_the_core_mapping_needs_no_web_framework() -> None:
    code = "import sys, tokendb.http\nassert not {'starlette', 'fastapi'} & set(sys.modules)\n"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(
    "header, secret",
    [
        ("Bearer sk_live_abc", "sk_live_abc"),
        ("bearer   sk_live_abc  ", "sk_live_abc"),
        ("BEARER sk_live_abc", "sk_live_abc"),
    ],
)
def test_bearer_secret_reads_the_scheme_case_insensitively(header: str, secret: str) -> None:
    assert bearer_secret(header) == secret


@pytest.mark.parametrize("header", [None, "", "   ", "Bearer", "Bearer   ", "Basic dXNlcjpwYXNz"])
def test_a_missing_or_foreign_authorization_is_an_invalid_api_key(header: str | None) -> None:
    with pytest.raises(tokendb.InvalidApiKey) as info:
        bearer_secret(header)
    assert http_error(info.value).status == 401


async def test_verify_bearer_verifies_the_key(make_api_key: Any) -> None:
    key, secret = await make_api_key(permissions=["chat"])
    verified = await verify_bearer(f"Bearer {secret}", permission="chat")
    assert verified.id == key.id and verified.user.id == key.user_id
    with pytest.raises(tokendb.PermissionDenied):
        await verify_bearer(f"Bearer {secret}", permission="billing")
    with pytest.raises(tokendb.InvalidApiKey):
        await verify_bearer(None)
