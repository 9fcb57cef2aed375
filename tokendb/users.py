"""Users: registration with a signup bonus, password login, lookups, roles.

A user's ``token_balance`` is only ever changed together with a ledger row
(see :mod:`tokendb.ledger`); even the starting balance is written as a
``bonus`` row in the same statement that creates the user, so
``balance == Σ ledger amounts`` holds from the first commit.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg
from email_validator import EmailNotValidError, validate_email

from tokendb import _args, _db, _key_cache, _ledger_sql, passwords
from tokendb._rows import to_model
from tokendb._translate import translated
from tokendb.errors import EmailTaken, InvalidCredentials, NotFound, ValidationError
from tokendb.ids import new_id
from tokendb.models import User, UserRole

__all__ = [
    "MIN_PASSWORD_LENGTH",
    "SIGNUP_BONUS",
    "authenticate",
    "change_password",
    "create_user",
    "get_user",
    "list_users",
    "normalize_email",
    "set_role",
]

SIGNUP_BONUS = 100
"""Tokens a new user starts with (written as a ``bonus`` ledger row)."""
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024  # bounds the hashing work one request can cause

_EMAIL_CONSTRAINTS = {"users_email_key", "users_email_lower_key"}


def normalize_email(email: Any) -> str:
    """``email`` trimmed, validated and lowercased, as tokendb stores it.

    Raises :class:`ValidationError` (field ``email``) for an invalid address.
    """
    value = _args.text(email, "email", max_length=255)
    try:
        result = validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValidationError("email", str(exc)) from None
    normalized = result.normalized.lower()
    if len(normalized) > 255:
        raise ValidationError("email", "must be at most 255 characters")
    return normalized


def _password(value: Any, field: str = "password") -> str:
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, got {type(value).__name__}")
    password = _args.exact_str(value)
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValidationError(field, f"must be at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise ValidationError(field, f"must be at most {MAX_PASSWORD_LENGTH} characters")
    if _args.has_lone_surrogate(password):
        raise ValidationError(field, "is not valid Unicode (lone surrogate)")
    return password


@translated
async def create_user(
    *,
    email: str,
    password: str,
    name: str,
    role: UserRole | str = UserRole.USER,
    signup_bonus: int = SIGNUP_BONUS,
) -> User:
    """Register a user; the starting balance ``signup_bonus`` is a ``bonus`` ledger row.

    ``email`` is stored trimmed and lowercased; ``name`` is 1–100 characters;
    ``password`` at least 8 characters, stored as an argon2id hash.

    Raises:
        ValidationError: bad input; nothing written.
        EmailTaken: the address is registered, in any letter case.
        DatabaseUnavailable: the database is unreachable, or the connection was lost
            (``.outcome_unknown`` once the write was sent).
    """
    normalized = normalize_email(email)
    clean_name = _args.text(name, "name", max_length=100)
    member = _args.enum_member(role, UserRole, "role")
    bonus = _args.whole_number(signup_bonus, "signup_bonus", minimum=0)
    password_hash = await passwords.hash_password(_password(password))
    try:
        rows = await _db.write(
            _ledger_sql.CREATE_USER,
            new_id(),
            normalized,
            password_hash,
            clean_name,
            member.value,
            bonus,
            new_id(),
        )
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name in _EMAIL_CONSTRAINTS:
            raise EmailTaken(normalized) from exc
        raise
    return to_model(User, rows[0])


@translated
async def authenticate(*, email: str, password: str) -> User:
    """The user with ``email`` whose password is ``password``.

    An unknown email still costs one hash verification, so timing does not
    tell it from a wrong password. A hash made with older argon2 parameters
    is replaced on success.

    Raises:
        InvalidCredentials: unknown email or wrong password (deliberately the same).
        DatabaseUnavailable: the database is unreachable, or the connection was lost
            (``.outcome_unknown`` once the write was sent).
    """
    if not isinstance(password, str) or len(password := _args.exact_str(password)) > (
        MAX_PASSWORD_LENGTH
    ):
        raise InvalidCredentials()
    try:
        normalized = normalize_email(email)
    except ValidationError:
        normalized = None
    rows = (
        await _db.read("SELECT * FROM users WHERE email = $1", normalized)
        if normalized is not None
        else []
    )
    stored_hash = rows[0]["password_hash"] if rows else None
    if not await passwords.verify_password(stored_hash, password) or not rows:
        raise InvalidCredentials()
    user = to_model(User, rows[0])
    if passwords.needs_rehash(user.password_hash):
        new_hash = await passwords.hash_password(password)
        # Conditional on the old hash: a concurrent change_password wins.
        updated = await _db.write(
            "UPDATE users SET password_hash = $2, updated_at = clock_timestamp() "
            "WHERE id = $1 AND password_hash = $3 RETURNING *",
            user.id,
            new_hash,
            user.password_hash,
        )
        if updated:
            user = to_model(User, updated[0])
    return user


@translated
async def get_user(*, user_id: User | UUID | str | None = None, email: str | None = None) -> User:
    """The user with ``user_id`` or ``email`` (exactly one of them).

    Raises:
        NotFound: no such user.
        ValidationError: both or neither given, or a malformed id.
        DatabaseUnavailable: the database is unreachable.
    """
    if (user_id is None) == (email is None):
        raise ValidationError("user_id", "give exactly one of user_id and email")
    if user_id is not None:
        key = _args.ref_id(user_id, "user_id", User)
        rows = await _db.read("SELECT * FROM users WHERE id = $1", key)
        if not rows:
            raise NotFound("user", key)
    else:
        try:
            normalized = normalize_email(email)
        except ValidationError:
            raise NotFound("user", email) from None
        rows = await _db.read("SELECT * FROM users WHERE email = $1", normalized)
        if not rows:
            raise NotFound("user", normalized)
    return to_model(User, rows[0])


@translated
async def list_users(*, limit: int = 50, after: User | UUID | str | None = None) -> list[User]:
    """Users in creation order (ids are time-ordered), ``limit`` (1–1000) per page.

    ``after`` is the last user of the previous page (keyset pagination).

    Raises:
        ValidationError: a bad ``limit`` or ``after``.
        DatabaseUnavailable: the database is unreachable.
    """
    page = _args.page_limit(limit)
    if after is None:
        rows = await _db.read("SELECT * FROM users ORDER BY id LIMIT $1", page)
    else:
        cursor = _args.ref_id(after, "after", User)
        rows = await _db.read(
            "SELECT * FROM users WHERE id > $1 ORDER BY id LIMIT $2", cursor, page
        )
    return [to_model(User, row) for row in rows]


@translated
async def change_password(
    *,
    user: User | UUID | str,
    new_password: str,
    current_password: str | None = None,
) -> User:
    """Set a new password; when ``current_password`` is given it must match first.

    With ``current_password`` the write is conditional on the hash it was
    checked against, so it cannot overwrite a password changed meanwhile.

    Raises:
        ValidationError: the new password is too short or too long.
        InvalidCredentials: ``current_password`` is wrong, or the password
            changed meanwhile.
        NotFound: unknown user.
        DatabaseUnavailable: the database is unreachable, or the connection was lost
            (``.outcome_unknown`` once the write was sent).
    """
    user_id = _args.ref_id(user, "user", User)
    password = _password(new_password, "new_password")
    checked_hash: str | None = None
    if current_password is not None:
        if not isinstance(current_password, str) or len(
            current_password := _args.exact_str(current_password)
        ) > (MAX_PASSWORD_LENGTH):
            raise InvalidCredentials()
        rows = await _db.read("SELECT password_hash FROM users WHERE id = $1", user_id)
        if not rows:
            raise NotFound("user", user_id)
        checked_hash = rows[0]["password_hash"]
        if not await passwords.verify_password(checked_hash, current_password):
            raise InvalidCredentials()
    new_hash = await passwords.hash_password(password)
    rows = await _db.write(
        "UPDATE users SET password_hash = $2, updated_at = clock_timestamp() "
        "WHERE id = $1 AND ($3::text IS NULL OR password_hash = $3) RETURNING *",
        user_id,
        new_hash,
        checked_hash,
    )
    if not rows:
        if checked_hash is not None:
            raise InvalidCredentials()  # changed since we checked it
        raise NotFound("user", user_id)
    _key_cache.forget(f"u:{user_id}")  # verified keys carry their user: not the old one
    return to_model(User, rows[0])


@translated
async def set_role(*, user: User | UUID | str, role: UserRole | str) -> User:
    """Give ``user`` the ``role`` (``admin`` or ``user``).

    Raises:
        NotFound: unknown user.
        ValidationError: an unknown role or a malformed id.
        DatabaseUnavailable: the database is unreachable, or the connection was lost
            (``.outcome_unknown`` once the write was sent).
    """
    user_id = _args.ref_id(user, "user", User)
    member = _args.enum_member(role, UserRole, "role")
    rows = await _db.write(
        "UPDATE users SET role = $2, updated_at = clock_timestamp() WHERE id = $1 RETURNING *",
        user_id,
        member.value,
    )
    if not rows:
        raise NotFound("user", user_id)
    _key_cache.forget(f"u:{user_id}")  # verified keys carry their user: not the old one
    return to_model(User, rows[0])
