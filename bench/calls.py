"""``python -m bench.calls``: how many calls into tokendb one lone ``charge()`` makes
(and one ``verify_api_key()`` that looks its key up: the cache off).

A call is a Python function entered (or a coroutine resumed) whose code lives
under ``tokendb/``, counted with :func:`sys.setprofile` while one charge
runs alone on an initialised pool (after a warm-up charge). It is a measure
of how many layers a request crosses, not a timing: it is the same on a busy
machine and a quiet one. ``tests/test_structure.py`` keeps it under a budget.
"""

from __future__ import annotations

import asyncio
import collections
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import tokendb
from tokendb import _settings, passwords
from tokendb.testing import test_server_url, throwaway_database

PACKAGE = str(Path(tokendb.__file__).resolve().parent)


_BACKGROUND = {
    ("_key_cache.py", name) for name in ("_run", "_listen", "_on_heartbeat", "_on_invalidation")
}
"""The verify cache listener's task, which runs meanwhile but is no part of the call."""


@contextmanager
def calls_into_tokendb() -> Iterator[collections.Counter[tuple[str, str]]]:
    """Count ``(file, function)`` calls into tokendb's code made inside the block."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    prefix = PACKAGE + "/"

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(prefix):
            key = frame.f_code.co_filename[len(prefix) :], frame.f_code.co_name
            if key not in _BACKGROUND:
                counts[key] += 1

    sys.setprofile(profile)
    try:
        yield counts
    finally:
        sys.setprofile(None)


async def lone_charge_calls(user: tokendb.User) -> collections.Counter[tuple[str, str]]:
    """The calls of one ``charge()`` of 1 token of ``user`` (tokendb initialised)."""
    return await count(lambda: tokendb.charge(user=user, amount=1))


async def lone_verify_calls(secret: str) -> collections.Counter[tuple[str, str]]:
    """The calls of one ``verify_api_key()`` that looks the key up (the verify cache off)."""
    with _settings.using(verify_cache=False):
        return await count(lambda: tokendb.verify_api_key(secret=secret))


async def count(call: Callable[[], Awaitable[Any]]) -> collections.Counter[tuple[str, str]]:
    """The calls into tokendb that ``call()`` makes, after one warm-up run of it."""
    await call()
    with calls_into_tokendb() as counts:
        await call()
    return counts


async def _main() -> None:
    async with throwaway_database(test_server_url(), prefix="tokendb_calls") as url:
        await tokendb.migrate(url)
        async with tokendb.connect(url):
            with passwords.parameters(**passwords.CHEAP_PARAMETERS):
                user = await tokendb.create_user(
                    email="calls@example.com", password="correct horse", name="Calls"
                )
            counts = await lone_charge_calls(user)
            _, secret = await tokendb.issue_api_key(user=user, name="calls")
            verify = await lone_verify_calls(secret)
    for what, found in (("a lone charge()", counts), ("a verify_api_key() lookup", verify)):
        print(f"{what}: {sum(found.values())} calls into tokendb across {len(found)} functions")
        for (file, function), calls in sorted(found.items()):
            print(f"{calls:4d}  {file}:{function}")


if __name__ == "__main__":
    asyncio.run(_main())
