"""Password hashing with argon2id (argon2-cffi). No database access here.

The hasher's cost parameters are configurable with :func:`configure`:
production keeps argon2-cffi's defaults (RFC 9106's low-memory profile,
~50–150 ms a hash); test suites lower them. Hashing runs in a worker thread
(argon2-cffi releases the GIL), so a login never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

__all__ = [
    "CHEAP_PARAMETERS",
    "configure",
    "current_parameters",
    "hash_password",
    "needs_rehash",
    "parameters",
    "verify_password",
]

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


def current_parameters() -> dict[str, int]:
    """The cost parameters in force, as keyword arguments for :func:`configure`."""
    return {
        "time_cost": _hasher.time_cost,
        "memory_cost": _hasher.memory_cost,
        "parallelism": _hasher.parallelism,
    }


CHEAP_PARAMETERS = {"time_cost": 1, "memory_cost": 1024, "parallelism": 1}
"""Weak, fast argon2 costs for test suites and demo seeding; never for real users."""


@contextmanager
def parameters(**costs: int) -> Iterator[None]:
    """``with passwords.parameters(time_cost=…):`` — :func:`configure` for the block only.

    The parameters in force before are restored afterwards (not argon2's
    defaults), so a caller's own settings survive.
    """
    saved = current_parameters()
    configure(**costs)
    try:
        yield
    finally:
        configure(**saved)


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
    if not isinstance(password, str):
        return False
    # surrogatepass: a lone surrogate (json.loads('"\\ud800"') makes one) must
    # be a wrong password, not a UnicodeEncodeError. Valid text encodes as usual.
    secret = password.encode("utf-8", "surrogatepass")
    try:
        return hasher.verify(password_hash, secret)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """True when ``password_hash`` was made with other parameters than the current ones."""
    try:
        return _hasher.check_needs_rehash(password_hash)
    except (InvalidHashError, ValueError):
        return True
