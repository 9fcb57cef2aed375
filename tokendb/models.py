"""The six tables of tokendb as thin Tortoise models.

Models hold fields, ``Meta`` and ``__str__`` only; every operation lives in the
domain modules (:mod:`tokendb.users`, :mod:`tokendb.api_keys`,
:mod:`tokendb.ledger`, :mod:`tokendb.chats`). What the database enforces on top
of these declarations (CHECKs, DB defaults, the case-insensitive email index,
the idempotency index, access-path indexes) is written by hand in the Aerich
migrations under ``migrations/tokendb/``.

``repr()`` and ``str()`` never show ``password_hash`` or ``key_hash``, and
neither do pydantic schemas made from the models by Tortoise (``PydanticMeta``).
"""

from __future__ import annotations

from enum import StrEnum
from uuid import UUID

from tortoise import fields
from tortoise.models import Model

from tokendb.ids import new_id

__all__ = [
    "ApiKey",
    "ChatMessage",
    "ChatSession",
    "HoldStatus",
    "LimitPeriod",
    "MessageRole",
    "TokenHold",
    "TokenTransaction",
    "TransactionType",
    "User",
    "UserRole",
    "public_fields",
]


class UserRole(StrEnum):
    ADMIN = "admin"
    USER = "user"


class TransactionType(StrEnum):
    TOPUP = "topup"
    USAGE = "usage"
    REFUND = "refund"
    BONUS = "bonus"


class HoldStatus(StrEnum):
    ACTIVE = "active"
    CAPTURED = "captured"
    RELEASED = "released"
    EXPIRED = "expired"


class LimitPeriod(StrEnum):
    """The window of an API key's ``token_limit``: a UTC calendar day, a UTC calendar month,
    or the key's whole life."""

    DAY = "day"
    MONTH = "month"
    TOTAL = "total"


class MessageRole(StrEnum):
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"


class User(Model):
    id = fields.UUIDField(primary_key=True, default=new_id)
    email = fields.CharField(max_length=255, unique=True)
    password_hash = fields.CharField(max_length=255)
    name = fields.CharField(max_length=100)
    role = fields.CharEnumField(UserRole, max_length=5, default=UserRole.USER)
    # 0, like the database's default: a balance is only ever what the ledger
    # says (see tokendb.ledger), and a user without ledger rows has 0 tokens.
    token_balance = fields.IntField(default=0)
    # Σ amount of the user's active holds (expired ones not yet marked
    # included): kept by the database with every hold, never above the
    # balance. What can be spent is token_balance - held_tokens (tokendb.holds).
    held_tokens = fields.IntField(default=0)
    created_at = fields.DatetimeField(auto_now_add=True)
    updated_at = fields.DatetimeField(auto_now=True)

    api_keys: fields.ReverseRelation[ApiKey]
    transactions: fields.ReverseRelation[TokenTransaction]
    chat_sessions: fields.ReverseRelation[ChatSession]
    holds: fields.ReverseRelation[TokenHold]

    class Meta:
        table = "users"

    class PydanticMeta:
        # Schemas made with tortoise.contrib.pydantic.pydantic_model_creator
        # (an application's own API models) must not carry the hash.
        exclude = ("password_hash",)

    def __str__(self) -> str:
        return f"User({self.email}, {self.role}, balance={self.token_balance})"

    def __repr__(self) -> str:
        return f"<User id={self.id} email={self.email!r} role={self.role!s}>"


class ApiKey(Model):
    id = fields.UUIDField(primary_key=True, default=new_id)
    user: fields.ForeignKeyRelation[User] = fields.ForeignKeyField(
        "tokendb.User", related_name="api_keys", on_delete=fields.CASCADE
    )
    key_hash = fields.CharField(max_length=255, unique=True)
    key_prefix = fields.CharField(max_length=20)
    name = fields.CharField(max_length=100)
    permissions = fields.JSONField[list[str]](default=list)
    is_active = fields.BooleanField(default=True)
    last_used_at = fields.DatetimeField(null=True)
    expires_at = fields.DatetimeField(null=True)
    created_at = fields.DatetimeField(auto_now_add=True)
    # At most token_limit tokens of usage per limit_period (both NULL: no limit).
    token_limit = fields.BigIntField(null=True)
    limit_period = fields.CharEnumField(LimitPeriod, max_length=5, null=True)

    user_id: UUID

    class Meta:
        table = "api_keys"

    class PydanticMeta:
        exclude = ("key_hash",)

    def __str__(self) -> str:
        return f"ApiKey({self.key_prefix}…, {self.name})"

    def __repr__(self) -> str:
        return f"<ApiKey id={self.id} prefix={self.key_prefix!r} active={self.is_active}>"


class TokenTransaction(Model):
    id = fields.UUIDField(primary_key=True, default=new_id)
    user: fields.ForeignKeyRelation[User] = fields.ForeignKeyField(
        "tokendb.User", related_name="transactions", on_delete=fields.RESTRICT
    )
    amount = fields.IntField()
    type = fields.CharEnumField(TransactionType, max_length=6)
    description = fields.TextField(null=True)
    reference_id = fields.UUIDField(null=True)
    balance_after = fields.IntField()
    created_at = fields.DatetimeField(auto_now_add=True)
    # What a usage row (and a refund, its charge's) paid for: the key and the model.
    api_key: fields.ForeignKeyNullableRelation[ApiKey] = fields.ForeignKeyField(
        "tokendb.ApiKey", related_name="transactions", null=True, on_delete=fields.RESTRICT
    )
    model = fields.CharField(max_length=50, null=True)

    user_id: UUID
    api_key_id: UUID | None

    class Meta:
        table = "token_transactions"

    def __str__(self) -> str:
        return (
            f"TokenTransaction({self.type}, {self.amount:+d}, balance_after={self.balance_after})"
        )

    def __repr__(self) -> str:
        return (
            f"<TokenTransaction id={self.id} type={self.type!s} amount={self.amount} "
            f"balance_after={self.balance_after}>"
        )


class TokenHold(Model):
    """Tokens reserved for a completion whose cost is not known yet (:mod:`tokendb.holds`)."""

    id = fields.UUIDField(primary_key=True, default=new_id)
    user: fields.ForeignKeyRelation[User] = fields.ForeignKeyField(
        "tokendb.User", related_name="holds", on_delete=fields.RESTRICT
    )
    amount = fields.IntField()
    status = fields.CharEnumField(HoldStatus, max_length=8, default=HoldStatus.ACTIVE)
    reference_id = fields.UUIDField(null=True)
    description = fields.TextField(null=True)
    expires_at = fields.DatetimeField()
    created_at = fields.DatetimeField(auto_now_add=True)
    resolved_at = fields.DatetimeField(null=True)
    captured_amount = fields.IntField(null=True)
    captured_transaction: fields.ForeignKeyNullableRelation[TokenTransaction] = (
        fields.ForeignKeyField(
            "tokendb.TokenTransaction",
            related_name=False,
            null=True,
            on_delete=fields.RESTRICT,
        )
    )
    # What the held tokens are for: the key (counted against its limit) and the model.
    api_key: fields.ForeignKeyNullableRelation[ApiKey] = fields.ForeignKeyField(
        "tokendb.ApiKey", related_name=False, null=True, on_delete=fields.RESTRICT
    )
    model = fields.CharField(max_length=50, null=True)

    user_id: UUID
    captured_transaction_id: UUID | None
    api_key_id: UUID | None

    class Meta:
        table = "token_holds"

    def __str__(self) -> str:
        return f"TokenHold({self.status}, {self.amount}, expires_at={self.expires_at})"

    def __repr__(self) -> str:
        return (
            f"<TokenHold id={self.id} status={self.status!s} amount={self.amount} "
            f"expires_at={self.expires_at}>"
        )


class ChatSession(Model):
    id = fields.UUIDField(primary_key=True, default=new_id)
    user: fields.ForeignKeyRelation[User] = fields.ForeignKeyField(
        "tokendb.User", related_name="chat_sessions", on_delete=fields.CASCADE
    )
    api_key: fields.ForeignKeyRelation[ApiKey] = fields.ForeignKeyField(
        "tokendb.ApiKey", related_name="chat_sessions", on_delete=fields.RESTRICT
    )
    tokens_used = fields.IntField(default=0)
    model = fields.CharField(max_length=50)
    created_at = fields.DatetimeField(auto_now_add=True)
    ended_at = fields.DatetimeField(null=True)

    messages: fields.ReverseRelation[ChatMessage]
    user_id: UUID
    api_key_id: UUID

    class Meta:
        table = "chat_sessions"

    def __str__(self) -> str:
        return f"ChatSession({self.model}, tokens_used={self.tokens_used})"

    def __repr__(self) -> str:
        return f"<ChatSession id={self.id} model={self.model!r} tokens_used={self.tokens_used}>"


class ChatMessage(Model):
    id = fields.UUIDField(primary_key=True, default=new_id)
    session: fields.ForeignKeyRelation[ChatSession] = fields.ForeignKeyField(
        "tokendb.ChatSession", related_name="messages", on_delete=fields.CASCADE
    )
    role = fields.CharEnumField(MessageRole, max_length=9)
    content = fields.TextField()
    tokens = fields.IntField()
    # The session's tokens_used after this message: each message continues
    # the previous one's total, as balance_after does in the ledger.
    tokens_used_after = fields.IntField()
    created_at = fields.DatetimeField(auto_now_add=True)

    session_id: UUID

    class Meta:
        table = "chat_messages"

    def __str__(self) -> str:
        return f"ChatMessage({self.role}, tokens={self.tokens})"

    def __repr__(self) -> str:
        return f"<ChatMessage id={self.id} role={self.role!s} tokens={self.tokens}>"


def public_fields(model: type[Model]) -> list[str]:
    """``model``'s columns that may be shown: all but its ``PydanticMeta.exclude`` (the hashes).

    The one list of what stays secret, shared by pydantic schemas, the CLI and the tests.
    """
    secret = set(getattr(getattr(model, "PydanticMeta", None), "exclude", ()))
    return [name for name in model._meta.fields_db_projection if name not in secret]
