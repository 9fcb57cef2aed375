"""Password hashing with argon2id (argon2-cffi). No database access here.

The hasher's cost parameters are configurable with :func:`configure`:
production keeps argon2-cffi's defaults (RFC 9106's low-memory profile,
~50–150 ms a hash); test suites lower them. Hashing runs in a worker thread
(argon2-cffi releases the GIL), so a login never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

__all__ = ["configure", "hash_password", "needs_rehash", "verify_password"]

_hasher = PasswordHasher()
_dummy_hash: str | None = None


def configure(
    *,
    time_cost: int | None = None,
    memory_cost: int | None = None,
    parallelism: int | None = None,
) -> None:
    """Set argon2 cost parameters for new hashes (unset ones keep argon2-cffi's defaults).

    Existing hashes still verify; :func:`tokendb.authenticate` rehashes them
    with the new parameters on the next successful login.
    """
    global _hasher, _dummy_hash
    defaults = PasswordHasher()
    _hasher = PasswordHasher(
        time_cost=time_cost if time_cost is not None else defaults.time_cost,
        memory_cost=memory_cost if memory_cost is not None else defaults.memory_cost,
        parallelism=parallelism if parallelism is not None else defaults.parallelism,
    )
    _dummy_hash = None


async def hash_password(password: str) -> str:
    """The argon2id hash of ``password`` (PHC string, salt included)."""
    hasher = _hasher
    return await asyncio.to_thread(hasher.hash, password)


async def verify_password(password_hash: str | None, password: str) -> bool:
    """True when ``password`` matches ``password_hash``.

    With ``password_hash=None`` (unknown user) a dummy hash is verified, so
    the call costs the same and timing does not reveal whether the user exists.
    """
    global _dummy_hash
    hasher = _hasher
    if password_hash is None:
        if _dummy_hash is None:
            _dummy_hash = await asyncio.to_thread(hasher.hash, secrets.token_urlsafe(16))
        await asyncio.to_thread(_verify, hasher, _dummy_hash, password)
        return False
    return await asyncio.to_thread(_verify, hasher, password_hash, password)


def _verify(hasher: PasswordHasher, password_hash: str, password: str) -> bool:
    # Callers pass whatever a client sent: a non-string or a string that is
    # not valid Unicode (a lone surrogate cannot be encoded) matches no hash.
    if not isinstance(password, str):
        return False
    try:
        return hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError, UnicodeEncodeError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """True when ``password_hash`` was made with other parameters than the current ones."""
    try:
        return _hasher.check_needs_rehash(password_hash)
    except (InvalidHashError, ValueError):
        return True
