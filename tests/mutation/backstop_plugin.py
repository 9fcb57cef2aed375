"""pytest plugin of the backstop run: a change to the schema, made right after migrating.

``python -m pytest -p tests.mutation.backstop_plugin`` with
``TOKENDB_BACKSTOP_SQL`` set runs that SQL on the ``tokendb_db`` database as
soon as the fixture has migrated it, so the tests meet a schema with one
backstop removed or weakened. Without the variable it does nothing. A change
that does not apply ends the session with exit code :data:`NOT_APPLIED`, so
the run cannot mistake it for a test that noticed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from typing import Any

import asyncpg
import pytest

CHANGE = os.environ.get("TOKENDB_BACKSTOP_SQL", "")
NOT_APPLIED = 9


def pytest_report_header() -> str:
    return f"backstop change: {CHANGE!r}" if CHANGE else "backstop change: none"


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any]) -> Any:
    url = yield
    if fixturedef.argname == "tokendb_db" and CHANGE:

        async def change() -> None:
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(CHANGE)
            finally:
                await conn.close()

        # A loop of its own, in a thread: the session's loop belongs to pytest-asyncio.
        with concurrent.futures.ThreadPoolExecutor(1) as thread:
            try:
                thread.submit(asyncio.run, change()).result()
            except Exception as exc:
                pytest.exit(f"the backstop change did not apply: {exc}", returncode=NOT_APPLIED)
    return url
