"""Tests for tokendb._sql: SQL follows the models, and a new column reaches every statement."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import asyncpg
import pytest
from tortoise import fields
from tortoise.models import Model

import tokendb
from tokendb import _sql
from tokendb.models import ApiKey, ChatMessage, ChatSession, TokenTransaction, User
from tokendb.testing import test_server_url as server_url

ROOT = Path(__file__).resolve().parent.parent
MODELS = (User, ApiKey, TokenTransaction, ChatSession, ChatMessage)


class Widget(Model):
    """A model of the test's own, with every kind of column the helper reads."""

    id = fields.UUIDField(primary_key=True)
    owner: fields.ForeignKeyRelation[User] = fields.ForeignKeyField(
        "tokendb.User", related_name=False
    )
    label = fields.CharField(max_length=20)
    note = fields.TextField(null=True)

    class Meta:
        table = "widgets"
        app = "sql_tests"


class Switch(Model):
    """Columns the database fills: a generated key and a NOT NULL one with a db_default."""

    id = fields.IntField(primary_key=True)
    label = fields.CharField(max_length=20)
    on = fields.BooleanField(db_default=False)

    class Meta:
        table = "switches"
        app = "sql_tests"


class Gadget(Model):
    """Columns whose names only work quoted: a reserved word, and capitals."""

    id = fields.UUIDField(primary_key=True)
    position = fields.IntField(source_field="order")
    label = fields.CharField(max_length=20, source_field="Label")

    class Meta:
        table = "gadgets"
        app = "sql_tests"


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_the_columns_are_what_tortoise_maps_after_init(tokendb_db: str, model: type[Model]) -> None:
    assert set(_sql.columns(model)) == set(model._meta.fields_db_projection.values())


def test_columns_of_a_model_before_init_include_its_foreign_keys() -> None:
    assert _sql.columns(Widget) == ("id", "owner_id", "label", "note")


def test_an_insert_names_every_column_given_and_leaves_nullable_ones_to_the_database() -> None:
    sql = _sql.insert(Widget, {"label": "$2", "id": "$1", "owner_id": "u.id"}, source="users u")
    assert sql == (
        'INSERT INTO "widgets" ("id", "owner_id", "label")\nSELECT $1, u.id, $2\nFROM users u'
    )
    assert '"note"' in _sql.insert(
        Widget, {"id": "$1", "owner_id": "$2", "label": "$3", "note": "$4"}
    )


def test_an_insert_leaves_what_the_database_fills_to_the_database() -> None:
    assert _sql.insert(Switch, {"label": "$1"}) == 'INSERT INTO "switches" ("label")\nSELECT $1'


def test_an_insert_without_a_required_column_names_it() -> None:
    with pytest.raises(LookupError, match="widgets: no value for NOT NULL column owner_id, label"):
        _sql.insert(Widget, {"id": "$1"})
    with pytest.raises(LookupError, match="widgets has no column colour"):
        _sql.insert(Widget, {"id": "$1", "owner_id": "$2", "label": "$3", "colour": "$4"})


def test_a_select_list_reads_every_column_under_a_prefix() -> None:
    assert _sql.select_list(Widget, "w", "widget_") == (
        'w."id" AS "widget_id", w."owner_id" AS "widget_owner_id", w."label" AS "widget_label", '
        'w."note" AS "widget_note"'
    )


async def test_statements_quote_the_column_names_the_model_gives(tokendb_db: str) -> None:
    """Tortoise creates a column as the model names it (quoted), so the statements
    built from the model must name it the same way: as written, not folded to lower
    case, and never read as a keyword."""
    conn = await asyncpg.connect(tokendb_db)
    try:
        await conn.execute(
            'CREATE TEMP TABLE gadgets (id uuid PRIMARY KEY, "order" int NOT NULL, '
            '"Label" varchar(20) NOT NULL)'
        )
        gadget_id = uuid.uuid4()
        insert = _sql.insert(Gadget, {"id": "$1", "order": "$2", "Label": "$3"})
        written = await conn.fetch(f"{insert}\nRETURNING *", gadget_id, 7, "seven")
        assert [dict(row) for row in written] == [{"id": gadget_id, "order": 7, "Label": "seven"}]
        (read,) = await conn.fetch(
            f"SELECT {_sql.select_list(Gadget, 'g', 'gadget_')} FROM gadgets g"
        )
        assert dict(read.items()) == {
            "gadget_id": gadget_id,
            "gadget_order": 7,
            "gadget_Label": "seven",
        }
    finally:
        await conn.close()


def test_the_owner_check() -> None:
    assert _sql.owned_by("$2") == "($2::uuid IS NULL OR user_id = $2)"
    assert _sql.owned_by("$2", "t.user_id") == "($2::uuid IS NULL OR t.user_id = $2)"


def test_no_statement_lists_a_tables_columns_by_hand() -> None:
    """Every INSERT is built by _sql.insert: none is written out in a module."""
    for path in sorted((ROOT / "tokendb").rglob("*.py")):
        text = path.read_text()
        for table in (model._meta.db_table for model in MODELS):
            by_hand = re.search(rf'INSERT INTO "?{table}"?\s*\(\s*"?\w+"?\s*,', text)
            assert by_hand is None, f"{path.name} writes {table}'s columns by hand"


# What a migration adding columns would do: a nullable column with a default and a NOT NULL
# one with a database default (Tortoise's db_default), on every table, and the same fields
# on every model before tokendb builds its statements.
NEW_COLUMN_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, types, uuid
    from tortoise import fields

    package = types.ModuleType("tokendb")
    package.__path__ = [sys.argv[2]]
    sys.modules["tokendb"] = package  # tokendb.models alone, before any statement is built
    from tokendb import models

    MODELS = (models.User, models.ApiKey, models.TokenTransaction, models.ChatSession,
              models.ChatMessage)
    for model in MODELS:
        model._meta.add_field("note", fields.TextField(null=True))
        model._meta.add_field("flag", fields.BooleanField(db_default=True))  # NOT NULL
    del sys.modules["tokendb"]
    import tokendb  # the package, on the widened models

    seen = []

    def check(what, instance):
        assert not instance._partial, f"{what}: a partial instance"
        assert instance.note == "new", f"{what}: note is {instance.note!r}"
        assert instance.flag is True, f"{what}: flag is {instance.flag!r}"
        seen.append(what)

    async def main(url):
        await tokendb.migrate(url)
        import asyncpg
        conn = await asyncpg.connect(url)
        for model in MODELS:
            await conn.execute(
                f"ALTER TABLE {model._meta.db_table} ADD COLUMN note text DEFAULT 'new', "
                "ADD COLUMN flag boolean NOT NULL DEFAULT true"
            )
        await conn.close()
        async with tokendb.connect(url):
            from tokendb import passwords
            with passwords.parameters(**passwords.CHEAP_PARAMETERS):
                user = await tokendb.create_user(
                    email="new@example.com", password="correct horse", name="N"
                )
            check("create_user", user)
            check("top_up", await tokendb.top_up(user=user, amount=1000))
            reference = uuid.uuid4()
            check("charge", await tokendb.charge(user=user, amount=5, reference_id=reference))
            batch = await tokendb.charge_many(
                items=[{"user": user, "amount": 5, "reference_id": reference},
                       {"user": user, "amount": 3}]
            )
            check("charge_many (repeat of a prior row)", batch[0])
            check("charge_many (charged)", batch[1])
            check("refund", await tokendb.refund(transaction=batch[1]))
            key, secret = await tokendb.issue_api_key(user=user, name="k")
            check("issue_api_key", key)
            verified = await tokendb.verify_api_key(secret=secret)
            check("verify_api_key", verified)
            owner = verified.user  # partial by design: no balance (verify_api_key's docstring)
            assert owner._partial and not hasattr(owner, "token_balance")
            assert owner.note == "new" and owner.flag is True
            seen.append("verify_api_key (its user, without its balance)")
            session = await tokendb.start_chat(api_key=key, model="m")
            check("start_chat", session)
            check("add_message", await tokendb.add_message(
                session=session, role="user", content="hi", tokens=2))
            check("end_chat", await tokendb.end_chat(session=session))
            for row in await tokendb.list_transactions(user=user):
                check(f"list_transactions ({row.type})", row)
            assert await tokendb.audit_ledger() == []
        print(len(seen), "instances carry the new column")

    from tokendb.testing import throwaway_database
    async def run():
        async with throwaway_database(sys.argv[1], prefix="tokendb_column") as url:
            await main(url)
    asyncio.run(run())
    """
)


def test_a_new_model_column_reaches_every_statement(pytestconfig: pytest.Config) -> None:
    """Columns added to every table and every model (nullable with a database default,
    and NOT NULL with a db_default) come back in every instance tokendb returns: written
    by its INSERTs (which leave them to the default), read back by RETURNING *, SELECT *
    and the prefixed select lists of the batch and the key lookup. No statement was
    edited for them."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            NEW_COLUMN_SCRIPT,
            server_url(pytestconfig),
            str(Path(tokendb.__file__).parent),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "instances carry the new column" in result.stdout
