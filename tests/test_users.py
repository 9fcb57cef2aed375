"""Tests for tokendb.users and tokendb.passwords."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

import tokendb
from tests.helpers import blocked_backends, table_counts
from tokendb import passwords
from tokendb.models import TransactionType, UserRole

PASSWORD = "correct horse battery"


async def test_create_user_normalizes_email_and_writes_the_signup_bonus(tokendb_clean: str) -> None:
    user = await tokendb.create_user(
        email="  Ada.Lovelace@Example.COM ", password=PASSWORD, name=" Ada "
    )
    assert user.email == "ada.lovelace@example.com"
    assert user.name == "Ada"
    assert user.role is UserRole.USER
    assert user.token_balance == 100
    assert user.password_hash.startswith("$argon2id$")
    assert PASSWORD not in user.password_hash
    [bonus] = await tokendb.list_transactions(user=user)
    assert (bonus.type, bonus.amount, bonus.balance_after) == (TransactionType.BONUS, 100, 100)
    assert bonus.description == "signup bonus"
    assert await tokendb.audit_ledger(user=user) == []


async def test_signup_bonus_is_configurable(tokendb_clean: str) -> None:
    user = await tokendb.create_user(
        email="zero@example.com", password=PASSWORD, name="Z", signup_bonus=0
    )
    assert user.token_balance == 0
    assert await tokendb.list_transactions(user=user) == []
    assert await tokendb.audit_ledger() == []


async def test_role_accepts_member_or_string(tokendb_clean: str) -> None:
    admin = await tokendb.create_user(
        email="a@example.com", password=PASSWORD, name="A", role="admin"
    )
    assert admin.role is UserRole.ADMIN
    demoted = await tokendb.set_role(user=admin.id, role=UserRole.USER)
    assert demoted.role is UserRole.USER
    assert (await tokendb.get_user(user_id=admin.id)).role is UserRole.USER


async def test_duplicate_email_in_any_case_is_email_taken(tokendb_clean: str, make_user) -> None:
    await make_user(email="grace@example.com")
    before = await table_counts()
    with pytest.raises(tokendb.EmailTaken) as info:
        await make_user(email="GRACE@example.com")
    assert info.value.email == "grace@example.com"
    assert await table_counts() == before


async def test_concurrent_signups_with_one_email_create_one_user(tokendb_clean: str) -> None:
    results = await asyncio.gather(
        *(
            tokendb.create_user(email=f"Race@Example.com{' ' * i}", password=PASSWORD, name="R")
            for i in range(8)
        ),
        return_exceptions=True,
    )
    created = [r for r in results if isinstance(r, tokendb.User)]
    assert len(created) == 1
    assert all(isinstance(r, tokendb.EmailTaken) for r in results if r not in created)
    assert (await table_counts())["token_transactions"] == 1


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"email": "not-an-email"}, "email"),
        ({"email": "a@b"}, "email"),
        ({"email": 42}, "email"),
        ({"email": "x" * 250 + "@example.com"}, "email"),
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": "n" * 101}, "name"),
        ({"name": "nul\x00byte"}, "name"),
        ({"password": "short"}, "password"),
        ({"password": None}, "password"),
        ({"password": "p" * 2000}, "password"),
        ({"role": "root"}, "role"),
        ({"signup_bonus": -1}, "signup_bonus"),
        ({"signup_bonus": True}, "signup_bonus"),
    ],
)
async def test_bad_input_is_rejected_before_any_write(
    tokendb_clean: str, changes: dict[str, object], field: str
) -> None:
    arguments: dict[str, object] = {"email": "ok@example.com", "password": PASSWORD, "name": "Ok"}
    arguments.update(changes)
    before = await table_counts()
    with pytest.raises(tokendb.ValidationError) as info:
        await tokendb.create_user(**arguments)  # type: ignore[arg-type]
    assert info.value.field == field
    assert await table_counts() == before


async def test_authenticate(tokendb_clean: str, make_user) -> None:
    user = await make_user(email="linus@example.com", password=PASSWORD)
    assert (await tokendb.authenticate(email="LINUS@example.com ", password=PASSWORD)).id == user.id
    for email, password in [
        ("linus@example.com", "wrong password"),
        ("nobody@example.com", PASSWORD),
        ("not an email", PASSWORD),
        ("linus@example.com", None),
    ]:
        with pytest.raises(tokendb.InvalidCredentials) as info:
            await tokendb.authenticate(email=email, password=password)  # type: ignore[arg-type]
        assert str(info.value) == "invalid email or password"


async def test_unknown_email_still_verifies_a_hash(
    tokendb_clean: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str | None] = []
    real = passwords.verify_password

    async def counting(password_hash: str | None, password: str) -> bool:
        calls.append(password_hash)
        return await real(password_hash, password)

    monkeypatch.setattr(passwords, "verify_password", counting)
    with pytest.raises(tokendb.InvalidCredentials):
        await tokendb.authenticate(email="ghost@example.com", password=PASSWORD)
    assert calls == [None]  # the dummy hash was verified


async def test_login_rehashes_when_parameters_changed(tokendb_clean: str, make_user) -> None:
    user = await make_user(email="old@example.com", password=PASSWORD)
    with passwords.parameters(time_cost=2, memory_cost=2048, parallelism=1):
        logged_in = await tokendb.authenticate(email="old@example.com", password=PASSWORD)
        assert logged_in.password_hash != user.password_hash
        assert "m=2048,t=2" in logged_in.password_hash
        assert not passwords.needs_rehash(logged_in.password_hash)
        stored = await tokendb.get_user(user_id=user.id)
        assert stored.password_hash == logged_in.password_hash
    # The new hash still verifies after the parameters changed back.
    await tokendb.authenticate(email="old@example.com", password=PASSWORD)


async def test_a_wrong_password_is_refused_when_the_stored_hash_needs_a_rehash(
    tokendb_clean: str, make_user
) -> None:
    """After the argon2 parameters change, every stored hash needs a rehash: login
    takes the rehash path, and a wrong password must still be refused there, with
    nothing written (the hash is not replaced by one of the wrong password)."""
    user = await make_user(password=PASSWORD)
    with passwords.parameters(time_cost=2, memory_cost=2048, parallelism=1):
        assert passwords.needs_rehash(user.password_hash)
        before = await table_counts()
        with pytest.raises(tokendb.InvalidCredentials):
            await tokendb.authenticate(email=user.email, password="wrong password")
        assert await table_counts() == before
    await tokendb.authenticate(email=user.email, password=PASSWORD)


async def test_get_user_by_id_or_email(tokendb_clean: str, make_user) -> None:
    user = await make_user(email="kay@example.com")
    assert (await tokendb.get_user(user_id=user.id)).email == "kay@example.com"
    assert (await tokendb.get_user(user_id=str(user.id))).id == user.id
    assert (await tokendb.get_user(email="KAY@example.com")).id == user.id
    missing = uuid.uuid4()
    with pytest.raises(tokendb.NotFound) as info:
        await tokendb.get_user(user_id=missing)
    assert (info.value.entity, info.value.key) == ("user", missing)
    with pytest.raises(tokendb.NotFound):
        await tokendb.get_user(email="nobody@example.com")
    with pytest.raises(tokendb.ValidationError):
        await tokendb.get_user()
    with pytest.raises(tokendb.ValidationError):
        await tokendb.get_user(user_id=user.id, email="kay@example.com")
    with pytest.raises(tokendb.ValidationError) as bad:
        await tokendb.get_user(user_id="not-a-uuid")
    assert bad.value.field == "user_id"


async def test_list_users_pages_in_creation_order(tokendb_clean: str, make_user) -> None:
    created = [await make_user() for _ in range(5)]
    first = await tokendb.list_users(limit=2)
    second = await tokendb.list_users(limit=2, after=first[-1])
    third = await tokendb.list_users(limit=2, after=second[-1].id)
    assert [u.id for u in first + second + third] == [u.id for u in created]


async def test_change_password(tokendb_clean: str, make_user) -> None:
    user = await make_user(email="pw@example.com", password=PASSWORD)
    with pytest.raises(tokendb.InvalidCredentials):
        await tokendb.change_password(
            user=user, new_password="new password 1", current_password="nope"
        )
    with pytest.raises(tokendb.ValidationError) as info:
        await tokendb.change_password(user=user, new_password="short")
    assert info.value.field == "new_password"
    await tokendb.authenticate(email="pw@example.com", password=PASSWORD)  # unchanged so far
    await tokendb.change_password(
        user=user, new_password="new password 1", current_password=PASSWORD
    )
    with pytest.raises(tokendb.InvalidCredentials):
        await tokendb.authenticate(email="pw@example.com", password=PASSWORD)
    await tokendb.authenticate(email="pw@example.com", password="new password 1")
    with pytest.raises(tokendb.NotFound):
        await tokendb.change_password(user=uuid.uuid4(), new_password="new password 2")


async def test_set_role_unknown_user_and_bad_role(tokendb_clean: str, make_user) -> None:
    with pytest.raises(tokendb.NotFound):
        await tokendb.set_role(user=uuid.uuid4(), role="admin")
    user = await make_user()
    with pytest.raises(tokendb.ValidationError) as info:
        await tokendb.set_role(user=user, role="superuser")
    assert info.value.field == "role"


def test_repr_and_str_never_show_the_password_hash() -> None:
    user = tokendb.User(email="a@example.com", password_hash="$argon2id$SECRET", name="A")
    assert "SECRET" not in repr(user) and "SECRET" not in str(user)


# Regression tests from the independent review.


@pytest.mark.parametrize("known_email", [True, False])
async def test_authenticate_with_a_lone_surrogate_is_invalid_credentials(
    tokendb_clean: str, make_user, known_email: bool
) -> None:
    """json.loads('"\\ud800"') yields this string: an attacker-controlled login
    body turns into a UnicodeEncodeError (a 500) instead of InvalidCredentials."""
    user = await make_user(password=PASSWORD)
    email = user.email if known_email else "nobody@example.com"
    with pytest.raises(tokendb.InvalidCredentials):
        await tokendb.authenticate(email=email, password="\ud800" + PASSWORD)


@pytest.mark.parametrize("current", [12345678, "\ud800 12345678"])
async def test_change_password_with_a_malformed_current_password(
    tokendb_clean: str, make_user, current: object
) -> None:
    user = await make_user(password=PASSWORD)
    with pytest.raises((tokendb.InvalidCredentials, tokendb.ValidationError)):
        await tokendb.change_password(
            user=user,
            new_password="new password 1",
            current_password=current,  # type: ignore[arg-type]
        )
    await tokendb.authenticate(email=user.email, password=PASSWORD)  # unchanged


async def test_change_password_does_not_overwrite_a_concurrent_change(
    tokendb_clean: str, make_user
) -> None:
    """Victim changes the password (old → new) while an attacker who knows the
    old one calls change_password(current_password=old). The attacker's check
    reads the old hash and its UPDATE waits for the victim's row lock; the
    UPDATE is conditional on that old hash, so it finds nothing to change and
    the attacker gets InvalidCredentials."""
    user = await make_user(password=PASSWORD)
    victims_hash = await passwords.hash_password("victim's new password")
    victim = await asyncpg.connect(tokendb_clean)
    try:
        tx = victim.transaction()
        await tx.start()
        await victim.execute(
            "UPDATE users SET password_hash = $2 WHERE id = $1", user.id, victims_hash
        )
        attacker = asyncio.ensure_future(
            tokendb.change_password(
                user=user, new_password="attacker's password", current_password=PASSWORD
            )
        )
        # The attacker has verified the old hash; its UPDATE waits on the victim's lock.
        await blocked_backends(victim, like="UPDATE users SET password_hash%")
        await tx.commit()
        with pytest.raises(tokendb.InvalidCredentials):
            await asyncio.wait_for(attacker, 10)
        await tokendb.authenticate(email=user.email, password="victim's new password")
    finally:
        await victim.close()


async def test_a_rehash_on_login_never_overwrites_a_concurrent_password_change(
    tokendb_clean: str, make_user
) -> None:
    """Login rehashes an old-parameter hash, conditional on the hash it verified."""
    user = await make_user(password=PASSWORD)
    changed_hash = await passwords.hash_password("changed meanwhile")
    other = await asyncpg.connect(tokendb_clean)
    try:
        with passwords.parameters(time_cost=2, memory_cost=2048, parallelism=1):
            tx = other.transaction()
            await tx.start()
            await other.execute(
                "UPDATE users SET password_hash = $2 WHERE id = $1", user.id, changed_hash
            )
            login = asyncio.ensure_future(tokendb.authenticate(email=user.email, password=PASSWORD))
            await blocked_backends(other, like="UPDATE users SET password_hash%")
            await tx.commit()
            await asyncio.wait_for(login, 10)  # the old password was right when checked
    finally:
        await other.close()
    assert (await tokendb.get_user(user_id=user.id)).password_hash == changed_hash


def test_parameters_restores_what_was_in_force() -> None:
    before = passwords.current_parameters()
    with passwords.parameters(time_cost=3, memory_cost=4096, parallelism=2):
        assert passwords.current_parameters() == {
            "time_cost": 3,
            "memory_cost": 4096,
            "parallelism": 2,
        }
    assert passwords.current_parameters() == before


async def test_parameters_are_seen_by_their_block_only_not_by_concurrent_callers() -> None:
    """The demo seeds users with cheap costs while the gateway keeps registering real
    ones: a coroutine running beside the block hashes with the costs it had."""
    before = passwords.current_parameters()
    inside = asyncio.Event()

    async def beside() -> tuple[dict[str, int], str]:
        await inside.wait()
        return passwords.current_parameters(), await passwords.hash_password("x" * 10)

    elsewhere = asyncio.ensure_future(beside())
    with passwords.parameters(time_cost=3, memory_cost=4096, parallelism=2):
        inside.set()
        seen, made = await elsewhere
        assert "m=4096,t=3,p=2" in await passwords.hash_password("x" * 10)
    assert seen == before
    assert "m=4096,t=3" not in made


async def test_a_password_is_8_to_1024_characters_everywhere(tokendb_clean: str) -> None:
    """The limits hold for registering, logging in and changing: a 1024-character
    password that was accepted can be used; one character more is refused (a login
    with it is InvalidCredentials, without hashing 1025 characters)."""
    longest, shortest = "p" * 1024, "s" * 8
    user = await tokendb.create_user(email="long@example.com", password=longest, name="L")
    assert (await tokendb.authenticate(email=user.email, password=longest)).id == user.id
    await tokendb.change_password(user=user, new_password=shortest, current_password=longest)
    await tokendb.authenticate(email=user.email, password=shortest)
    for password in ("s" * 7, "p" * 1025):
        with pytest.raises(tokendb.ValidationError) as info:
            await tokendb.create_user(email="x@example.com", password=password, name="X")
        assert info.value.field == "password"
    with pytest.raises(tokendb.InvalidCredentials):
        await tokendb.authenticate(email=user.email, password="p" * 1025)
    with pytest.raises(tokendb.InvalidCredentials):
        await tokendb.change_password(user=user, new_password=longest, current_password="p" * 1025)


async def test_a_name_is_at_most_100_characters(tokendb_clean: str) -> None:
    user = await tokendb.create_user(email="n@example.com", password=PASSWORD, name="n" * 100)
    assert user.name == "n" * 100


async def test_list_users_pages_50_by_default(tokendb_clean: str, make_user) -> None:
    for _ in range(51):
        await make_user()
    assert len(await tokendb.list_users()) == 50
