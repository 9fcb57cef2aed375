"""SQL that follows the models: column lists from their metadata, and the owner check.

No statement names a table's columns by hand. :func:`insert` takes the
column list from the model (a new column that is nullable or has a database
default, Tortoise's ``db_default``, gets that default until a statement
gives it a value; a new ``NOT NULL`` column without one stops the import,
naming the table, until every statement says what goes in it),
statements read rows back whole (``RETURNING *``, ``SELECT *``), and
:func:`select_list` reads every column of a model side by side with
another's, so model instances built from a row (:func:`tokendb._rows.to_model`)
are never partial. Names are quoted (:func:`quoted`), as Tortoise quotes
them when it creates the table: a column named ``order`` or ``Label`` is
written as the model names it. ``tests/test_sql.py`` shows a new column
reaching every statement.
"""

from __future__ import annotations

from collections.abc import Mapping

from tortoise.models import Model

__all__ = ["columns", "insert", "owned_by", "quoted", "select_list"]


def quoted(name: str) -> str:
    """``name`` as a quoted SQL identifier: kept as written, never read as a keyword."""
    return '"' + name.replace('"', '""') + '"'


def columns(model: type[Model]) -> tuple[str, ...]:
    """``model``'s database columns, in declaration order.

    Works before Tortoise is initialised (statements are built at import):
    a foreign key ``user`` is its column ``user_id`` (or its ``source_field``).
    """
    return tuple(_optional(model))


def _optional(model: type[Model]) -> dict[str, bool]:
    """Each column of ``model`` (in declaration order) and whether an INSERT may leave it
    out: it may be NULL, or the database fills it (``db_default``, a generated key)."""
    meta = model._meta
    found: dict[str, bool] = {}
    for name, field in meta.fields_map.items():
        if name in meta.fk_fields or name in meta.o2o_fields:
            key = f"{name}_id"
            column = meta.fields_db_projection.get(key) or field.source_field or key
        elif name in meta.fields_db_projection:
            column = meta.fields_db_projection[name]
        else:
            continue  # a reverse relation: no column
        found.setdefault(
            column, bool(field.null or field.has_db_default() or getattr(field, "generated", False))
        )
    return found


def insert(model: type[Model], values: Mapping[str, str], *, source: str | None = None) -> str:
    """``INSERT INTO <table> (<columns>) SELECT <values> [FROM <source>]``.

    ``values`` maps columns to SQL expressions, in any order (the model's
    order is used). A column it leaves out that is nullable or has a
    database default gets that default; any other ``NOT NULL`` one raises
    :class:`LookupError` naming the table and column, as does a key that is
    not a column, so a new required column stops the import until every
    statement says what goes in it. Append ``RETURNING *`` to read the row
    back whole.
    """
    table = model._meta.db_table
    every = _optional(model)
    unknown = sorted(set(values) - set(every))
    if unknown:
        raise LookupError(f"{table} has no column {', '.join(unknown)}")
    missing = [
        column for column, optional in every.items() if column not in values and not optional
    ]
    if missing:
        raise LookupError(f"INSERT INTO {table}: no value for NOT NULL column {', '.join(missing)}")
    named = [column for column in every if column in values]
    sql = (
        f"INSERT INTO {quoted(table)} ({', '.join(map(quoted, named))})\n"
        f"SELECT {', '.join(values[c] for c in named)}"
    )
    return sql if source is None else f"{sql}\nFROM {source}"


def select_list(model: type[Model], alias: str, prefix: str, *, omit: tuple[str, ...] = ()) -> str:
    """``alias.column AS prefixcolumn, …`` for every column of ``model`` but those in ``omit``.

    Read the row back with ``tokendb._rows.to_model(model, row, prefix)``
    (``tokendb._rows.hydrator(model, prefix, omit=omit)`` when columns are omitted).
    """
    return ", ".join(
        f"{alias}.{quoted(column)} AS {quoted(prefix + column)}"
        for column in columns(model)
        if column not in omit
    )


def owned_by(parameter: str, column: str = "user_id") -> str:
    """The optional owner check: true when ``parameter`` is NULL or names the row's owner.

    Every operation with an optional ``user=`` puts this in its ``WHERE``:
    another user's row is then not found, which does not reveal that it exists.
    """
    return f"({parameter}::uuid IS NULL OR {column} = {parameter})"
