"""Pydantic output schemas of tokendb's models, for HTTP APIs.

Allow-lists: each schema names the fields it exposes, so ``password_hash``
and ``key_hash`` can never leak through a response, whatever columns the
models grow. Build them from model instances with
``UserOut.model_validate(user)`` (``from_attributes`` is on).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from tokendb._args import INT4_MAX
from tokendb.holds import MAX_DESCRIPTION_LENGTH, MAX_HOLD_TTL
from tokendb.models import HoldStatus, LimitPeriod, MessageRole, TransactionType, UserRole

__all__ = [
    "ApiKeyOut",
    "AvailableBalanceOut",
    "BalanceOut",
    "ChatMessageOut",
    "ChatSessionOut",
    "ErrorOut",
    "HoldIn",
    "HoldOut",
    "IssuedApiKeyOut",
    "TransactionOut",
    "UsageRowOut",
    "UserOut",
]


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class UserOut(_Out):
    id: UUID
    email: str
    name: str
    role: UserRole
    token_balance: int
    held_tokens: int
    """Tokens of active holds (expired ones nothing marked yet included)."""
    created_at: datetime
    updated_at: datetime


class ApiKeyOut(_Out):
    id: UUID
    user_id: UUID
    key_prefix: str
    """The first 12 characters of the secret, for display (``sk_live_AbCd``)."""
    name: str
    permissions: list[str]
    is_active: bool
    last_used_at: datetime | None
    expires_at: datetime | None
    created_at: datetime
    token_limit: int | None = None
    """At most this many tokens of usage per ``limit_period`` (None: no limit)."""
    limit_period: LimitPeriod | None = None


class IssuedApiKeyOut(ApiKeyOut):
    """A key just issued: the only response that ever carries ``secret``."""

    secret: str


class TransactionOut(_Out):
    id: UUID
    user_id: UUID
    amount: int
    """Positive for credits (``topup``, ``bonus``, ``refund``), negative for ``usage``."""
    type: TransactionType
    description: str | None
    reference_id: UUID | None
    balance_after: int
    created_at: datetime
    api_key_id: UUID | None = None
    """The API key a usage row (or a refund, its charge's) paid through."""
    model: str | None = None


class ChatSessionOut(_Out):
    id: UUID
    user_id: UUID
    api_key_id: UUID
    model: str
    tokens_used: int
    created_at: datetime
    ended_at: datetime | None


class ChatMessageOut(_Out):
    id: UUID
    session_id: UUID
    role: MessageRole
    content: str
    tokens: int
    tokens_used_after: int
    created_at: datetime


class HoldOut(_Out):
    """A token hold (:func:`tokendb.hold`)."""

    id: UUID
    user_id: UUID
    amount: int
    status: HoldStatus
    reference_id: UUID | None
    description: str | None
    expires_at: datetime
    created_at: datetime
    resolved_at: datetime | None
    captured_amount: int | None
    captured_transaction_id: UUID | None
    api_key_id: UUID | None = None
    """The API key the tokens are held for (counted against its limit)."""
    model: str | None = None


class HoldIn(BaseModel):
    """A request to hold tokens: the keyword arguments of :func:`tokendb.hold` but the user."""

    amount: int = Field(gt=0, le=INT4_MAX)
    ttl: float = Field(
        gt=0, le=MAX_HOLD_TTL.total_seconds(), description="Seconds, at most 24 hours."
    )
    reference_id: UUID | None = None
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION_LENGTH)


class UsageRowOut(_Out):
    """One group of :func:`tokendb.usage_report`: a field not grouped by is ``null``."""

    day: date | None
    api_key_id: UUID | None
    model: str | None
    tokens: int
    """Tokens used, net of refunds."""
    requests: int


class BalanceOut(BaseModel):
    user_id: UUID
    balance: int


class AvailableBalanceOut(BalanceOut):
    available: int
    """The balance minus active holds (:func:`tokendb.get_available_balance`)."""


class ErrorOut(BaseModel):
    """The body of every error response: the error's class name, its message and its fields."""

    error: str
    """The :class:`~tokendb.TokenDBError` subclass, e.g. ``InsufficientTokens``."""
    detail: str
    fields: dict[str, Any]
    """The error's attributes, e.g. ``{"balance": 5, "requested": 40, ...}``."""
