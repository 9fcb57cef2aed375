"""tokendb in a FastAPI app: lifespan registration, API-key auth, HTTP errors, schemas.

::

    from typing import Annotated
    from fastapi import Depends, FastAPI
    import tokendb
    from tokendb.contrib.fastapi import exception_handlers, lifespan, require_api_key

    app = FastAPI(lifespan=lifespan(), exception_handlers=exception_handlers())

    @app.get("/v1/balance")
    async def balance(key: Annotated[tokendb.ApiKey, Depends(require_api_key())]) -> int:
        return await tokendb.get_balance(user=key.user_id)

Errors map to HTTP as described in :mod:`tokendb.contrib.starlette`; output
schemas are in :mod:`tokendb.contrib.schemas`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from tortoise.contrib.fastapi import RegisterTortoise

import tokendb
from tokendb.contrib._registration import TokenDBRegistration, lifespan_for
from tokendb.contrib.starlette import error_response, exception_handlers, status_code_for
from tokendb.errors import InvalidApiKey
from tokendb.models import ApiKey

__all__ = [
    "RegisterTokenDB",
    "error_response",
    "exception_handlers",
    "lifespan",
    "require_api_key",
    "status_code_for",
]

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


def require_api_key(permission: str | None = None) -> Callable[..., Awaitable[ApiKey]]:
    """A dependency returning the verified :class:`~tokendb.ApiKey` of the request.

    Reads ``Authorization: Bearer sk_live_…`` and calls
    :func:`tokendb.verify_api_key` (with ``permission`` when given), so
    ``key.user`` is loaded. Raises :class:`~tokendb.InvalidApiKey` (also when
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
