"""The public surface: flat exports, keyword-only operations, documented contracts, errors."""

from __future__ import annotations

import inspect
import re
import uuid

import pytest

import tokendb
import tokendb.errors

DOMAIN_MODULES = {
    "tokendb.users",
    "tokendb.api_keys",
    "tokendb.ledger",
    "tokendb.holds",
    "tokendb.chats",
}

OPERATIONS = [
    getattr(tokendb, name)
    for name in tokendb.__all__
    if inspect.iscoroutinefunction(getattr(tokendb, name))
    and getattr(tokendb, name).__module__ in DOMAIN_MODULES
]


def test_everything_in___all___is_importable_and_nothing_private() -> None:
    assert sorted(tokendb.__all__) == tokendb.__all__
    for name in tokendb.__all__:
        assert not name.startswith("_")
        assert hasattr(tokendb, name), name


def test_there_are_operations_for_every_domain() -> None:
    assert {op.__module__ for op in OPERATIONS} == DOMAIN_MODULES
    assert len(OPERATIONS) >= 20


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.__name__)
def test_operations_take_keyword_arguments_only(operation) -> None:
    parameters = inspect.signature(operation).parameters.values()
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters), operation


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.__name__)
def test_operations_document_their_contract(operation) -> None:
    doc = inspect.getdoc(operation) or ""
    assert len(doc.splitlines()[0]) > 10, operation


PUBLIC_FUNCTIONS = [
    getattr(tokendb, name) for name in tokendb.__all__ if inspect.isfunction(getattr(tokendb, name))
]


def raised(function: object) -> list[str]:
    """The error names of the ``Raises:`` section of ``function``'s docstring."""
    doc = inspect.getdoc(function) or ""
    section = re.search(r"^Raises:\n((?:    .*\n?|\n)+)", doc, flags=re.MULTILINE)
    if section is None:
        return []
    return re.findall(r"^    (\w+):", section.group(1), flags=re.MULTILINE)


@pytest.mark.parametrize("function", PUBLIC_FUNCTIONS, ids=lambda f: f.__name__)
def test_every_public_function_lists_what_it_raises(function) -> None:
    """A ``Raises:`` section of tokendb.errors names, or an explicit "Raises nothing"."""
    names = raised(function)
    if not names:
        assert "Raises nothing" in (inspect.getdoc(function) or ""), (
            f"{function.__name__}'s docstring has no Raises: section"
        )
    unknown = [name for name in names if name not in tokendb.errors.__all__]
    assert not unknown, f"{function.__name__} lists {unknown}, not in tokendb.errors"


def test_the_raises_check_reads_the_section() -> None:
    def documented() -> None:
        """Do it.

        Raises:
            NotFound: when missing.
            NoSuchError: a name the check must catch.
        """

    assert raised(documented) == ["NotFound", "NoSuchError"]
    assert raised(test_the_raises_check_reads_the_section) == []


UNKNOWN = uuid.UUID("00000000-0000-7000-8000-00000000beef")


async def test_every_list_treats_an_unknown_owner_alike(
    tokendb_clean: str, make_user, make_api_key
) -> None:
    """Siblings behave alike: an unknown owner is NotFound, a known one without rows []."""
    user = await make_user(signup_bonus=0)
    api_key, _ = await make_api_key(user=await make_user())
    session = await tokendb.start_chat(api_key=api_key, model="m")
    lists = {
        "list_transactions": lambda owner: tokendb.list_transactions(user=owner),
        "list_holds": lambda owner: tokendb.list_holds(user=owner),
        "list_api_keys": lambda owner: tokendb.list_api_keys(user=owner),
        "list_chats": lambda owner: tokendb.list_chats(user=owner),
        "list_messages": lambda owner: tokendb.list_messages(session=owner),
    }
    assert set(lists) == {name for name in tokendb.__all__ if name.startswith("list_")} - {
        "list_users"  # no owner
    }
    for name, listing in lists.items():
        owner = session.id if name == "list_messages" else user.id
        assert await listing(owner) == [], name
        with pytest.raises(tokendb.NotFound) as info:
            await listing(UNKNOWN)
        assert info.value.key == UNKNOWN, name


@pytest.mark.parametrize(
    "operation",
    [*OPERATIONS, tokendb.init, tokendb.close, tokendb.migrate],
    ids=lambda op: op.__name__,
)
def test_operations_translate_driver_errors(operation) -> None:
    # @translated wraps the function; the wrapper is what turns asyncpg,
    # OSError and Tortoise errors into TokenDBError leaves (any other decorator
    # built with functools.wraps would not carry the marker).
    assert getattr(operation, "__tokendb_translated__", False), (
        f"{operation.__name__} is not @translated"
    )


def test_one_exception_tree() -> None:
    classes = [
        obj
        for obj in vars(tokendb.errors).values()
        if isinstance(obj, type)
        and issubclass(obj, Exception)
        and not issubclass(obj, Warning)  # warned, never raised: ConfigurationWarning
        and obj.__module__ == "tokendb.errors"
    ]
    assert len(classes) >= 16
    for cls in classes:
        assert issubclass(cls, tokendb.TokenDBError), cls
        assert getattr(tokendb, cls.__name__) is cls, f"{cls.__name__} not exported"
    for leaf in (tokendb.ApiKeyRevoked, tokendb.ApiKeyExpired):
        assert issubclass(leaf, tokendb.InvalidApiKey)
    assert issubclass(tokendb.DatabaseTimeout, tokendb.DatabaseUnavailable)


def test_errors_carry_their_facts() -> None:
    import uuid
    from datetime import UTC, datetime

    user_id, reference = uuid.uuid4(), uuid.uuid4()
    insufficient = tokendb.InsufficientTokens(user_id, 5, 9)
    assert (insufficient.user_id, insufficient.balance, insufficient.requested) == (user_id, 5, 9)
    conflict = tokendb.ReferenceConflict(reference, existing_amount=3, requested_amount=4)
    assert conflict.reference_id == reference
    refund = tokendb.RefundExceedsCharge(reference, 2, 3)
    assert (refund.transaction_id, refund.refundable, refund.requested) == (reference, 2, 3)
    expired = tokendb.ApiKeyExpired("sk_live_abcd", datetime(2020, 1, 1, tzinfo=UTC))
    assert expired.expired_at.year == 2020
    assert tokendb.PermissionDenied("chat").permission == "chat"
    assert tokendb.EmailTaken("a@b.io").email == "a@b.io"
    assert tokendb.ChatSessionEnded(reference).session_id == reference
    validation = tokendb.ValidationError("amount", "must be positive")
    assert (validation.field, validation.reason) == ("amount", "must be positive")


def test_package_is_typed() -> None:
    from pathlib import Path

    assert (Path(tokendb.__file__).parent / "py.typed").exists()
