"""Argument checks shared by the operations: bad input is rejected before anything is written.

Each helper returns the normalised value or raises
:class:`~tokendb.errors.ValidationError` naming the argument.

*Exact types.* What is checked is what is sent: a subclass of ``int``,
``str``, ``UUID`` or ``datetime`` can override the methods a check calls
(``__lt__``, ``__len__``, ``strip``, ``utcoffset``…) while the driver
encodes its underlying value, so every helper first turns its argument into
an instance of the exact built-in type (:func:`exact_int`,
:func:`exact_str`…) and checks and returns that.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar
from uuid import UUID

import asyncpg
import asyncpg.pgproto.pgproto
from tortoise.models import Model

from tokendb.errors import ValidationError
from tokendb.models import User

INT4_MAX = 2**31 - 1
"""The largest value of a PostgreSQL ``integer`` column (balances, amounts, tokens)."""

E = TypeVar("E", bound=StrEnum)


def exact_int(value: Any, field: str) -> int:
    """``value`` as an exact ``int``: an ``int``, or what ``operator.index`` makes of it.

    ``bool`` and floats are refused. An ``int`` subclass counts for the digits
    it holds (what the driver would encode), whatever its ``__index__``,
    ``__int__`` or comparisons say; another integer type (numpy's) for what
    its ``__index__`` returns. The plain ``int`` returned is what the caller
    checks and sends.
    """
    if type(value) is int:
        return value
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise ValidationError(field, f"must be a whole number, got {type(value).__name__}")
    try:
        number = operator.index(value)
    except Exception:
        raise ValidationError(
            field, f"must be a whole number, got {type(value).__name__}"
        ) from None
    return int.__index__(number)  # a plain int, also from an __index__ returning a subclass


def exact_str(value: str) -> str:
    """``value`` as an exact ``str`` (a copy of a subclass's characters)."""
    return value if type(value) is str else str.__str__(value)


# asyncpg's own UUID (what every uuid column reads back as) is the driver's:
# it is encoded from the bytes it holds, whatever a check asked it.
_EXACT_UUIDS = (UUID, asyncpg.pgproto.pgproto.UUID)


def exact_uuid(value: UUID) -> UUID:
    """``value`` as an exact ``UUID`` (or asyncpg's), made from its ``bytes``."""
    if type(value) in _EXACT_UUIDS:
        return value
    try:
        return UUID(bytes=value.bytes)
    except Exception:
        raise ValidationError("id", "not a valid UUID") from None


def ref_id(value: Any, field: str, model: type[Model]) -> UUID:
    """The id of ``value``: an instance of ``model``, a UUID, or a UUID string."""
    if isinstance(value, model):
        pk = value.pk
        if isinstance(pk, UUID):
            return exact_uuid(pk)
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
        try:
            return exact_uuid(value)
        except ValidationError:
            raise ValidationError(field, "not a valid UUID") from None
    if isinstance(value, str):
        try:
            return UUID(exact_str(value))
        except ValueError:
            raise ValidationError(field, "not a valid UUID") from None
    raise ValidationError(field, f"expected a UUID, got {type(value).__name__}")


def optional_uuid(value: Any, field: str) -> UUID | None:
    return None if value is None else uuid_value(value, field)


def whole_number(value: Any, field: str, *, minimum: int, maximum: int = INT4_MAX) -> int:
    """An exact ``int`` (never a bool or a float) within ``[minimum, maximum]``.

    See :func:`exact_int`: the range is checked on the number that is sent.
    """
    number = exact_int(value, field)
    if number < minimum:
        raise ValidationError(field, f"must be at least {minimum}, got {number}")
    if number > maximum:
        raise ValidationError(field, f"must be at most {maximum}, got {number}")
    return number


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
    value = exact_str(value)
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
            return enum(exact_str(value))
        except ValueError:
            pass
    allowed = ", ".join(member.value for member in enum)
    raise ValidationError(field, f"must be one of {allowed}; got {value!r}")


def aware_datetime(value: Any, field: str) -> datetime:
    """A timezone-aware, exact ``datetime`` with a fixed offset (its tzinfo asked once)."""
    if not isinstance(value, datetime):
        raise ValidationError(field, f"must be a datetime, got {type(value).__name__}")
    try:
        # datetime's own isoformat reads the fields and asks tzinfo for the offset once.
        exact = datetime.fromisoformat(datetime.isoformat(value))
    except Exception:
        raise ValidationError(field, "is not a valid datetime") from None
    if exact.tzinfo is None:
        raise ValidationError(field, "must be timezone-aware (e.g. datetime.now(UTC))")
    return exact


def exact_timedelta(value: timedelta) -> timedelta:
    """``value`` as an exact ``timedelta`` (from the fields stored in it)."""
    if type(value) is timedelta:
        return value
    return timedelta(
        days=timedelta.days.__get__(value),
        seconds=timedelta.seconds.__get__(value),
        microseconds=timedelta.microseconds.__get__(value),
    )


def page_limit(value: Any, field: str = "limit", *, maximum: int = 1000) -> int:
    return whole_number(value, field, minimum=1, maximum=maximum)
