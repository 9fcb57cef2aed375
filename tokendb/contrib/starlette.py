"""tokendb in a Starlette app: lifespan registration, HTTP errors, a request size limit.

::

    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from tokendb.contrib.starlette import RequestSizeLimit, exception_handlers, lifespan

    app = Starlette(
        routes=[...],
        lifespan=lifespan(),
        exception_handlers=exception_handlers(),
        middleware=[Middleware(RequestSizeLimit)],
    )

:class:`RegisterTokenDB` is Tortoise's ``RegisterTortoise`` configured for
tokendb (see :class:`~tokendb.contrib._registration.TokenDBRegistration`);
enter it in your own lifespan to combine it with other startup work.

Every error response has one shape, ``{"error", "detail", "fields"}``
(:class:`~tokendb.contrib.schemas.ErrorOut`): a :class:`~tokendb.TokenDBError`
gets the status of :data:`tokendb.http.STATUS_CODES`, Starlette's own HTTP
errors (404 route, 405, 413) keep theirs, and anything else is a 500 naming
no detail.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from http import HTTPStatus
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tortoise.contrib.starlette import RegisterTortoise

from tokendb.contrib._registration import TokenDBRegistration, lifespan_for
from tokendb.errors import TokenDBError
from tokendb.http import STATUS_CODES, error_body, http_error, status_code_for

__all__ = [
    "DEFAULT_MAX_REQUEST_SIZE",
    "STATUS_CODES",
    "RegisterTokenDB",
    "RequestSizeLimit",
    "error_response",
    "exception_handlers",
    "http_error_response",
    "lifespan",
    "status_code_for",
]

DEFAULT_MAX_REQUEST_SIZE = 1024 * 1024
"""Bytes of request body :class:`RequestSizeLimit` accepts by default (1 MiB)."""

_ERROR_NAMES = {413: "RequestTooLarge"}
"""Names of HTTP statuses whose phrase changed between Python versions."""


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


def _json(body: dict[str, Any], status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(exc: TokenDBError) -> JSONResponse:
    """The JSON error response for ``exc`` (:func:`tokendb.http.http_error`)."""
    error = http_error(exc)
    return _json(error.body, error.status, error.headers)


def error_name(status: int) -> str:
    """``NotFound`` for 404: the status phrase in CamelCase, the ``error`` of an HTTP error."""
    if status in _ERROR_NAMES:
        return _ERROR_NAMES[status]
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "HTTPError"
    return "".join(word.capitalize() for word in phrase.replace("-", " ").split())


def http_error_response(
    status: int,
    detail: str,
    fields: dict[str, Any] | None = None,
    headers: Any = None,
    *,
    error: str | None = None,
) -> JSONResponse:
    """An error response in tokendb's shape for an error that is not a ``TokenDBError``.

    ``error`` defaults to the status's name (:func:`error_name`).
    """
    body = error_body(error or error_name(status), detail, fields)
    return _json(body, status, dict(headers or {}))


async def _handle_tokendb_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TokenDBError)
    return error_response(exc)


async def _handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code < 400:  # not an error: e.g. a 304 raised as an exception
        return Response(status_code=exc.status_code, headers=exc.headers)
    return http_error_response(exc.status_code, str(exc.detail), headers=exc.headers)


async def _handle_unexpected(request: Request, exc: Exception) -> Response:
    # Starlette still logs the exception and re-raises it to the server.
    return http_error_response(500, "internal error")


Handler = Callable[[Request, Any], Coroutine[Any, Any, Response]]
"""An exception handler, typed so that FastAPI's ``exception_handlers=`` accepts it too."""


def exception_handlers() -> dict[Any, Handler]:
    """Handlers for ``Starlette(exception_handlers=...)``: every error in tokendb's one shape.

    ``TokenDBError`` by :data:`~tokendb.http.STATUS_CODES`, Starlette's
    ``HTTPException`` (404, 405, 413 …) with its own status and headers, and
    any other exception as a bare 500.
    """
    return {
        TokenDBError: _handle_tokendb_error,
        HTTPException: _handle_http_exception,
        Exception: _handle_unexpected,
    }


class RequestSizeLimit:
    """ASGI middleware: a request body over ``max_bytes`` is refused with 413.

    A ``Content-Length`` over the limit is answered before anything is read;
    a body streamed without one is counted as it is received, and the read
    that passes the limit raises ``HTTPException(413)`` into the app (its
    exception handlers answer it). Nothing of such a request reaches a route.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_REQUEST_SIZE) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a whole number of bytes >= 0, got {max_bytes!r}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._too_large()(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._detail())
            return message

        await self.app(scope, limited_receive, send)

    def _detail(self) -> str:
        return f"the request body exceeds {self.max_bytes} bytes"

    def _too_large(self) -> JSONResponse:
        response = http_error_response(413, self._detail())
        response.headers["Connection"] = "close"  # the unread body is not drained
        return response


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
