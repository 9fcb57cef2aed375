"""tokendb in aiohttp: Tortoise registered the aiohttp way, tokendb's errors as JSON.

    python -m aiohttp.web -P 8000 examples.aiohttp_app:create_app

``register_tortoise`` gets :func:`tokendb.tortoise_orm`'s config, so the
pool is sized and tokendb's timeouts and transaction guard apply (add your
own apps with ``apps=``). A middleware turns every ``TokenDBError`` into
tokendb's one error shape (:func:`tokendb.http.http_error`).
"""

from typing import Any

from aiohttp import web
from tortoise.contrib.aiohttp import register_tortoise

import tokendb
from tokendb.http import http_error, verify_bearer


@web.middleware
async def tokendb_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except tokendb.TokenDBError as exc:
        error = http_error(exc)
        return web.json_response(error.body, status=error.status, headers=error.headers)
    return response


async def charge(request: web.Request) -> web.Response:
    key = await verify_bearer(request.headers.get("Authorization"), permission="chat")
    body = await request.json()
    row = await tokendb.charge(
        user=key.user_id, amount=body["tokens"], reference_id=body.get("reference_id")
    )
    return web.json_response({"balance_after": row.balance_after})


async def balance(request: web.Request) -> web.Response:
    key = await verify_bearer(request.headers.get("Authorization"), permission="chat")
    return web.json_response({"balance": await tokendb.get_balance(user=key.user_id)})


def create_app(argv: Any = None, database_url: str | None = None) -> web.Application:
    app = web.Application(middlewares=[tokendb_errors])
    app.add_routes([web.post("/v1/charge", charge), web.get("/v1/balance", balance)])
    register_tortoise(app, config=tokendb.tortoise_orm(database_url))
    return app
