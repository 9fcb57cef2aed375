"""Argument checks shared by the operations: bad input is rejected before anything is written.

Each helper returns the normalised value or raises
:class:`~tokendb.errors.ValidationError` naming the argument.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar
from uuid import UUID

import asyncpg
from tortoise.models import Model

from tokendb.errors import ValidationError
from tokendb.models import User

INT4_MAX = 2**31 - 1
"""The largest value of a PostgreSQL ``integer`` column (balances, amounts, tokens)."""

E = TypeVar("E", bound=StrEnum)


def ref_id(value: Any, field: str, model: type[Model]) -> UUID:
    """The id of ``value``: an instance of ``model``, a UUID, or a UUID string."""
    if isinstance(value, model):
        pk = value.pk
        if isinstance(pk, UUID):
            return pk
        raise ValidationError(field, f"the {model.__name__} has no id")
    return uuid_value(value, field)


def optional_ref_id(value: Any, field: str, model: type[Model]) -> UUID | None:
    """:func:`ref_id` of ``value``, or None when it is None."""
    return None if value is None else ref_id(value, field, model)


def owner(value: Any) -> UUID | None:
    """The id of an operation's optional ``user=`` owner check, or None without one.

    The statement checks it with :func:`tokendb._sql.owned_by`.
    """
    return None if value is None else ref_id(value, "user", User)


@contextmanager
def fits_integer_column(field: str) -> Iterator[None]:
    """``with``: the database's integer overflow (a sum past :data:`INT4_MAX`) is bad input.

    Python checks each argument; only the database sees the sum it is added to.
    """
    try:
        yield
    except asyncpg.NumericValueOutOfRangeError as exc:
        raise past_integer_column(field) from exc


def past_integer_column(field: str) -> ValidationError:
    """The error for a sum past :data:`INT4_MAX` that only the database saw (see above)."""
    return ValidationError(field, f"would take a total past {INT4_MAX}")


def uuid_value(value: Any, field: str) -> UUID:
    if isinstance(value, UUID):
        return value
    if isinstance(value, str):
        try:
            return UUID(value)
        except ValueError:
            raise ValidationError(field, "not a valid UUID") from None
    raise ValidationError(field, f"expected a UUID, got {type(value).__name__}")


def optional_uuid(value: Any, field: str) -> UUID | None:
    return None if value is None else uuid_value(value, field)


def whole_number(value: Any, field: str, *, minimum: int, maximum: int = INT4_MAX) -> int:
    """An ``int`` (never a bool or a float) within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"must be a whole number, got {type(value).__name__}")
    if value < minimum:
        raise ValidationError(field, f"must be at least {minimum}, got {value}")
    if value > maximum:
        raise ValidationError(field, f"must be at most {maximum}, got {value}")
    return int(value)


def positive_amount(value: Any, field: str = "amount") -> int:
    """A token amount: a whole number from 1 to the integer column's maximum."""
    return whole_number(value, field, minimum=1)


def text(
    value: Any,
    field: str,
    *,
    max_length: int,
    min_length: int = 1,
    strip: bool = True,
) -> str:
    """A string without NUL bytes (PostgreSQL text cannot hold them), of a bounded length."""
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, got {type(value).__name__}")
    result: str = value.strip() if strip else value
    if "\x00" in result:
        raise ValidationError(field, "must not contain NUL characters")
    if len(result) < min_length:
        raise ValidationError(
            field, "must not be empty" if min_length == 1 else f"needs {min_length}+ characters"
        )
    if len(result) > max_length:
        raise ValidationError(field, f"must be at most {max_length} characters, got {len(result)}")
    if has_lone_surrogate(result):
        raise ValidationError(field, "is not valid Unicode (lone surrogate)")
    return result


def optional_text(value: Any, field: str, *, max_length: int) -> str | None:
    if value is None:
        return None
    return text(value, field, max_length=max_length, min_length=0)


def has_lone_surrogate(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def enum_member(value: Any, enum: type[E], field: str) -> E:
    """A member of ``enum`` given as the member or its string value."""
    if isinstance(value, enum):
        return value
    if isinstance(value, str):
        try:
            return enum(value)
        except ValueError:
            pass
    allowed = ", ".join(member.value for member in enum)
    raise ValidationError(field, f"must be one of {allowed}; got {value!r}")


def aware_datetime(value: Any, field: str) -> datetime:
    if not isinstance(value, datetime):
        raise ValidationError(field, f"must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValidationError(field, "must be timezone-aware (e.g. datetime.now(UTC))")
    return value


def page_limit(value: Any, field: str = "limit", *, maximum: int = 1000) -> int:
    return whole_number(value, field, minimum=1, maximum=maximum)
