"""tokendb in a Starlette app: lifespan registration and HTTP errors.

::

    from starlette.applications import Starlette
    from tokendb.contrib.starlette import exception_handlers, lifespan

    app = Starlette(routes=[...], lifespan=lifespan(), exception_handlers=exception_handlers())

:class:`RegisterTokenDB` is Tortoise's ``RegisterTortoise`` configured for
tokendb (see :class:`~tokendb.contrib._registration.TokenDBRegistration`);
enter it in your own lifespan to combine it with other startup work.

Every :class:`~tokendb.TokenDBError` that escapes a route becomes a JSON
response ``{"error": "<class name>", "detail": "<message>", "fields": {...}}``
(:class:`~tokendb.contrib.schemas.ErrorOut`) with the status of
:data:`STATUS_CODES`: 401 invalid, revoked or expired key (with
``WWW-Authenticate: Bearer``), 403 missing permission, 402 insufficient
tokens, 404 not found, 409 conflicts, 422 validation, 503 database
unavailable (with ``Retry-After``). Anything else is a 500 whose body names
the error class only: its message may describe the deployment.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from pydantic_core import to_jsonable_python
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from tortoise.contrib.starlette import RegisterTortoise

from tokendb.contrib._registration import TokenDBRegistration, lifespan_for
from tokendb.contrib.schemas import ErrorOut
from tokendb.errors import (
    ChatSessionEnded,
    DatabaseUnavailable,
    EmailTaken,
    InsufficientTokens,
    InvalidApiKey,
    InvalidCredentials,
    NotFound,
    PermissionDenied,
    ReferenceConflict,
    RefundExceedsCharge,
    TokenDBError,
    ValidationError,
)

__all__ = [
    "STATUS_CODES",
    "RegisterTokenDB",
    "error_response",
    "exception_handlers",
    "lifespan",
    "status_code_for",
]

STATUS_CODES: tuple[tuple[type[TokenDBError], int], ...] = (
    (InvalidApiKey, 401),  # also ApiKeyRevoked and ApiKeyExpired
    (InvalidCredentials, 401),
    (PermissionDenied, 403),
    (InsufficientTokens, 402),
    (NotFound, 404),
    (EmailTaken, 409),
    (ReferenceConflict, 409),
    (RefundExceedsCharge, 409),
    (ChatSessionEnded, 409),
    (ValidationError, 422),
    (DatabaseUnavailable, 503),  # also DatabaseTimeout
)
"""The HTTP status of each error class; the first ``isinstance`` match wins, else 500."""


class RegisterTokenDB(TokenDBRegistration, RegisterTortoise):
    """``async with RegisterTokenDB(app, database_url=None, **init_options):`` in a lifespan.

    ``database_url`` and the options (``min_size``, ``max_size``,
    ``acquire_timeout``, ``statement_timeout``, ``lock_timeout``) are those
    of :func:`tokendb.init`; ``apps`` adds your own Tortoise apps
    (``{"myapp": {"models": ["myapp.models"]}}``) on tokendb's connection.
    """


def lifespan(
    database_url: str | None = None, **options: Any
) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    """A lifespan for ``Starlette(lifespan=...)`` that runs :class:`RegisterTokenDB`."""
    return lifespan_for(RegisterTokenDB, database_url, options)


def status_code_for(exc: TokenDBError) -> int:
    """The HTTP status for ``exc`` (see :data:`STATUS_CODES`)."""
    for error_class, status in STATUS_CODES:
        if isinstance(exc, error_class):
            return status
    return 500


def error_response(exc: TokenDBError) -> JSONResponse:
    """The JSON error response for ``exc``."""
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
    body = ErrorOut(error=type(exc).__name__, detail=detail, fields=to_jsonable_python(fields))
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


async def _handle(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TokenDBError)
    return error_response(exc)


def exception_handlers() -> dict[Any, Callable[[Request, Exception], Awaitable[Response]]]:
    """``{TokenDBError: handler}`` for ``Starlette(exception_handlers=...)`` (or FastAPI's)."""
    return {TokenDBError: _handle}
