"""Secrets: plaintext keys and passwords never reach the database, the logs or a repr.

Every logger that could see a statement (Tortoise, asyncpg, Aerich, tokendb)
runs at DEBUG while users are created, keys issued, verified and revoked,
passwords checked and changed; then every row of every table (the whole row
as text: text, varchar and jsonb columns alike) and every captured log line
and error message is searched for each plaintext.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import argon2
import asyncpg
import pytest

import tokendb
from tokendb import passwords

LOGGERS = ("tortoise", "tortoise.db_client", "asyncpg", "aerich", "tokendb")


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)
    levels = {name: logging.getLogger(name).level for name in LOGGERS}
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield caplog
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


async def rows_containing(conn: asyncpg.Connection, needle: str) -> dict[str, int]:
    """For every table of the schema, how many rows hold ``needle`` in any column."""
    tables = await conn.fetch(
        "SELECT table_name FROM information_schema.tables "
        "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
    )
    found: dict[str, int] = {}
    for table in tables:
        name = table["table_name"]
        count = await conn.fetchval(
            f'SELECT count(*) FROM "{name}" AS t WHERE strpos(t::text, $1) > 0', needle
        )
        if count:
            found[name] = count
    return found


async def test_plaintexts_never_reach_the_database_or_the_logs(
    tokendb_clean: str, debug_logs: pytest.LogCaptureFixture
) -> None:
    plaintexts: list[str] = []
    errors: list[BaseException] = []
    shown: list[str] = []
    for index in range(3):
        password = f"pw-{uuid.uuid4().hex}"
        email = f"secret-{index}-{uuid.uuid4().hex[:6]}@example.com"
        user = await tokendb.create_user(email=email, password=password, name="S")
        await tokendb.authenticate(email=email, password=password)
        new_password = f"new-{uuid.uuid4().hex}"
        await tokendb.change_password(
            user=user, new_password=new_password, current_password=password
        )
        plaintexts += [password, new_password]
        for attempt in (password, new_password + "x"):
            try:
                await tokendb.authenticate(email=email, password=attempt)
            except tokendb.InvalidCredentials as exc:
                errors.append(exc)
        key, secret = await tokendb.issue_api_key(user=user, name=f"key {index}")
        revoked, revoked_secret = await tokendb.issue_api_key(user=user, name="old")
        plaintexts += [secret, secret[len(key.key_prefix) :], revoked_secret]
        verified = await tokendb.verify_api_key(secret=secret, permission="chat")
        session = await tokendb.start_chat(api_key=verified, model="m")
        await tokendb.add_message(session=session, role="user", content="hello", tokens=1)
        await tokendb.revoke_api_key(api_key=revoked)
        for attempt in (revoked_secret, secret + "x", secret[:-1] + "!", secret[:20]):
            try:
                await tokendb.verify_api_key(secret=attempt)
            except tokendb.InvalidApiKey as exc:
                errors.append(exc)
        # The application's own ORM reads go through Tortoise's logged client.
        loaded_user = await tokendb.User.get(id=user.id)
        loaded_keys = await tokendb.ApiKey.filter(user_id=user.id)
        for model in (user, loaded_user, verified, key, revoked, *loaded_keys):
            shown += [repr(model), str(model)]
        plaintexts.append(loaded_user.password_hash)  # hashes are not for display either
        plaintexts += [loaded.key_hash for loaded in loaded_keys]

    assert len(errors) == 3 * 6
    assert any(record.name == "tortoise.db_client" for record in debug_logs.records), (
        "the ORM's statements were not captured: the log scan would prove nothing"
    )
    logged = debug_logs.text + "\n".join(
        f"{record.getMessage()} {record.args!r}" for record in debug_logs.records
    )
    said = "\n".join([*map(str, errors), *map(repr, errors), *shown])

    conn = await asyncpg.connect(tokendb_clean)
    try:
        for plaintext in plaintexts:
            is_hash = plaintext.startswith("$argon2") or len(plaintext) == 64
            if not is_hash:
                assert await rows_containing(conn, plaintext) == {}, "plaintext stored"
            assert plaintext not in said
            if not is_hash:
                assert plaintext not in logged
    finally:
        await conn.close()


async def test_keys_are_stored_and_compared_by_hash(make_api_key: Any, tokendb_db: str) -> None:
    key, secret = await make_api_key()
    conn = await asyncpg.connect(tokendb_db)
    try:
        (stored,) = await conn.fetch(
            "SELECT key_hash, key_prefix FROM api_keys WHERE id = $1", key.id
        )
    finally:
        await conn.close()
    assert stored["key_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert stored["key_prefix"] == secret[:12]
    # Same display prefix, same length, another tail: looked up by hash, so unknown.
    impostor = secret[:12] + ("A" if secret[12] != "A" else "B") + secret[13:]
    with pytest.raises(tokendb.InvalidApiKey) as caught:
        await tokendb.verify_api_key(secret=impostor)
    assert type(caught.value) is tokendb.InvalidApiKey
    assert (await tokendb.verify_api_key(secret=secret)).id == key.id


async def test_repr_and_str_never_show_hashes(make_api_key: Any, make_user: Any) -> None:
    user = await make_user()
    key, _ = await make_api_key(user=user)
    loaded = await tokendb.User.get(id=user.id)
    loaded_key = await tokendb.ApiKey.get(id=key.id)
    for model, secret_field in ((loaded, "password_hash"), (loaded_key, "key_hash")):
        value = getattr(model, secret_field)
        assert value
        for text in (repr(model), str(model), f"{model}", f"{model!r}"):
            assert value not in text
            assert secret_field not in text


def test_pydantic_schemas_built_from_the_models_leave_hashes_out() -> None:
    pydantic_creator = pytest.importorskip("tortoise.contrib.pydantic").pydantic_model_creator
    assert "password_hash" not in pydantic_creator(tokendb.User).model_fields
    assert "key_hash" not in pydantic_creator(tokendb.ApiKey).model_fields


class CountingHasher:
    """Counts argon2 verifications and the hashes they were run against."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.hashes: list[str] = []
        original = argon2.PasswordHasher.verify

        def verify(hasher: argon2.PasswordHasher, password_hash: Any, password: Any) -> bool:
            self.hashes.append(password_hash)
            return original(hasher, password_hash, password)

        monkeypatch.setattr(argon2.PasswordHasher, "verify", verify)


async def test_authenticate_does_the_same_work_for_unknown_emails(
    make_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = await make_user(password="right password")
    counter = CountingHasher(monkeypatch)
    cases = [
        (user.email, "wrong password"),
        (f"nobody-{uuid.uuid4().hex[:6]}@example.com", "wrong password"),
        ("not an email at all", "wrong password"),
        (None, "wrong password"),
    ]
    for email, password in cases:
        with pytest.raises(tokendb.InvalidCredentials):
            await tokendb.authenticate(email=email, password=password)
    # One argon2 verification per attempt, known email or not.
    assert len(counter.hashes) == len(cases)
    real, dummies = counter.hashes[0], counter.hashes[1:]
    assert real == (await tokendb.User.get(id=user.id)).password_hash
    # The stand-in hash costs what a real one costs: same algorithm and parameters.
    parameters = real.rsplit("$", 2)[0]
    assert all(dummy.rsplit("$", 2)[0] == parameters for dummy in dummies)
    assert passwords.needs_rehash(real) is False
