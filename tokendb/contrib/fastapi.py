"""tokendb in a FastAPI app: lifespan registration, API-key auth, HTTP errors, schemas.

::

    from typing import Annotated
    from fastapi import Depends, FastAPI
    import tokendb
    from tokendb.contrib.fastapi import (
        RequestSizeLimit, error_responses, exception_handlers, lifespan, require_api_key,
    )

    app = FastAPI(
        lifespan=lifespan(),
        exception_handlers=exception_handlers(),
        responses=error_responses(),
    )
    app.add_middleware(RequestSizeLimit)  # 413 past 1 MiB

    @app.get("/v1/balance")
    async def balance(key: Annotated[tokendb.ApiKey, Depends(require_api_key())]) -> int:
        return await tokendb.get_balance(user=key.user_id)

Every error response, tokendb's and FastAPI's own (validation, unknown route,
a body that is not UTF-8 JSON, too large), has one shape,
:class:`~tokendb.contrib.schemas.ErrorOut`; :func:`error_responses` declares
it in the OpenAPI of every route. Output schemas are in
:mod:`tokendb.contrib.schemas`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import Request
from starlette.responses import Response
from tortoise.contrib.fastapi import RegisterTortoise

import tokendb
from tokendb.contrib import starlette as _starlette
from tokendb.contrib._registration import TokenDBRegistration, lifespan_for
from tokendb.contrib.schemas import ErrorOut
from tokendb.contrib.starlette import (
    DEFAULT_MAX_REQUEST_SIZE,
    RequestSizeLimit,
    error_response,
    http_error_response,
    status_code_for,
)
from tokendb.errors import InvalidApiKey
from tokendb.models import ApiKey

__all__ = [
    "DEFAULT_MAX_REQUEST_SIZE",
    "ERROR_STATUSES",
    "RegisterTokenDB",
    "RequestSizeLimit",
    "error_response",
    "error_responses",
    "exception_handlers",
    "lifespan",
    "require_api_key",
    "status_code_for",
]

ERROR_STATUSES: dict[int, str] = {
    400: "The body is not UTF-8 JSON",
    401: "Missing, invalid, revoked or expired API key",
    402: "Not enough tokens",
    403: "The API key lacks the permission",
    404: "Not found (or not yours)",
    405: "Method not allowed",
    409: "Conflict: a reused reference, an ended chat, a refund beyond its charge",
    413: "The request body is too large",
    422: "Invalid request data",
    500: "Internal error",
    503: "The database is unavailable; retry later",
}
"""The error statuses a tokendb API answers, and what each means (for OpenAPI)."""

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="tokendb API key",
    description="A tokendb API key: `Authorization: Bearer sk_live_…`",
)


class RegisterTokenDB(TokenDBRegistration, RegisterTortoise):
    """``async with RegisterTokenDB(app, database_url=None, **init_options):`` in a lifespan.

    Takes the arguments of :class:`tokendb.contrib.starlette.RegisterTokenDB`.
    """


def lifespan(
    database_url: str | None = None, **options: Any
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """A lifespan for ``FastAPI(lifespan=...)`` that runs :class:`RegisterTokenDB`."""
    return lifespan_for(RegisterTokenDB, database_url, options)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``FastAPI(responses=error_responses())``: the error statuses, each an ``ErrorOut``.

    Given to the app, they are declared on every route (and replace FastAPI's
    own 422 schema, which :func:`exception_handlers` no longer answers with).
    ``statuses`` picks some of :data:`ERROR_STATUSES`; default all of them.
    """
    chosen = statuses or tuple(ERROR_STATUSES)
    return {
        status: {"model": ErrorOut, "description": ERROR_STATUSES.get(status, "Error")}
        for status in chosen
    }


def _location(loc: Any) -> str:
    return ".".join(str(part) for part in loc) if isinstance(loc, (list, tuple)) else str(loc)


async def _handle_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    # The offending input is not echoed back: it can be large, and it is the
    # client's own. Locations and messages say what is wrong.
    errors: list[dict[str, Any]] = [
        {"loc": [str(part) for part in error.get("loc", ())], "msg": str(error.get("msg", ""))}
        for error in exc.errors()
    ]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    field, reason = _location(first["loc"]), str(first["msg"])
    return http_error_response(
        422,
        f"{field}: {reason}" if field else reason,
        {"field": field, "reason": reason, "errors": errors},
        error="ValidationError",  # the name of tokendb's own 422
    )


def exception_handlers() -> dict[Any, _starlette.Handler]:
    """Handlers for ``FastAPI(exception_handlers=...)``: every error in tokendb's one shape.

    Those of :func:`tokendb.contrib.starlette.exception_handlers`, and
    FastAPI's request validation errors as 422 ``ValidationError`` with
    ``fields`` ``{"field", "reason", "errors"}`` (like tokendb's own).
    """
    return {**_starlette.exception_handlers(), RequestValidationError: _handle_validation_error}


def require_api_key(permission: str | None = None) -> Callable[..., Awaitable[ApiKey]]:
    """A dependency returning the verified :class:`~tokendb.ApiKey` of the request.

    Reads ``Authorization: Bearer sk_live_…`` and calls
    :func:`tokendb.verify_api_key` (with ``permission`` when given), so
    ``key.user`` is loaded, without its balance (use :func:`tokendb.get_balance`).
    Raises :class:`~tokendb.InvalidApiKey` (also when
    the header is missing), :class:`~tokendb.ApiKeyRevoked`,
    :class:`~tokendb.ApiKeyExpired` or :class:`~tokendb.PermissionDenied`,
    which :func:`exception_handlers` turn into 401 and 403.
    """

    async def verified_api_key(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> ApiKey:
        if credentials is None:
            raise InvalidApiKey("missing API key: send `Authorization: Bearer sk_live_…`")
        return await tokendb.verify_api_key(secret=credentials.credentials, permission=permission)

    return verified_api_key
