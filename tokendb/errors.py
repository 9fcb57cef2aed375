"""The one exception tree of tokendb.

Every error a public function raises is a :class:`TokenDBError`. Leaves are
named for the condition and carry its facts as attributes, so callers branch
on types and read fields instead of parsing messages::

    try:
        await tokendb.charge(user=user_id, amount=500)
    except tokendb.InsufficientTokens as exc:
        return payment_required(balance=exc.balance, requested=exc.requested)

Driver and ORM errors never escape: they are translated into these classes
with ``raise ... from exc`` so the original stays in ``__cause__``.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from tokendb.models import LimitPeriod

__all__ = [
    "ApiKeyExpired",
    "ApiKeyRevoked",
    "CaptureExceedsHold",
    "ChatSessionEnded",
    "ConfigurationError",
    "ConfigurationWarning",
    "DatabaseError",
    "DatabaseTimeout",
    "DatabaseUnavailable",
    "EmailTaken",
    "HoldExpired",
    "HoldNotActive",
    "InsufficientTokens",
    "InvalidApiKey",
    "InvalidCredentials",
    "KeyLimitExceeded",
    "NotFound",
    "PermissionDenied",
    "ReferenceConflict",
    "RefundExceedsCharge",
    "TokenDBError",
    "ValidationError",
]


class TokenDBError(Exception):
    """Root of every error tokendb raises."""


class ConfigurationError(TokenDBError):
    """tokendb is not configured, or configured wrongly (e.g. a bad ``DATABASE_URL``).

    ``variable`` names the setting at fault when there is one.
    """

    def __init__(self, message: str, *, variable: str | None = None) -> None:
        super().__init__(message)
        self.variable = variable


class ConfigurationWarning(UserWarning):
    """tokendb runs, but not as configured: e.g. a connection without tokendb's timeouts.

    Emitted once per connection client, on tokendb's first statement through it.
    """


class DatabaseError(TokenDBError):
    """The database refused or failed a statement in a way no more specific error names.

    ``sqlstate`` is PostgreSQL's error code and ``constraint`` the constraint
    that fired, when there is one (a database backstop caught something the
    Python checks did not).
    """

    def __init__(
        self, message: str, *, sqlstate: str | None = None, constraint: str | None = None
    ) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.constraint = constraint


class DatabaseUnavailable(DatabaseError):
    """The database could not be reached, or the connection died mid-call.

    ``outcome_unknown`` is True when the connection was lost after a write was
    sent (e.g. during COMMIT): the change may or may not have been committed.
    Calls made with a ``reference_id`` can be retried safely; that is what
    idempotency is for.
    """

    def __init__(
        self, message: str, *, outcome_unknown: bool = False, sqlstate: str | None = None
    ) -> None:
        super().__init__(message, sqlstate=sqlstate)
        self.outcome_unknown = outcome_unknown


class DatabaseTimeout(DatabaseUnavailable):
    """A bounded wait ran out: for a pooled connection, a lock, or a statement.

    The statement was cancelled and rolled back, so nothing was written
    (``outcome_unknown`` is False) unless the deadline hit during COMMIT.
    """


class ValidationError(TokenDBError, ValueError):
    """An argument was rejected before anything was written."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NotFound(TokenDBError, LookupError):
    """The user, API key, transaction or chat session does not exist (or is not yours)."""

    def __init__(self, entity: str, key: object) -> None:
        super().__init__(f"{entity} not found: {key}")
        self.entity = entity
        self.key = key


class EmailTaken(TokenDBError):
    """Another user already has this email address (compared case-insensitively)."""

    def __init__(self, email: str) -> None:
        super().__init__(f"email already registered: {email}")
        self.email = email


class InvalidCredentials(TokenDBError):
    """Unknown email or wrong password; deliberately does not say which."""

    def __init__(self) -> None:
        super().__init__("invalid email or password")


class InvalidApiKey(TokenDBError):
    """The API key is malformed or unknown. Subclasses name why a known key is refused."""

    def __init__(self, message: str = "invalid API key") -> None:
        super().__init__(message)


class ApiKeyRevoked(InvalidApiKey):
    """The API key was revoked."""

    def __init__(self, key_prefix: str) -> None:
        super().__init__(f"API key {key_prefix}… was revoked")
        self.key_prefix = key_prefix


class ApiKeyExpired(InvalidApiKey):
    """The API key expired at ``expired_at``."""

    def __init__(self, key_prefix: str, expired_at: datetime) -> None:
        super().__init__(f"API key {key_prefix}… expired at {expired_at.isoformat()}")
        self.key_prefix = key_prefix
        self.expired_at = expired_at


class PermissionDenied(TokenDBError):
    """The API key is valid but lacks ``permission``."""

    def __init__(self, permission: str, key_prefix: str | None = None) -> None:
        super().__init__(f"API key lacks permission {permission!r}")
        self.permission = permission
        self.key_prefix = key_prefix


class InsufficientTokens(TokenDBError):
    """A debit (or hold) of ``requested`` tokens was refused: ``balance`` is what the
    user could spend, the booked balance minus active holds."""

    def __init__(self, user_id: UUID, balance: int, requested: int) -> None:
        super().__init__(f"user {user_id} has {balance} tokens, {requested} requested")
        self.user_id = user_id
        self.balance = balance
        self.requested = requested


class KeyLimitExceeded(TokenDBError):
    """A usage movement of ``requested`` tokens through API key ``api_key_id`` was refused:
    the key may use ``limit`` tokens per ``period`` and has ``used`` of them.

    ``used`` is the key's usage in the current window (net of refunds: a UTC
    day, a UTC month, or its whole life for ``total``) plus its active
    holds. Nothing was written. Not an :class:`InsufficientTokens`: the
    user may have tokens, this key may not spend them (HTTP 429).
    """

    def __init__(
        self, api_key_id: UUID, *, limit: int, used: int, requested: int, period: LimitPeriod
    ) -> None:
        super().__init__(
            f"API key {api_key_id} has used {used} of its {limit} tokens per "
            f"{period.value}, {requested} requested"
        )
        self.api_key_id = api_key_id
        self.limit = limit
        self.used = used
        self.requested = requested
        self.period = period


class ReferenceConflict(TokenDBError):
    """``reference_id`` was already used for this user and type with a different amount."""

    def __init__(self, reference_id: UUID, *, existing_amount: int, requested_amount: int) -> None:
        super().__init__(
            f"reference {reference_id} already used with amount {existing_amount}, "
            f"not {requested_amount}"
        )
        self.reference_id = reference_id
        self.existing_amount = existing_amount
        self.requested_amount = requested_amount


class RefundExceedsCharge(TokenDBError):
    """Refunding ``requested`` tokens would exceed what is left of the charge."""

    def __init__(self, transaction_id: UUID, refundable: int, requested: int) -> None:
        if refundable == 0:
            message = f"transaction {transaction_id} is already fully refunded"
        else:
            message = (
                f"transaction {transaction_id} has {refundable} refundable tokens, "
                f"{requested} requested"
            )
        super().__init__(message)
        self.transaction_id = transaction_id
        self.refundable = refundable
        self.requested = requested


class ChatSessionEnded(TokenDBError):
    """The chat session has ended; no more messages can be added."""

    def __init__(self, session_id: UUID) -> None:
        super().__init__(f"chat session {session_id} has ended")
        self.session_id = session_id


class HoldNotActive(TokenDBError):
    """The hold is no longer active: it was captured, released or has expired (``status``).

    ``status`` is the hold's :class:`~tokendb.models.HoldStatus` value
    (``"expired"`` also for a hold past ``expires_at`` that nothing has
    marked yet).
    """

    def __init__(self, hold_id: UUID, status: str) -> None:
        super().__init__(f"hold {hold_id} is {status}, not active")
        self.hold_id = hold_id
        self.status = status


class HoldExpired(HoldNotActive):
    """The hold expired at ``expired_at``; its tokens are free again."""

    def __init__(self, hold_id: UUID, expired_at: datetime) -> None:
        super().__init__(hold_id, "expired")
        self.expired_at = expired_at


class CaptureExceedsHold(ValidationError):
    """A capture of ``requested`` tokens from a hold of ``held`` tokens: nothing captured.

    ``field`` is the argument at fault (``amount``; ``tokens`` for ``add_message``).
    """

    def __init__(self, hold_id: UUID, held: int, requested: int, *, field: str = "amount") -> None:
        super().__init__(field, f"hold {hold_id} holds {held} tokens, {requested} requested")
        self.hold_id = hold_id
        self.held = held
        self.requested = requested
