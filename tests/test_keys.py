"""Tests for tokendb.keys (pure: no database)."""

from __future__ import annotations

import hashlib
import re

import pytest

from tokendb import keys
from tokendb.errors import ValidationError


def test_generated_keys_have_the_documented_format() -> None:
    secrets = {keys.generate_key() for _ in range(200)}
    assert len(secrets) == 200
    for secret in secrets:
        assert re.fullmatch(r"sk_live_[0-9A-Za-z]{40}", secret)
        assert keys.is_well_formed(secret)


def test_hash_is_sha256_hex_of_the_whole_key() -> None:
    secret = keys.generate_key()
    assert keys.hash_key(secret) == hashlib.sha256(secret.encode()).hexdigest()
    assert len(keys.hash_key(secret)) == 64


def test_prefix_is_the_first_twelve_characters() -> None:
    secret = "sk_live_" + "A1b2" + "x" * 36
    assert keys.key_prefix(secret) == "sk_live_A1b2"


@pytest.mark.parametrize(
    "candidate",
    [
        "",
        "sk_live_",
        "sk_live_short",
        "sk_test_" + "a" * 40,
        "sk_live_" + "a" * 31,
        "sk_live_" + "a" * 39 + "!",
        "sk_live_" + "a" * 39 + "'",
        " sk_live_" + "a" * 40,
        "sk_live_" + "a" * 200,
        None,
        42,
        b"sk_live_" + b"a" * 40,
    ],
)
def test_malformed_keys_are_recognised_without_a_lookup(candidate: object) -> None:
    assert not keys.is_well_formed(candidate)


def test_permissions_default_and_validation() -> None:
    assert keys.normalize_permissions(None) == ["*"]
    assert keys.normalize_permissions([]) == []
    assert keys.normalize_permissions(["chat", "billing:read", "chat"]) == ["chat", "billing:read"]
    for bad in ["chat", [1], ["Chat"], ["has space"], ["x" * 65], [""], [None], {"chat": 1}]:
        with pytest.raises(ValidationError) as info:
            keys.normalize_permissions(bad)  # type: ignore[arg-type]
        assert info.value.field == "permissions"


def test_grants() -> None:
    assert keys.grants(["*"], "anything")
    assert keys.grants(["chat"], "chat")
    assert not keys.grants(["chat"], "billing")
    assert not keys.grants([], "chat")
