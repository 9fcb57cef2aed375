"""API keys: issue (plaintext returned once), verify on every request, revoke, list.

The crypto lives in :mod:`tokendb.keys`; this module only stores and looks
up hashes. ``verify_api_key`` is on the hot path of every gateway request:
one statement finds the key by its hash (unique index) with its user, and in
the same round trip refreshes ``last_used_at`` — but only when it is NULL or
older than ``touch_interval``, so a hot key writes once a minute, not on
every request (per-request writes to one row serialise all requests on its
row lock).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from tokendb import _args, _db, keys
from tokendb.errors import (
    ApiKeyExpired,
    ApiKeyRevoked,
    InvalidApiKey,
    NotFound,
    PermissionDenied,
    ValidationError,
)
from tokendb.ids import new_id
from tokendb.models import ApiKey, User

__all__ = [
    "DEFAULT_TOUCH_INTERVAL",
    "issue_api_key",
    "list_api_keys",
    "revoke_api_key",
    "verify_api_key",
]

DEFAULT_TOUCH_INTERVAL = timedelta(seconds=60)
"""How stale ``last_used_at`` may get before ``verify_api_key`` writes it again."""

_ISSUE = """
INSERT INTO api_keys
    (id, user_id, key_hash, key_prefix, name, permissions, is_active,
     last_used_at, expires_at, created_at)
SELECT $1, id, $3, $4, $5, $6::jsonb, true, NULL, $7, clock_timestamp()
FROM users WHERE id = $2
RETURNING *
"""

_USER_COLUMNS = (
    "id", "email", "password_hash", "name", "role", "token_balance", "created_at", "updated_at",
)

# One round trip: the lookup by hash (unique index), the user, and the
# throttled, forward-only touch of last_used_at.
_VERIFY = f"""
WITH found AS (
    SELECT k.*, {", ".join(f"u.{column} AS user_{column}" for column in _USER_COLUMNS)},
           now() AS checked_at
    FROM api_keys k JOIN users u ON u.id = k.user_id
    WHERE k.key_hash = $1
), touched AS (
    UPDATE api_keys SET last_used_at = found.checked_at
    FROM found
    WHERE api_keys.id = found.id
      AND found.is_active
      AND (found.expires_at IS NULL OR found.expires_at > found.checked_at)
      AND (api_keys.last_used_at IS NULL
           OR api_keys.last_used_at < found.checked_at - $2::interval)
    RETURNING api_keys.last_used_at
)
SELECT found.*, (SELECT last_used_at FROM touched) AS touched_at FROM found
"""

_KEY_COLUMNS = (
    "id", "user_id", "key_hash", "key_prefix", "name", "permissions", "is_active",
    "last_used_at", "expires_at", "created_at",
)


@_db.translated
async def issue_api_key(
    *,
    user: User | UUID | str,
    name: str,
    permissions: list[str] | None = None,
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Create an API key for ``user``; return ``(api_key, secret)``.

    ``secret`` (``sk_live_…``) is the only copy of the plaintext: tokendb
    stores its SHA-256 hash and a 12-character display prefix. ``permissions``
    is a list of scope strings; ``None`` gives
    :data:`~tokendb.keys.DEFAULT_PERMISSIONS` (``["*"]``, every permission).
    ``expires_at`` must be timezone-aware and in the future.

    Raises :class:`ValidationError` and :class:`NotFound` (unknown user).
    """
    user_id = _args.ref_id(user, "user", User)
    clean_name = _args.text(name, "name", max_length=100)
    scopes = keys.normalize_permissions(permissions)
    expiry = None if expires_at is None else _args.aware_datetime(expires_at, "expires_at")
    if expiry is not None and expiry <= datetime.now(expiry.tzinfo):
        raise ValidationError("expires_at", "must be in the future")
    secret = keys.generate_key()
    rows = await _db.write(
        _ISSUE,
        new_id(), user_id, keys.hash_key(secret), keys.key_prefix(secret), clean_name,
        json.dumps(scopes), expiry,
    )
    if not rows:
        raise NotFound("user", user_id)
    return _db.to_model(ApiKey, rows[0]), secret


def _touch_interval(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        interval = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            interval = timedelta(seconds=value)
        except (OverflowError, ValueError):  # NaN, infinities, past timedelta's range
            raise ValidationError("touch_interval", f"not a usable duration: {value}") from None
    else:
        raise ValidationError("touch_interval", "must be a timedelta or a number of seconds")
    if interval < timedelta(0):
        raise ValidationError("touch_interval", "must not be negative")
    return interval


@_db.translated
async def verify_api_key(
    *,
    secret: str,
    permission: str | None = None,
    touch_interval: timedelta | float = DEFAULT_TOUCH_INTERVAL,
) -> ApiKey:
    """The active, unexpired key whose plaintext is ``secret``, with ``.user`` loaded.

    When ``permission`` is given the key must grant it. ``last_used_at`` is
    set to now when it is NULL or older than ``touch_interval`` (forward
    only), before this returns.

    Raises :class:`InvalidApiKey` (malformed or unknown), :class:`ApiKeyRevoked`,
    :class:`ApiKeyExpired` (both are ``InvalidApiKey``) and :class:`PermissionDenied`.
    """
    interval = _touch_interval(touch_interval)
    if permission is not None and not isinstance(permission, str):
        raise ValidationError("permission", "must be a string")
    if not keys.is_well_formed(secret):
        raise InvalidApiKey()
    rows = await _db.write(_VERIFY, keys.hash_key(secret), interval)
    if not rows:
        raise InvalidApiKey()
    row = rows[0]
    api_key = _db.to_model(ApiKey, {column: row[column] for column in _KEY_COLUMNS})
    if row["touched_at"] is not None:
        api_key.last_used_at = row["touched_at"]
    user = _db.to_model(User, {column: row[f"user_{column}"] for column in _USER_COLUMNS})
    api_key._user = user  # what select_related("user") would set: api_key.user is loaded
    if not api_key.is_active:
        raise ApiKeyRevoked(api_key.key_prefix)
    if api_key.expires_at is not None and api_key.expires_at <= row["checked_at"]:
        raise ApiKeyExpired(api_key.key_prefix, api_key.expires_at)
    if permission is not None and not keys.grants(api_key.permissions, permission):
        raise PermissionDenied(permission, api_key.key_prefix)
    return api_key


@_db.translated
async def revoke_api_key(
    *, api_key: ApiKey | UUID | str, user: User | UUID | str | None = None
) -> ApiKey:
    """Deactivate ``api_key`` for good (there is no un-revoke); idempotent.

    With ``user``, the key must belong to that user. Raises :class:`NotFound`.
    """
    key_id = _args.ref_id(api_key, "api_key", ApiKey)
    owner = None if user is None else _args.ref_id(user, "user", User)
    rows = await _db.write(
        "UPDATE api_keys SET is_active = false "
        "WHERE id = $1 AND ($2::uuid IS NULL OR user_id = $2) RETURNING *",
        key_id, owner,
    )
    if not rows:
        raise NotFound("API key", key_id)
    return _db.to_model(ApiKey, rows[0])


@_db.translated
async def list_api_keys(*, user: User | UUID | str, include_revoked: bool = True) -> list[ApiKey]:
    """``user``'s keys, oldest first. Raises :class:`NotFound` for an unknown user."""
    user_id = _args.ref_id(user, "user", User)
    rows = await _db.read(
        "SELECT * FROM api_keys WHERE user_id = $1 AND (is_active OR $2) "
        "ORDER BY created_at, id",
        user_id, bool(include_revoked),
    )
    if not rows and not await _db.read("SELECT 1 FROM users WHERE id = $1", user_id):
        raise NotFound("user", user_id)
    return [_db.to_model(ApiKey, row) for row in rows]
