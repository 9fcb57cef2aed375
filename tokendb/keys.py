"""API-key cryptography and permission rules: pure functions, no database access.

A key is ``sk_live_`` followed by 40 base62 characters from :mod:`secrets`
(≈238 bits of entropy). Only its SHA-256 hex digest is stored. A fast hash is
the right tool here, unlike for passwords: a key this random cannot be
brute-forced from its hash, and ``verify_api_key`` must cost microseconds on
every request. The first 12 characters are kept as a display prefix.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
from collections.abc import Iterable
from typing import Any

from tokendb.errors import ValidationError

__all__ = [
    "ALL_PERMISSIONS",
    "DEFAULT_PERMISSIONS",
    "KEY_PREFIX",
    "generate_key",
    "grants",
    "hash_key",
    "is_well_formed",
    "key_prefix",
    "normalize_permissions",
]

KEY_PREFIX = "sk_live_"
RANDOM_LENGTH = 40
DISPLAY_PREFIX_LENGTH = 12
_ALPHABET = string.ascii_letters + string.digits
_KEY_PATTERN = re.compile(rf"{KEY_PREFIX}[0-9A-Za-z]{{32,128}}")

ALL_PERMISSIONS = "*"
"""The scope that grants every permission."""
DEFAULT_PERMISSIONS: tuple[str, ...] = (ALL_PERMISSIONS,)
"""Scopes of a key issued without ``permissions``: full access, like a
provider's default key. Pass a narrower list (``["chat"]``) for least privilege."""

_PERMISSION_PATTERN = re.compile(r"[a-z][a-z0-9_.:-]{0,63}")
MAX_PERMISSIONS = 64


def generate_key() -> str:
    """A new random API key in the ``sk_live_…`` format."""
    return KEY_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(RANDOM_LENGTH))


def hash_key(secret: str) -> str:
    """The SHA-256 hex digest under which a key is stored and looked up."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def key_prefix(secret: str) -> str:
    """The first 12 characters, safe to display (``sk_live_AbCd``)."""
    return secret[:DISPLAY_PREFIX_LENGTH]


def is_well_formed(secret: Any) -> bool:
    """True when ``secret`` has the shape of a tokendb key (checked before any lookup)."""
    return isinstance(secret, str) and _KEY_PATTERN.fullmatch(secret) is not None


def normalize_permissions(permissions: Iterable[str] | None) -> list[str]:
    """Validate scope strings; return them de-duplicated, in order.

    ``None`` gives :data:`DEFAULT_PERMISSIONS`. A scope is ``"*"`` or a
    lowercase name such as ``chat`` or ``billing:read`` (letters, digits,
    ``_ . : -``; at most 64 characters). Raises :class:`ValidationError`.
    """
    if permissions is None:
        return list(DEFAULT_PERMISSIONS)
    if not isinstance(permissions, (list, tuple)):
        raise ValidationError("permissions", "must be a list of scope strings")
    result: list[str] = []
    for scope in permissions:
        if not isinstance(scope, str):
            raise ValidationError("permissions", f"scopes must be strings, got {scope!r}")
        scope = str.__str__(scope)  # an exact str: a subclass could override what is checked
        if scope != ALL_PERMISSIONS and not _PERMISSION_PATTERN.fullmatch(scope):
            raise ValidationError(
                "permissions", f"invalid scope {scope!r} (use '*' or names like 'chat')"
            )
        if scope not in result:
            result.append(scope)
        if len(result) > MAX_PERMISSIONS:
            raise ValidationError("permissions", f"at most {MAX_PERMISSIONS} scopes")
    return result


def grants(permissions: Iterable[str], permission: str) -> bool:
    """True when a key holding ``permissions`` may do ``permission``."""
    held = set(permissions)
    return ALL_PERMISSIONS in held or permission in held
