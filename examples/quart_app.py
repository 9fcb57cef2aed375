"""tokendb in Quart: initialised in Quart's serving hooks, tokendb's errors as JSON.

    QUART_APP=examples.quart_app:app quart run

Quart runs ``before_serving`` in a task of its own, so Tortoise's
``register_tortoise`` (plain ``Tortoise.init``) leaves its context invisible
to request tasks. :func:`tokendb.init` makes its context visible to every
task: call it (with ``apps=`` for your own models) in ``before_serving``, and
:func:`tokendb.close` in ``after_serving``, instead of ``register_tortoise``.
"""

import os
from typing import Any

from quart import Quart, request

import tokendb
from tokendb.http import http_error, verify_bearer

app = Quart(__name__)


@app.before_serving
async def open_tokendb() -> None:
    await tokendb.init(os.environ.get("DATABASE_URL"))


@app.after_serving
async def close_tokendb() -> None:
    await tokendb.close()


@app.errorhandler(tokendb.TokenDBError)
async def tokendb_error(exc: tokendb.TokenDBError) -> Any:
    error = http_error(exc)
    return error.body, error.status, error.headers


@app.post("/v1/charge")
async def charge() -> Any:
    key = await verify_bearer(request.headers.get("Authorization"), permission="chat")
    body = await request.get_json()
    row = await tokendb.charge(
        user=key.user_id, amount=body["tokens"], reference_id=body.get("reference_id")
    )
    return {"balance_after": row.balance_after}


@app.get("/v1/balance")
async def balance() -> Any:
    key = await verify_bearer(request.headers.get("Authorization"), permission="chat")
    return {"balance": await tokendb.get_balance(user=key.user_id)}
