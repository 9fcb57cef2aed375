"""tokendb over HTTP, for any framework: errors as status + JSON body, and Bearer keys.

Nothing here imports a web framework; the FastAPI and Starlette integrations
(:mod:`tokendb.contrib`) build on it, and so can an aiohttp, Sanic or Quart
app::

    try:
        key = await verify_bearer(request.headers.get("Authorization"), permission="chat")
        ...
    except tokendb.TokenDBError as exc:
        error = http_error(exc)
        return json_response(error.body, status=error.status, headers=error.headers)

Every error has one shape, ``{"error": "<class name>", "detail": "<message>",
"fields": {...}}``, with the status of :data:`STATUS_CODES`: 401 invalid,
revoked or expired key (with ``WWW-Authenticate: Bearer``), 403 missing
permission, 402 insufficient tokens, 404 not found, 409 conflicts, 422
validation, 429 an API key past its token limit, 503 database unavailable
(with ``Retry-After``). Anything else is a 500 whose body names the error
class only: its message may describe the deployment.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from tokendb.api_keys import verify_api_key
from tokendb.errors import (
    ChatSessionEnded,
    DatabaseUnavailable,
    EmailTaken,
    HoldNotActive,
    InsufficientTokens,
    InvalidApiKey,
    InvalidCredentials,
    KeyLimitExceeded,
    NotFound,
    PermissionDenied,
    ReferenceConflict,
    RefundExceedsCharge,
    TokenDBError,
    ValidationError,
)

if TYPE_CHECKING:
    from tokendb.models import ApiKey

__all__ = [
    "STATUS_CODES",
    "HttpError",
    "bearer_secret",
    "error_body",
    "http_error",
    "jsonable",
    "status_code_for",
    "verify_bearer",
]

STATUS_CODES: tuple[tuple[type[TokenDBError], int], ...] = (
    (InvalidApiKey, 401),  # also ApiKeyRevoked and ApiKeyExpired
    (InvalidCredentials, 401),
    (PermissionDenied, 403),
    (InsufficientTokens, 402),
    (KeyLimitExceeded, 429),  # the user can pay, this key may not spend more now
    (NotFound, 404),
    (EmailTaken, 409),
    (ReferenceConflict, 409),
    (RefundExceedsCharge, 409),
    (ChatSessionEnded, 409),
    (HoldNotActive, 409),  # also HoldExpired
    (ValidationError, 422),  # also CaptureExceedsHold
    (DatabaseUnavailable, 503),  # also DatabaseTimeout
)
"""The HTTP status of each error class; the first ``isinstance`` match wins, else 500."""


@dataclass(frozen=True)
class HttpError:
    """An error as an HTTP response: ``status``, a JSON-safe ``body`` and ``headers``."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def status_code_for(exc: TokenDBError) -> int:
    """The HTTP status for ``exc`` (see :data:`STATUS_CODES`)."""
    for error_class, status in STATUS_CODES:
        if isinstance(exc, error_class):
            return status
    return 500


def http_error(exc: TokenDBError) -> HttpError:
    """``exc`` as an HTTP response: its status, body and headers.

    The body is plain JSON data (UUIDs and datetimes as strings): ``json.dumps``
    takes it as it is, and it encodes to UTF-8.
    """
    status = status_code_for(exc)
    fields = {key: value for key, value in vars(exc).items() if not key.startswith("_")}
    detail = str(exc)
    if status == 500:
        fields, detail = {}, "internal error"
    elif status == 503:
        detail = "the database is unavailable; retry later"
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    elif status == 503:
        headers["Retry-After"] = "1"
    return HttpError(status, error_body(type(exc).__name__, detail, fields), headers)


def error_body(error: str, detail: str, fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """The one error shape, ``{"error", "detail", "fields"}``, as JSON-safe data.

    For errors that are not tokendb's (a framework's validation error, a 404
    route) in the same shape.
    """
    return {"error": error, "detail": jsonable(detail), "fields": jsonable(fields or {})}


def jsonable(value: Any) -> Any:
    """``value`` as data ``json.dumps`` accepts and that encodes to UTF-8.

    UUIDs, datetimes and enums become strings; a string with a lone surrogate
    (from a ``\\ud800`` escape in a request) has it replaced, so echoing input
    back never fails.
    """
    if isinstance(value, dict):
        return {str(jsonable(key)): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(item) for item in value]
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, (date, UUID)):
        return str(value) if isinstance(value, UUID) else value.isoformat()
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return jsonable(str(value))


_SCHEME = "bearer"


def bearer_secret(authorization: str | None) -> str:
    """The secret of an ``Authorization: Bearer sk_live_…`` header value.

    The scheme is matched case-insensitively (RFC 9110). Raises
    :class:`InvalidApiKey` when the header is missing, another scheme, or empty.
    """
    if authorization is None or not authorization.strip():
        raise InvalidApiKey("missing API key: send `Authorization: Bearer sk_live_…`")
    scheme, _, secret = authorization.strip().partition(" ")
    if scheme.lower() != _SCHEME or not secret.strip():
        raise InvalidApiKey("expected `Authorization: Bearer sk_live_…`")
    return secret.strip()


async def verify_bearer(authorization: str | None, *, permission: str | None = None) -> ApiKey:
    """Verify the API key of an ``Authorization`` header value; return the :class:`ApiKey`.

    :func:`bearer_secret` then :func:`tokendb.verify_api_key` (``key.user`` is
    loaded). Raises what they raise: :class:`InvalidApiKey` (also for a missing
    header), :class:`~tokendb.ApiKeyRevoked`, :class:`~tokendb.ApiKeyExpired`,
    :class:`~tokendb.PermissionDenied`.
    """
    return await verify_api_key(secret=bearer_secret(authorization), permission=permission)
