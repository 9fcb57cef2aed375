"""The host's Tortoise configuration: its own app next to tokendb's.

``TORTOISE_ORM`` is what Aerich loads (``pyproject.toml``); it is built on
first access, from ``DATABASE_URL``, with tokendb's pool size and timeouts.
"""

from typing import Any

import tokendb

APPS = {"hostapp": {"models": ["hostapp.models"]}}
"""The host's apps: tokendb's comes with tokendb.tortoise_orm(), after these."""


def __getattr__(name: str) -> Any:
    if name == "TORTOISE_ORM":
        return tokendb.tortoise_orm(apps=APPS)
    raise AttributeError(name)
