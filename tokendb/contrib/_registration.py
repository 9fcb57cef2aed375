"""What the FastAPI and Starlette registrations share: tokendb's side of ``RegisterTortoise``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from tokendb import connection, embedded
from tokendb.errors import ConfigurationError


class TokenDBRegistration:
    """Mixed into a framework's ``RegisterTortoise``: tokendb's config, checks and ownership.

    * The Tortoise config comes from :func:`tokendb.connection.init_config`
      (``database_url``, else ``DATABASE_URL``, else the embedded server),
      with tokendb's pool size and timeouts; ``apps`` adds the application's
      own Tortoise apps on the same connection.
    * The pool is checked at startup, so a wrong URL fails the lifespan.
    * At shutdown it lets go of the embedded server, if it used one
      (:func:`tokendb.embedded.release`).
    * If tokendb is already initialised when the app starts (the pytest
      plugin's ``tokendb_db``, or a script that called :func:`tokendb.init`),
      the app uses that connection and leaves it open at shutdown: Tortoise
      allows one global context per process, and it belongs to whoever made it.
    """

    app: Any
    config: Any

    def __init__(
        self,
        app: Any = None,
        database_url: str | None = None,
        *,
        apps: Mapping[str, Mapping[str, Any]] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(app)  # type: ignore[call-arg]
        self._tokendb_url = database_url
        self._tokendb_apps = dict(apps or {})
        self._tokendb_options = dict(options)
        self._tokendb_owner = False

    async def init_orm(self) -> Any:
        from tortoise.context import get_current_context

        if connection.is_initialised():
            context = get_current_context()
            registered = set(context.apps.keys()) if context is not None and context.apps else set()
            missing = sorted(set(self._tokendb_apps) - registered)
            if missing:
                # Tortoise has one global context per process and it is not ours
                # to re-initialise: the app's models would silently go unregistered.
                raise ConfigurationError(
                    "tokendb is already initialised in this process (tokendb.init() or the "
                    f"tokendb_db fixture) without the apps {missing}: initialise once with "
                    "them (tokendb.init(apps=...)); under the pytest plugin, override the "
                    "tokendb_apps fixture to return them"
                )
            if self.app is not None:
                self.app.state._tortoise_context = context
            return context
        config = await connection.init_config(
            self._tokendb_url, apps=self._tokendb_apps, **self._tokendb_options
        )
        self.config = config
        context = await super().init_orm()  # type: ignore[misc]
        self._tokendb_owner = True
        await connection.check_connection()
        return context

    async def close_orm(self) -> None:
        if self._tokendb_owner:
            await super().close_orm()  # type: ignore[misc]
            self._tokendb_owner = False
            # uvicorn exits a SIGTERM'd server by re-raising the signal, which
            # skips atexit: let go of an embedded server now.
            await asyncio.to_thread(embedded.release)


def lifespan_for(
    registration: Callable[..., AbstractAsyncContextManager[Any]],
    database_url: str | None,
    options: Mapping[str, Any],
) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """A lifespan function entering ``registration(app, database_url, **options)``."""

    @asynccontextmanager
    async def tokendb_lifespan(app: Any) -> AsyncIterator[None]:
        async with registration(app, database_url, **options):
            yield

    return tokendb_lifespan
