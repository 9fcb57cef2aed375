"""A minimal LLM gateway on tokendb: API-key auth, billed chat sessions, balance, ledger.

Run it (uses DATABASE_URL, else tokendb's embedded server)::

    uvicorn examples.gateway:app --port 8000

Every route needs ``Authorization: Bearer sk_live_…`` with the ``chat``
permission. Every error, tokendb's and FastAPI's own, is an ``ErrorOut``
(declared in the OpenAPI of every route); request bodies over 1 MiB are
refused with 413. The "model" is a stand-in that echoes; tokens are counted as
words. A prompt and its reply are two billed messages; when the balance
cannot pay for the reply, the request fails with 402 and only the prompt
(already processed) stays billed.

``…/stream`` streams the reply the way a gateway must when it cannot know the
cost in advance: it holds ``max_tokens`` first (402 before anything is
streamed if the balance cannot cover them), streams, then bills what the
reply used from the hold (``add_message(hold=…)``), and releases the hold if
anything fails or the client goes away. A process that dies mid-stream
leaves a hold that expires by itself after ``HOLD_TTL``.
"""

from collections.abc import AsyncIterator
from datetime import date, timedelta
from typing import Annotated, Literal
from uuid import UUID

from fastapi import Depends, FastAPI, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

import tokendb
from tokendb.contrib.fastapi import (
    RequestSizeLimit,
    error_responses,
    exception_handlers,
    lifespan,
    require_api_key,
)
from tokendb.contrib.schemas import (
    AvailableBalanceOut,
    ChatMessageOut,
    ChatSessionOut,
    TransactionOut,
    UsageRowOut,
)
from tokendb.usage import GROUPINGS

app = FastAPI(
    title="tokendb gateway example",
    lifespan=lifespan(),
    exception_handlers=exception_handlers(),
    responses=error_responses(),
)
app.add_middleware(RequestSizeLimit, max_bytes=1024 * 1024)

ChatKey = Annotated[tokendb.ApiKey, Depends(require_api_key("chat"))]


# The request schemas say all that the handlers refuse, so a client (or
# schemathesis) that follows the OpenAPI document is never told 422.
class NewSession(BaseModel):
    model: str = Field(default="echo-1", pattern=r"^[A-Za-z0-9._:/-]{1,50}$")


class NewMessage(BaseModel):
    content: str = Field(min_length=1, max_length=10_000, pattern=r"^[^\x00]*$")


class StreamedMessage(NewMessage):
    max_tokens: int = Field(default=256, ge=1, le=4096)


HOLD_TTL = timedelta(minutes=5)
"""How long a stream may take; a hold nobody resolved is free again after it."""


class Exchange(BaseModel):
    prompt: ChatMessageOut
    reply: ChatMessageOut
    balance: int


def count_tokens(text: str) -> int:
    """A stand-in tokenizer: one token per word."""
    return max(1, len(text.split()))


def generate(prompt: str) -> str:
    """A stand-in model."""
    return f"You said: {prompt}"


@app.post("/v1/chat/sessions", status_code=201)
async def create_session(body: NewSession, key: ChatKey) -> ChatSessionOut:
    session = await tokendb.start_chat(api_key=key, model=body.model, user=key.user_id)
    return ChatSessionOut.model_validate(session)


@app.post("/v1/chat/sessions/{session_id}/messages")
async def send_message(session_id: UUID, body: NewMessage, key: ChatKey) -> Exchange:
    prompt = await tokendb.add_message(
        session=session_id,
        role="user",
        content=body.content,
        tokens=count_tokens(body.content),
        user=key.user_id,
    )
    answer = generate(body.content)
    reply = await tokendb.add_message(
        session=session_id,
        role="assistant",
        content=answer,
        tokens=count_tokens(answer),
        user=key.user_id,
    )
    return Exchange(
        prompt=ChatMessageOut.model_validate(prompt),
        reply=ChatMessageOut.model_validate(reply),
        balance=await tokendb.get_balance(user=key.user_id),
    )


@app.post(
    "/v1/chat/sessions/{session_id}/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def stream_message(
    session_id: UUID, body: StreamedMessage, key: ChatKey
) -> StreamingResponse:
    """Bill the prompt, hold ``max_tokens``, stream the reply, bill what it used from the hold."""
    await tokendb.add_message(
        session=session_id,
        role="user",
        content=body.content,
        tokens=count_tokens(body.content),
        user=key.user_id,
    )
    held = await tokendb.hold(user=key.user_id, amount=body.max_tokens, ttl=HOLD_TTL)

    async def reply() -> AsyncIterator[str]:
        words: list[str] = []
        try:
            for word in generate(body.content).split()[: body.max_tokens]:
                words.append(word)
                yield word + " "
            await tokendb.add_message(
                session=session_id,
                role="assistant",
                content=" ".join(words),
                tokens=len(words),
                user=key.user_id,
                hold=held,
            )
        except BaseException:  # an error, or the client went away: give the tokens back
            await tokendb.release(hold=held)
            raise

    return StreamingResponse(reply(), media_type="text/plain")


@app.get("/v1/balance")
async def balance(key: ChatKey) -> AvailableBalanceOut:
    return AvailableBalanceOut(
        user_id=key.user_id,
        balance=await tokendb.get_balance(user=key.user_id),
        available=await tokendb.get_available_balance(user=key.user_id),
    )


@app.get("/v1/usage")
async def usage(
    key: ChatKey,
    since: date,
    until: date,
    group_by: Annotated[list[Literal["day", "model", "api_key"]] | None, Query()] = None,
) -> list[UsageRowOut]:
    """The caller's usage from ``since`` to ``until`` (UTC days, ``until`` exclusive),
    per ``group_by`` (default: day, model and API key); tokens net of refunds. A
    range that ends before it starts has no usage."""
    if since > until:
        return []
    rows = await tokendb.usage_report(
        user=key.user_id,
        since=since,
        until=until,
        group_by=tuple(dict.fromkeys(group_by)) if group_by is not None else GROUPINGS,
    )
    return [UsageRowOut.model_validate(row) for row in rows]


@app.get("/v1/transactions")
async def transactions(
    key: ChatKey,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    before: UUID | None = None,
) -> list[TransactionOut]:
    """The caller's ledger, newest first; ``before`` is the last id of the previous page."""
    rows = await tokendb.list_transactions(user=key.user_id, limit=limit, before=before)
    return [TransactionOut.model_validate(row) for row in rows]
