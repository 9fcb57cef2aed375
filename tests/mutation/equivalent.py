"""Surviving mutants that no test can tell apart from the code: equivalent, with the reason.

Keyed as the run reports them (:attr:`tests.mutation.runner.Mutant.key`):
the module, the enclosing definition and the changed lines, so an entry
survives line numbers moving and goes stale (and shows as a survivor again)
when the code it describes changes. Each was judged by reading the code; the
reasons are shared, one constant each.
"""

# ruff: noqa: E501  (the keys are changed lines of code, verbatim)

from __future__ import annotations

__all__ = ["EQUIVALENT"]

_CLOCK = "clock_timestamp() or now() for updated_at of a one-statement write: they differ by that statement's own duration, and nothing orders by updated_at (created_at, which the ledger's chain needs, and ended_at are tested)"
_UNIQUE = "unreachable: the only unique indexes these statements can meet are the idempotency key and the primary key of a fresh UUIDv7"
_DELTA0 = "delta is never 0 (amounts are >= 1), so delta < 0, delta <= 0 and delta < 1 agree"
_RANK = "the walk's seed rows (rank 0) have seq 0 and outcomes are read for seq 1..n: returning them changes nothing"
_RETRIES = "the same outcome for every caller: how often a batch refused by a reference committed meanwhile is re-sent before going item by item changes the statement count only after two successive races, which no deterministic test can produce"
_INSTANT = "differs only at the instant itself: a timestamp equal, to the microsecond, to the one it is compared with, read by another statement; no client (nor test) can produce it"
_MINLEN = "a length is never negative: min_length=-1 accepts exactly what min_length=0 accepts"
_SLOTS = "slots=False only gives ChargeItem a __dict__: equality, hashing and immutability (tested) are unchanged"
_STRICT = "zip(strict=True) checks charge_batch's own contract (one outcome per item, which it always keeps); no caller can make it fail"
_EMAIL = "email_validator refuses an address over 254 characters before these checks: the 255 bound cannot be reached either way"

_HELD = "the spendable amount read before the lock is used only when held_tokens is 0 (with holds, the call is decided again under the lock), where balance + held and balance - held agree"
_OWN_COPY = "a lookup's own instances are held by nobody else: a copy of them (what every cached answer returns) is the same key to its caller"
_FREE_MESSAGE = "a message of 0 tokens is never refused for a key's limit (ADD_MESSAGE's `$5 = 0`): with 0 tokens nothing comes back only for an ended or unknown session, so cost > 0 and cost >= 0 agree where this is read"
_COUNTED = "the outcomes were counted just above (a RuntimeError fails the batch's callers first): zip's strict check cannot fire"

EQUIVALENT: dict[str, str] = {
    "tokendb/_group_commit.py::_flush: for (_, waiter, _, _), outcome in zip(batch, outcomes, strict=True): => for (_, waiter, _, _), outcome in zip(batch, outcomes, strict=False):": _COUNTED,
    "tokendb/_ledger_sql.py::<module>: SET token_balance = token_balance + $2, updated_at = clock_timestamp() => SET token_balance = token_balance + $2, updated_at = now()": _CLOCK,
    "tokendb/_ledger_sql.py::move: if exc.constraint_name != IDEMPOTENCY_INDEX or reference is None: => if exc.constraint_name != IDEMPOTENCY_INDEX and reference is None:": _UNIQUE,
    "tokendb/_ledger_sql.py::move: if delta < 0 and available + delta < 0 and not holds: => if delta < 1 and available + delta < 0 and not holds:": _DELTA0,
    "tokendb/_ledger_sql.py::move: if delta < 0 and available + delta < 0 and not holds: => if delta <= 0 and available + delta < 0 and not holds:": _DELTA0,
    'tokendb/_ledger_sql.py::spendable_or_none: return int(rows[0]["token_balance"]) - held, held > 0 => return int(rows[0]["token_balance"]) + held, held > 0': _HELD,
    "tokendb/_ledger_sql.py::<module>: WHERE user_id = $1 AND status = 'active' AND expires_at <= clock_timestamp() => WHERE user_id = $1 AND status = 'active' AND expires_at < clock_timestamp()": _INSTANT,
    "tokendb/_ledger_sql.py::<module>: WHERE w.rank > 0 => WHERE w.rank >= 0": _RANK,
    "tokendb/_ledger_sql.py::charge_batch: for _ in range(3): => for _ in range( 4):": _RETRIES,
    "tokendb/_ledger_sql.py::charge_batch: for _ in range(3): => for _ in range( 2):": _RETRIES,
    "tokendb/_ledger_sql.py::charge_batch: break => continue": _UNIQUE,
    "tokendb/_ledger_sql.py::<module>: SET token_balance = token_balance - $5, updated_at = clock_timestamp() => SET token_balance = token_balance - $5, updated_at = now()": _CLOCK,
    "tokendb/api_keys.py::<module>: WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < $2::timestamptz - $3::interval) => WHERE id = $1 AND (last_used_at IS NULL OR last_used_at <= $2::timestamptz - $3::interval)": _INSTANT,
    "tokendb/api_keys.py::issue_api_key: if expiry is not None and expiry <= datetime.now(expiry.tzinfo): => if expiry is not None and expiry < datetime.now(expiry.tzinfo):": _INSTANT,
    'tokendb/api_keys.py::verify_api_key: return await verified.answer(row["checked_at"], permission, interval, shared=False) => return await verified.answer(row["checked_at"], permission, interval, shared=True)': _OWN_COPY,
    "tokendb/api_keys.py::answer: if key.expires_at is not None and key.expires_at <= now: => if key.expires_at is not None and key.expires_at < now:": _INSTANT,
    "tokendb/api_keys.py::answer: if key.last_used_at is None or key.last_used_at < now - interval: => if key.last_used_at is None or key.last_used_at <= now - interval:": _INSTANT,
    'tokendb/chats.py::add_message: if state[0]["ended_at"] is None and cost > 0 and key_id is not None: => if state[0]["ended_at"] is None and cost >= 0 and key_id is not None:': _FREE_MESSAGE,
    "tokendb/chats.py::<module>: WHERE id = $2 AND is_active AND (expires_at IS NULL OR expires_at > now()) => WHERE id = $2 AND is_active AND (expires_at IS NULL OR expires_at >= now())": _INSTANT,
    'tokendb/chats.py::add_message: body = _args.text(content, "content", max_length=MAX_CONTENT_LENGTH, min_length=0, strip=False) => body = _args.text(content, "content", max_length=MAX_CONTENT_LENGTH, min_length= -1, strip=False)': _MINLEN,
    "tokendb/ledger.py::<module>: @dataclass(frozen=True, slots=True) => @dataclass(frozen=True, slots=False)": _SLOTS,
    "tokendb/ledger.py::charge_many: for (index, _), outcome in zip(chunk, outcomes, strict=True): => for (index, _), outcome in zip(chunk, outcomes, strict=False):": _STRICT,
    'tokendb/users.py::normalize_email: value = _args.text(email, "email", max_length=255) => value = _args.text(email, "email", max_length= 256)': _EMAIL,
    'tokendb/users.py::normalize_email: value = _args.text(email, "email", max_length=255) => value = _args.text(email, "email", max_length= 254)': _EMAIL,
    "tokendb/users.py::normalize_email: if len(normalized) > 255: => if len(normalized) > 256:": _EMAIL,
    "tokendb/users.py::normalize_email: if len(normalized) > 255: => if len(normalized) > 254:": _EMAIL,
    "tokendb/users.py::normalize_email: if len(normalized) > 255: => if len(normalized) >= 255:": _EMAIL,
    'tokendb/users.py::authenticate: "UPDATE users SET password_hash = $2, updated_at = clock_timestamp() " => "UPDATE users SET password_hash = $2, updated_at = now() "': _CLOCK,
    'tokendb/users.py::change_password: "UPDATE users SET password_hash = $2, updated_at = clock_timestamp() " => "UPDATE users SET password_hash = $2, updated_at = now() "': _CLOCK,
    'tokendb/users.py::set_role: "UPDATE users SET role = $2, updated_at = clock_timestamp() WHERE id = $1 RETURNING *", => "UPDATE users SET role = $2, updated_at = now() WHERE id = $1 RETURNING *",': _CLOCK,
}
