"""API keys: issue (plaintext returned once), verify on every request, revoke, list.

The crypto lives in :mod:`tokendb.keys`; this module only stores and looks
up hashes. ``verify_api_key`` is on the hot path of every gateway request:
one read-only statement finds the key by its hash (unique index) with its
user, and ``last_used_at`` is written only when it is NULL or older than
``touch_interval`` (a second statement, before the call returns), so a hot
key writes once a minute, not on every request: per-request writes to one
row would serialise all requests on its row lock, and even a write that
changes nothing costs a data-modifying plan on every call.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from tokendb import _args, _db, _key_cache, _keyset, _limits_sql, _sql, keys
from tokendb._rows import hydrator, to_model
from tokendb._translate import TRANSLATED, translate, translated, translates_itself
from tokendb.errors import (
    ApiKeyExpired,
    ApiKeyRevoked,
    InvalidApiKey,
    NotFound,
    PermissionDenied,
    ValidationError,
)
from tokendb.ids import new_id
from tokendb.models import ApiKey, LimitPeriod, User

__all__ = [
    "DEFAULT_TOUCH_INTERVAL",
    "issue_api_key",
    "list_api_keys",
    "revoke_api_key",
    "set_api_key_limit",
    "verify_api_key",
    "verify_cache_stats",
]

DEFAULT_TOUCH_INTERVAL = timedelta(seconds=60)
"""How stale ``last_used_at`` may get before ``verify_api_key`` writes it again."""
MAX_TOUCH_INTERVAL = timedelta(days=365)

_NEW_KEY = _sql.insert(
    ApiKey,
    {
        "id": "$1",
        "user_id": "id",
        "key_hash": "$3",
        "key_prefix": "$4",
        "name": "$5",
        "permissions": "$6::jsonb",
        "is_active": "true",
        "expires_at": "$7",
        "created_at": "clock_timestamp()",
        "token_limit": "$8",
        "limit_period": "$9",
    },
    source="users",
)
# $1 new id, $2 the user, $3 hash, $4 display prefix, $5 name, $6 permissions (JSON), $7 expiry,
# $8 token limit, $9 its period (both NULL: no limit).
_ISSUE = f"""
{_NEW_KEY}
WHERE id = $2
RETURNING *
"""

_BALANCES = ("token_balance", "held_tokens")
"""The user's columns a verified key does not carry (migration 6's trigger ignores them too)."""

# The lookup by hash (unique index) with the user (without its balance), read-only.
_LOOKUP = f"""
SELECT k.*, {_sql.select_list(User, "u", "user_", omit=_BALANCES)}, now() AS checked_at
FROM api_keys k JOIN users u ON u.id = k.user_id
WHERE k.key_hash = $1
"""

# The throttled, forward-only touch, sent only when the lookup saw a stale value.
_TOUCH = """
UPDATE api_keys SET last_used_at = $2::timestamptz
WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < $2::timestamptz - $3::interval)
RETURNING last_used_at
"""


@translated
async def issue_api_key(
    *,
    user: User | UUID | str,
    name: str,
    permissions: list[str] | None = None,
    expires_at: datetime | None = None,
    token_limit: int | None = None,
    limit_period: LimitPeriod | str | None = None,
) -> tuple[ApiKey, str]:
    """Create an API key for ``user``; return ``(api_key, secret)``.

    ``secret`` (``sk_live_…``) is the only copy of the plaintext: tokendb
    stores its SHA-256 hash and a 12-character display prefix. ``permissions``
    is a list of scope strings; ``None`` gives
    :data:`~tokendb.keys.DEFAULT_PERMISSIONS` (``["*"]``, every permission).
    ``expires_at`` must be timezone-aware and in the future.

    ``token_limit`` and ``limit_period`` (both or neither) cap the key's
    usage: at most ``token_limit`` tokens per ``"day"`` or ``"month"`` (UTC
    calendar windows) or ``"total"``; see :func:`set_api_key_limit`.

    Raises:
        ValidationError: a bad name, scope, expiry or limit.
        NotFound: unknown user.
        DatabaseUnavailable: the database is unreachable, or the connection was lost
            (``.outcome_unknown`` once the write was sent).
    """
    user_id = _args.ref_id(user, "user", User)
    clean_name = _args.text(name, "name", max_length=100)
    scopes = keys.normalize_permissions(permissions)
    expiry = None if expires_at is None else _args.aware_datetime(expires_at, "expires_at")
    if expiry is not None and expiry <= datetime.now(expiry.tzinfo):
        raise ValidationError("expires_at", "must be in the future")
    limit, period = _limit(token_limit, limit_period)
    secret = keys.generate_key()
    rows = await _db.write(
        _ISSUE,
        new_id(),
        user_id,
        keys.hash_key(secret),
        keys.key_prefix(secret),
        clean_name,
        json.dumps(scopes),
        expiry,
        limit,
        period,
    )
    if not rows:
        raise NotFound("user", user_id)
    return to_model(ApiKey, rows[0]), secret


_BIGINT_MAX = 2**63 - 1


def _limit(token_limit: Any, limit_period: Any) -> tuple[int | None, str | None]:
    """A key's limit and period, both or neither (the column values)."""
    if token_limit is None and limit_period is None:
        return None, None
    if token_limit is None:
        raise ValidationError("token_limit", "is required with limit_period")
    if limit_period is None:
        raise ValidationError("limit_period", "is required with token_limit")
    limit = _args.whole_number(token_limit, "token_limit", minimum=1, maximum=_BIGINT_MAX)
    return limit, _args.enum_member(limit_period, LimitPeriod, "limit_period").value


_SET_LIMIT = "UPDATE api_keys SET token_limit = $2, limit_period = $3 WHERE id = $1 RETURNING *"


@translated
async def set_api_key_limit(
    *,
    api_key: ApiKey | UUID | str,
    token_limit: int | None,
    limit_period: LimitPeriod | str | None,
) -> ApiKey:
    """Set (or, with both ``None``, remove) ``api_key``'s usage limit; return the key.

    At most ``token_limit`` (1 to 2**63-1) tokens of usage per
    ``limit_period``: ``"day"`` and ``"month"`` are UTC calendar windows,
    ``"total"`` the key's whole life. A charge or chat message through the
    key is refused with
    :class:`~tokendb.KeyLimitExceeded` when the window's usage (net of
    refunds, read from the ledger's rollup: nothing is reset by a job), plus
    the key's active holds, plus the request would exceed it. The change
    applies to every movement that starts after it returns; usage already
    booked stays, even past a lowered limit. Movements through the key that
    started before the change and are still in flight (waiting for their
    user's row, say) commit under the old rule and are not counted by a
    movement decided under the new limit before they commit: right after a
    limit is set or lowered, the window may pass it by what was in flight.

    Raises:
        NotFound: unknown key.
        ValidationError: one of the two without the other, a limit that is
            not a positive whole number, or an unknown period.
        DatabaseUnavailable: the database is unreachable, or the connection was lost
            (``.outcome_unknown`` once the write was sent).
    """
    key_id = _args.ref_id(api_key, "api_key", ApiKey)
    limit, period = _limit(token_limit, limit_period)
    rows = await _db.write(_SET_LIMIT, key_id, limit, period)
    if not rows:
        raise NotFound("API key", key_id)
    _limits_sql.remember(key_id, limited=limit is not None)
    return to_model(ApiKey, rows[0])


def _touch_interval(value: Any) -> timedelta:
    """A checked ``touch_interval`` (``verify_api_key`` lets the default through unchecked)."""
    if isinstance(value, timedelta):
        value = _args.exact_timedelta(value)
        seconds = value.total_seconds()
    elif isinstance(value, float):
        seconds = value = float.__float__(value)  # exact, as _args does for the other types
    elif isinstance(value, int) and not isinstance(value, bool):
        seconds = value = _args.exact_int(value, "touch_interval")
    else:
        raise ValidationError("touch_interval", "must be a timedelta or a number of seconds")
    # Checked before timedelta() sees it: NaN, infinities and huge numbers raise there.
    if not (math.isfinite(seconds) and 0 <= seconds <= MAX_TOUCH_INTERVAL.total_seconds()):
        raise ValidationError("touch_interval", "must be between 0 s and 365 days")
    return value if isinstance(value, timedelta) else timedelta(seconds=seconds)


@translates_itself  # not @translated: one frame fewer on every request's path
async def verify_api_key(
    *,
    secret: str,
    permission: str | None = None,
    touch_interval: timedelta | float = DEFAULT_TOUCH_INTERVAL,
) -> ApiKey:
    """The active, unexpired key whose plaintext is ``secret``, with ``.user`` loaded.

    When ``permission`` is given the key must grant it. Every refusal is
    decided before anything is written; then ``last_used_at`` is set to now
    when it is NULL or older than ``touch_interval`` (forward only), before
    this returns.

    **The verify cache** (on by default, ``init(verify_cache=False)`` or
    ``TOKENDB_VERIFY_CACHE=off`` turns it off): a key found once is kept in
    the process (LRU, :func:`verify_cache_stats`), and answered from memory
    while the cache is synchronised with the database through LISTEN/NOTIFY
    (:mod:`tokendb._key_cache`). A revocation, expiry or permission change
    committed by any client is honoured within milliseconds, and never later
    than 60 ms plus the notification's delivery: the cache is bypassed
    while its listener is down or late. Expiry is checked against this
    process's clock on every hit (against the database's on a lookup).

    **What comes back** is a new instance on every call, from the cache or
    not. ``.user`` is the key's user *without* ``token_balance`` and
    ``held_tokens`` (reading them raises ``AttributeError``; the instance is partial, so ``save()``
    refuses): a balance from the cache would be stale, so none is ever
    returned. Read the balance with :func:`tokendb.get_balance`.
    ``last_used_at`` is the value this process last read or wrote; on a hit
    the touch, when due, is written as on a lookup, with this process's clock.

    Raises:
        InvalidApiKey: malformed or unknown key.
        ApiKeyRevoked: the key was revoked (an ``InvalidApiKey``).
        ApiKeyExpired: the key expired (an ``InvalidApiKey``).
        PermissionDenied: the key does not grant ``permission``.
        ValidationError: a bad ``permission`` or ``touch_interval``.
        DatabaseUnavailable: the database is unreachable.
    """
    try:
        interval = (
            touch_interval  # every request passes the default: skip the checks
            if touch_interval is DEFAULT_TOUCH_INTERVAL
            else _touch_interval(touch_interval)
        )
        if permission is not None:
            if not isinstance(permission, str):
                raise ValidationError("permission", "must be a string")
            permission = _args.exact_str(permission)
        if not keys.is_well_formed(secret):
            raise InvalidApiKey()
        key_hash = keys.hash_key(_args.exact_str(secret))
        cache = _key_cache.for_lookup()
        if cache is not None:
            cached: _Verified | None = cache.get(key_hash)
            if cached is not None:
                return await cached.answer(datetime.now(UTC), permission, interval, shared=True)
            generation = cache.generation
        rows = await _db.read(_LOOKUP, key_hash)
        if not rows:
            raise InvalidApiKey()
        row = rows[0]
        # The user without its balance is partial: save() refuses it.
        verified = _Verified(hydrator(ApiKey)(row), hydrator(User, "user_", _BALANCES)(row))
        if cache is None:
            # Nobody else holds these instances: hand them out as they are.
            return await verified.answer(row["checked_at"], permission, interval, shared=False)
        cache.put(key_hash, verified.user_id, verified, generation=generation)
        return await verified.answer(row["checked_at"], permission, interval, shared=True)
    except TRANSLATED as exc:
        raise translate(exc) from exc


def verify_cache_stats() -> _key_cache.CacheStats:
    """The verify cache's counters in this process: hits, misses, size, whether it is synchronised.

    Raises nothing.
    """
    return _key_cache.stats()


class _Verified:
    """A looked-up key and its user (without the balance): what the cache keeps.

    :meth:`answer` decides every refusal against ``now``, touches when due
    and returns fresh instances, so callers never share (or change) the cached ones.
    """

    __slots__ = ("key", "user", "user_id")

    def __init__(self, key: ApiKey, user: User) -> None:
        # ``user`` comes without its balance (never one that may be stale), partial.
        self.key = key
        self.user = user
        self.user_id: UUID = key.user_id

    async def answer(
        self, now: datetime, permission: str | None, interval: timedelta, *, shared: bool
    ) -> ApiKey:
        """The key, or the refusal, as of ``now``; copies of the instances when ``shared``
        (cached), else the instances themselves (a lookup's own, handed out once)."""
        key = self.key
        if not key.is_active:
            raise ApiKeyRevoked(key.key_prefix)
        if key.expires_at is not None and key.expires_at <= now:
            raise ApiKeyExpired(key.key_prefix, key.expires_at)
        if permission is not None and not keys.grants(key.permissions, permission):
            raise PermissionDenied(permission, key.key_prefix)
        # Every refusal is decided above, before the only write: a refused key is not touched.
        if key.last_used_at is None or key.last_used_at < now - interval:
            key.__dict__["last_used_at"] = await _touch(key.id, now, interval)
        if shared:
            return self._copy()
        # What select_related("user") sets (a cache attribute, not a field: no Model.__setattr__).
        object.__setattr__(key, "_user", self.user)
        return key

    def _copy(self) -> ApiKey:
        key = ApiKey.__new__(ApiKey)
        key.__dict__.update(self.key.__dict__)
        key.__dict__["permissions"] = list(self.key.permissions)
        user = User.__new__(User)
        user.__dict__.update(self.user.__dict__)
        # What select_related("user") sets (a cache attribute, not a field: no Model.__setattr__).
        object.__setattr__(key, "_user", user)
        return key


async def _touch(key_id: UUID, checked_at: datetime, interval: timedelta) -> datetime | None:
    """Set ``last_used_at`` to ``checked_at`` unless it is fresh by now; return the stored value."""
    rows = await _db.write(_TOUCH, key_id, checked_at, interval)
    if not rows:
        # A concurrent verify touched it first: this UPDATE waited for that
        # row lock and then found the value fresh. The lookup's snapshot
        # predates that commit; a new statement sees it.
        rows = await _db.read("SELECT last_used_at FROM api_keys WHERE id = $1", key_id)
    return rows[0]["last_used_at"] if rows else None


_REVOKE = (
    f"UPDATE api_keys SET is_active = false WHERE id = $1 AND {_sql.owned_by('$2')} RETURNING *"
)


@translated
async def revoke_api_key(
    *, api_key: ApiKey | UUID | str, user: User | UUID | str | None = None
) -> ApiKey:
    """Deactivate ``api_key`` for good (there is no un-revoke); idempotent.

    With ``user``, the key must belong to that user.

    Raises:
        NotFound: unknown key, or another user's.
        ValidationError: a malformed id.
        DatabaseUnavailable: the database is unreachable, or the connection was lost
            (``.outcome_unknown`` once the write was sent).
    """
    key_id = _args.ref_id(api_key, "api_key", ApiKey)
    rows = await _db.write(_REVOKE, key_id, _args.owner(user))
    if not rows:
        raise NotFound("API key", key_id)
    # This process honours it at once; the trigger's notification tells the others.
    _key_cache.forget(rows[0]["key_hash"])
    return to_model(ApiKey, rows[0])


@translated
async def list_api_keys(*, user: User | UUID | str, include_revoked: bool = True) -> list[ApiKey]:
    """``user``'s keys, oldest first (all of them: a user has few).

    Like every ``list_*``: an unknown user is :class:`NotFound`, a user
    without keys an empty list.

    Raises:
        NotFound: unknown user.
        ValidationError: a malformed id.
        DatabaseUnavailable: the database is unreachable.
    """
    user_id = _args.ref_id(user, "user", User)
    rows = await _db.read(
        "SELECT * FROM api_keys WHERE user_id = $1 AND (is_active OR $2) ORDER BY created_at, id",
        user_id,
        bool(include_revoked),
    )
    if not rows:
        await _keyset.require_owner("users", "user", user_id)
    return [to_model(ApiKey, row) for row in rows]
