"""Tests for tokendb._rows: the fast hydrator builds what Tortoise's _init_from_db builds."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from tortoise.models import Model

import tokendb
from tokendb import _db, _rows, _sql
from tokendb.models import ApiKey, ChatMessage, ChatSession, TokenTransaction, User


def same_instance(fast: object, tortoise: object) -> None:
    assert type(fast) is type(tortoise)
    assert vars(fast) == vars(tortoise)
    for name, value in vars(tortoise).items():  # equal values of the same types
        assert type(vars(fast)[name]) is type(value), name


@pytest.mark.parametrize(
    ("model", "table"),
    [
        (User, "users"),
        (ApiKey, "api_keys"),
        (TokenTransaction, "token_transactions"),
        (ChatSession, "chat_sessions"),
        (ChatMessage, "chat_messages"),
    ],
)
async def test_every_model_hydrates_like_tortoise(
    tokendb_clean: str, make_api_key, model: type[Model], table: str
) -> None:
    api_key, _ = await make_api_key(
        permissions=["chat", "embeddings"], expires_at=datetime.now(UTC) + timedelta(days=1)
    )
    await make_api_key()  # NULL expires_at, last_used_at
    await tokendb.charge(user=api_key.user_id, amount=3, reference_id=uuid.uuid4())
    session = await tokendb.start_chat(api_key=api_key, model="gpt")
    await tokendb.add_message(session=session, role="assistant", content="hi", tokens=2)
    await tokendb.end_chat(session=session)
    await tokendb.start_chat(api_key=api_key, model="open")  # NULL ended_at
    rows = await _db.read(f"SELECT * FROM {table}")
    assert rows
    for row in rows:
        same_instance(_rows.to_model(model, row), model._init_from_db(**row))
    page = _rows.to_models(model, rows)  # the plan per column layout of a list page
    assert len(page) == len(rows)
    for built, row in zip(page, rows, strict=True):
        same_instance(built, model._init_from_db(**row))


async def test_prefixed_columns_hydrate_the_second_model_of_a_join(
    tokendb_clean: str, make_user
) -> None:
    user = await make_user()
    # Every column, whatever later migrations add (held_tokens came with holds).
    (row,) = await _db.read(
        f"SELECT 1 AS other, {_sql.select_list(User, 'u', 'u_')} FROM users u WHERE id = $1",
        user.id,
    )
    (plain,) = await _db.read("SELECT * FROM users WHERE id = $1", user.id)
    same_instance(_rows.to_model(User, row, prefix="u_"), User._init_from_db(**plain))


async def test_omitted_columns_hydrate_a_partial_instance_without_them(
    tokendb_clean: str, make_user
) -> None:
    """What verify_api_key builds its user with: the balance left out of the statement."""
    user = await make_user()
    omit = ("token_balance", "held_tokens")
    (row,) = await _db.read(
        f"SELECT {_sql.select_list(User, 'u', 'u_', omit=omit)} FROM users u WHERE id = $1",
        user.id,
    )
    (plain,) = await _db.read("SELECT * FROM users WHERE id = $1", user.id)
    expected = User._init_from_db(**{k: v for k, v in plain.items() if k not in omit})
    assert expected._partial
    same_instance(_rows.hydrator(User, "u_", omit=omit)(row), expected)
    with pytest.raises(KeyError):  # a hydrator bound for a hot path has no fallback
        _rows.hydrator(User, "u_")(row)


async def test_a_row_missing_columns_falls_back_to_a_partial_instance(
    tokendb_clean: str, make_user
) -> None:
    user = await make_user()
    (row,) = await _db.read("SELECT id, email FROM users WHERE id = $1", user.id)
    partial = _rows.to_model(User, row)
    assert partial._partial and (partial.id, partial.email) == (user.id, user.email)


async def test_a_page_of_rows_missing_columns_falls_back_to_partial_instances(
    tokendb_clean: str, make_user
) -> None:
    users = [await make_user(), await make_user()]
    rows = await _db.read("SELECT id, email FROM users ORDER BY id")
    page = _rows.to_models(User, rows)
    assert [(u.id, u.email, u._partial) for u in page] == sorted(
        (u.id, u.email, True) for u in users
    )
    assert _rows.to_models(User, []) == []


async def test_a_page_of_mappings_hydrates_row_by_row(tokendb_clean: str, make_user) -> None:
    """Rows that are not asyncpg records (a dict, a UUID as text) take to_model's path."""
    user = await make_user()
    (row,) = await _db.read("SELECT * FROM users WHERE id = $1", user.id)
    as_text = {**row, "id": str(row["id"])}
    (built,) = _rows.to_models(User, [as_text])
    same_instance(built, User._init_from_db(**as_text))
    assert built.id == user.id


async def test_a_page_model_saves_and_compares_like_a_fetched_one(
    tokendb_clean: str, make_user
) -> None:
    user = await make_user()
    await tokendb.charge(user=user, amount=1)
    (fast,) = _rows.to_models(User, await _db.read("SELECT * FROM users WHERE id = $1", user.id))
    fetched = await User.get(id=user.id)
    assert fast == fetched and hash(fast) == hash(fetched)
    assert fast.created_at.tzinfo == fetched.created_at.tzinfo
    fast.name = "Renamed"
    await fast.save(update_fields=["name"])
    assert (await User.get(id=user.id)).name == "Renamed"
