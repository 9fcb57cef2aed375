"""Tests for tokendb.ids: UUIDv7, monotonic within a process."""

from __future__ import annotations

import threading
import time
import uuid

from tokendb.ids import new_id


def test_ids_are_version_7_rfc_variant() -> None:
    value = new_id()
    assert value.version == 7
    assert value.variant == uuid.RFC_4122


def test_ids_carry_the_millisecond_timestamp() -> None:
    before = time.time_ns() // 1_000_000
    value = new_id()
    after = time.time_ns() // 1_000_000
    assert before <= value.int >> 80 <= after


def test_ids_are_strictly_increasing_even_within_one_millisecond() -> None:
    ids = [new_id() for _ in range(50_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_ids_from_threads_never_collide() -> None:
    results: list[list[uuid.UUID]] = [[] for _ in range(4)]

    def work(bucket: list[uuid.UUID]) -> None:
        bucket.extend(new_id() for _ in range(10_000))

    threads = [threading.Thread(target=work, args=(bucket,)) for bucket in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [value for bucket in results for value in bucket]
    assert len(set(everything)) == len(everything)
    for bucket in results:
        assert bucket == sorted(bucket)
