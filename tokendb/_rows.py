"""Rows to model instances, without Tortoise's per-field generic dispatch.

``Model._init_from_db(**row)`` builds a keyword dict per row, sets four
bookkeeping attributes through ``Model.__setattr__`` and calls
``to_python_value`` on every UUID, datetime and enum column: about 6 µs a
row, which is most of what a 50-row ledger page costs above the wire. The
hydrator of a model is planned once from its fields (:func:`hydrator`) and then
writes the instance's ``__dict__`` directly, converting only what needs it.

The result is the instance ``_init_from_db`` builds, attribute for attribute
(``tests/test_rows.py`` checks that on real rows of every model); a row that
lacks a column falls back to ``_init_from_db``, which marks it partial.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

import asyncpg
from tortoise.fields.data import CharEnumFieldInstance, DatetimeField, JSONField, UUIDField
from tortoise.models import Model
from tortoise.timezone import get_default_timezone, get_use_tz

__all__ = ["hydrator", "to_model", "to_models"]

M = TypeVar("M", bound=Model)
Row = Mapping[str, Any] | asyncpg.Record


def to_model(model: type[M], row: Row, prefix: str = "") -> M:
    """A ``model`` instance from a row holding all of the model's columns.

    With ``prefix``, the row names them ``prefix + column`` (a join that
    returns two models' columns side by side).
    """
    hydrate: Callable[[Row], M] = hydrator(model, prefix)
    try:
        return hydrate(row)
    except KeyError:
        # A column is missing: Tortoise's own path, which makes a partial instance.
        names = list(row.keys())  # iterating a Record yields its values, not its keys
        columns = {key[len(prefix) :]: row[key] for key in names if key.startswith(prefix)}
        partial: M = model._init_from_db(**columns)
        return partial


@functools.cache
def hydrator(model: type[M], prefix: str = "", omit: tuple[str, ...] = ()) -> Callable[[Row], M]:
    """The function that builds ``model`` instances from rows (what :func:`to_model`
    uses), planned once per arguments; a hot path calls it directly.

    It raises ``KeyError`` on a row that lacks a column (no fallback). With
    ``omit`` (columns the statement leaves out, :func:`tokendb._sql.select_list`'s
    ``omit``), the instances lack those attributes and are partial (``save()`` refuses them).
    """
    meta = model._meta
    as_is = [(prefix + key, attr) for key, attr, _ in meta.db_native_fields if key not in omit]
    uuids: list[tuple[str, str]] = []
    datetimes: list[tuple[str, str, Callable[[Any], Any]]] = []
    enums: list[tuple[str, str, Any]] = []
    converted: list[tuple[str, str, Callable[[Any], Any]]] = []
    for key, attr, field in meta.db_default_fields:
        if key not in omit:
            converted.append((prefix + key, attr, functools.partial(_not_none, field.field_type)))
    for column, attr, field in meta.db_complex_fields:
        if column in omit:
            continue
        key = prefix + column
        if type(field) is UUIDField:
            uuids.append((key, attr))
        elif type(field) is DatetimeField:
            datetimes.append((key, attr, field.to_python_value))
        elif isinstance(field, CharEnumFieldInstance):
            enums.append((key, attr, field.enum_type))
        elif type(field) is JSONField:
            converted.append((key, attr, _json(field.to_python_value)))
        else:
            converted.append((key, attr, field.to_python_value))
    custom_pk = meta.db_pk_column not in meta.generated_db_fields
    # Straight-line code, generated once per plan: no loops, no tuple unpacking
    # per column (the loops were half of what building an instance cost).
    names: dict[str, Any] = {
        "new": model.__new__,
        "model": model,
        "UUID": UUID,
        "datetime": datetime,
        "get_default_timezone": get_default_timezone,
        "get_use_tz": get_use_tz,
    }
    lines = [
        "def hydrate(row):",
        "    instance = new(model)",
        "    values = instance.__dict__",
        f"    values['_partial'] = {bool(omit)!r}",
        "    values['_saved_in_db'] = True",
        f"    values['_custom_generated_pk'] = {custom_pk!r}",
        "    values['_await_when_save'] = {}",
    ]
    for key, attr in as_is:
        lines.append(f"    values[{attr!r}] = row[{key!r}]")
    for key, attr in uuids:
        lines += [
            f"    value = row[{key!r}]",
            f"    values[{attr!r}] = value if value is None or isinstance(value, UUID) "
            "else UUID(value)",
        ]
    if datetimes:
        lines.append("    aware_tz = get_default_timezone() if get_use_tz() else None")
    for number, (key, attr, to_python) in enumerate(datetimes):
        names[f"datetime_{number}"] = to_python
        lines += [  # what DatetimeField does with an aware value
            f"    value = row[{key!r}]",
            "    if aware_tz and isinstance(value, datetime) and value.utcoffset() is not None:",
            f"        values[{attr!r}] = value.astimezone(aware_tz)",
            "    else:",
            f"        values[{attr!r}] = datetime_{number}(value)",
        ]
    for number, (key, attr, enum) in enumerate(enums):
        names[f"enum_{number}"] = enum
        lines += [
            f"    value = row[{key!r}]",
            f"    values[{attr!r}] = None if value is None else "
            f"enum_{number}._value2member_map_.get(value) or enum_{number}(value)",
        ]
    for number, (key, attr, to_python) in enumerate(converted):
        names[f"convert_{number}"] = to_python
        lines.append(f"    values[{attr!r}] = convert_{number}(row[{key!r}])")
    lines.append("    return instance")
    exec(compile("\n".join(lines), f"<tokendb._rows: {model.__name__}{prefix}>", "exec"), names)
    hydrate: Callable[[Row], M] = names["hydrate"]
    return hydrate


_JSON_MEMO = 1024
"""Distinct JSON texts remembered per column (a key's scopes: a handful in practice)."""


def _json(decode: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``decode`` (``JSONField.to_python_value``), remembering flat lists of strings.

    ``api_keys.permissions`` is one on every lookup of a key, and nearly every
    key has the same few: a fresh list copied from the remembered one costs a
    tenth of decoding the text again. Anything else is decoded every time.
    """
    memo: dict[str, tuple[str, ...]] = {}

    def convert(value: Any) -> Any:
        if type(value) is str:
            known = memo.get(value)
            if known is not None:
                return list(known)
            decoded = decode(value)
            if (
                type(decoded) is list
                and len(memo) < _JSON_MEMO
                and all(type(item) is str for item in decoded)
            ):
                memo[value] = tuple(decoded)
            return decoded
        return decode(value)

    return convert


def _not_none(convert: Callable[[Any], Any], value: Any) -> Any:
    return None if value is None else convert(value)


def to_models(model: type[M], rows: Sequence[Row]) -> list[M]:
    """:func:`to_model` of every row of one statement's result (a list page).

    The rows of one result share their columns: the model's :func:`hydrator`
    builds them all, and a result that lacks a column takes :func:`to_model`'s
    path (partial instances) row by row.
    """
    hydrate: Callable[[Row], M] = hydrator(model)
    try:
        return [hydrate(row) for row in rows]
    except KeyError:
        return [to_model(model, row) for row in rows]
