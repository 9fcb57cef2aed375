"""Password hashing with argon2id (argon2-cffi). No database access here.

Cost parameters: production keeps argon2-cffi's defaults (RFC 9106's
low-memory profile, ~50–150 ms a hash); test suites and demo seeding lower
them. :func:`configure` sets the process's defaults once, at startup;
:func:`parameters` changes them for one block, in a context variable, so
only the block (and the tasks it starts) hash with them: a concurrent
``create_user`` elsewhere keeps the costs it had. Hashing runs in a worker
thread (argon2-cffi releases the GIL), so a login never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

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

_default = PasswordHasher()
_in_block: ContextVar[PasswordHasher | None] = ContextVar("tokendb_password_hasher", default=None)
_dummy_hashes: dict[tuple[int, int, int], str] = {}
"""One dummy hash per cost parameters, verified for unknown users (see :func:`verify_password`)."""


def _hasher() -> PasswordHasher:
    scoped = _in_block.get()
    return _default if scoped is None else scoped


def _made(
    time_cost: int | None = None, memory_cost: int | None = None, parallelism: int | None = None
) -> PasswordHasher:
    defaults = PasswordHasher()
    return PasswordHasher(
        time_cost=time_cost if time_cost is not None else defaults.time_cost,
        memory_cost=memory_cost if memory_cost is not None else defaults.memory_cost,
        parallelism=parallelism if parallelism is not None else defaults.parallelism,
    )


def configure(
    *,
    time_cost: int | None = None,
    memory_cost: int | None = None,
    parallelism: int | None = None,
) -> None:
    """Set the process's argon2 cost parameters for new hashes, once, at startup.

    Unset ones keep argon2-cffi's defaults. Existing hashes still verify;
    :func:`tokendb.authenticate` rehashes them with the new parameters on the
    next successful login. To change them while other coroutines run, use
    :func:`parameters`, which only the block sees.
    """
    global _default
    _default = _made(time_cost, memory_cost, parallelism)


def current_parameters() -> dict[str, int]:
    """The cost parameters in force for the calling task, as keyword arguments."""
    hasher = _hasher()
    return {
        "time_cost": hasher.time_cost,
        "memory_cost": hasher.memory_cost,
        "parallelism": hasher.parallelism,
    }


CHEAP_PARAMETERS = {"time_cost": 1, "memory_cost": 1024, "parallelism": 1}
"""Weak, fast argon2 costs for test suites and demo seeding; never for real users."""


@contextmanager
def parameters(**costs: int) -> Iterator[None]:
    """``with passwords.parameters(time_cost=…):`` other costs for this block only.

    Unset ones are argon2-cffi's defaults. The change lives in a context
    variable: only this task and the tasks it starts inside the block see
    it, and what was in force comes back afterwards.
    """
    token = _in_block.set(_made(**costs))
    try:
        yield
    finally:
        _in_block.reset(token)


async def hash_password(password: str) -> str:
    """The argon2id hash of ``password`` (PHC string, salt included)."""
    return await asyncio.to_thread(_hasher().hash, password)


async def verify_password(password_hash: str | None, password: str) -> bool:
    """True when ``password`` matches ``password_hash``.

    With ``password_hash=None`` (unknown user) a dummy hash is verified, so
    the call costs the same and timing does not reveal whether the user exists.
    """
    hasher = _hasher()
    if password_hash is None:
        costs = (hasher.time_cost, hasher.memory_cost, hasher.parallelism)
        dummy = _dummy_hashes.get(costs)
        if dummy is None:
            dummy = await asyncio.to_thread(hasher.hash, secrets.token_urlsafe(16))
            _dummy_hashes[costs] = dummy
        await asyncio.to_thread(_verify, hasher, dummy, password)
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
        return _hasher().check_needs_rehash(password_hash)
    except (InvalidHashError, ValueError):
        return True
