"""The host's tests use tokendb's pytest plugin: a throw-away database with both schemas."""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tokendb_apps() -> dict[str, dict[str, object]]:
    # The host's app, its tables from its own Aerich migrations (after tokendb's).
    return {"hostapp": {"models": ["hostapp.models"], "migrations": HERE / "migrations"}}
