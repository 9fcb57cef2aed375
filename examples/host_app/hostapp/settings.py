"""The host's Tortoise configuration: its own app next to tokendb's.

``TORTOISE_ORM`` is what Aerich loads (``pyproject.toml``); it is built on
first access, from ``DATABASE_URL``, with tokendb's pool size and timeouts,
so importing ``APPS`` (the app, its tests) resolves no database.
docs/host-apps.md shows this file's code (tests/test_docs.py checks it).
"""

from typing import Any

import tokendb

APPS = {"hostapp": {"models": ["hostapp.models"]}}


def __getattr__(name: str) -> Any:  # TORTOISE_ORM: DATABASE_URL, tokendb's pool and timeouts
    if name == "TORTOISE_ORM":
        return tokendb.tortoise_orm(apps=APPS)
    raise AttributeError(name)
