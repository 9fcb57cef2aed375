"""A process-wide cache of verified API keys, kept honest by LISTEN/NOTIFY.

The database is the last word (a revocation by any client, raw SQL
included), so the cache may answer only while it provably knows every change
committed up to a moment no older than :data:`MAX_LAG`:

* **Invalidation.** Triggers on ``api_keys`` and ``users`` (migration 6) send
  ``pg_notify('tokendb_api_keys', …)`` when a key row changes (anything but
  ``last_used_at``), when a user row changes (anything but its balance), and
  on TRUNCATE. A :class:`Listener` holds a **direct** (session) connection
  with ``LISTEN`` on that channel and drops what each notification names.
* **Synchronised, or bypassed.** PostgreSQL delivers notifications in commit
  order. The listener NOTIFYs itself every :data:`HEARTBEAT` seconds on a
  channel of its own; when that heartbeat comes back, every notification
  committed before it was sent has been handled. A hit is served only while
  the newest echoed heartbeat was sent less than :data:`MAX_LAG` ago, so a
  listener that is down, reconnecting or lagging (an event loop too busy to
  read its socket, a server that stopped answering) turns the cache off by
  itself: lookups go to the database until the listener has reconnected,
  emptied the cache and seen a heartbeat again.
* **No stale insert.** Every invalidation (and every reconnect) bumps
  :attr:`KeyCache.generation` and is logged; a lookup remembers the
  generation it started under and its row is cached only if nothing
  invalidated that key (its hash, its user, everything) meanwhile, so a row
  read before a revocation cannot be cached after the revocation's
  notification was handled.

What a cached entry may answer (expiry against the clock, permissions) is the
caller's business (:mod:`tokendb.api_keys`); this module stores opaque
values under a key hash, bounded (LRU) and counted.

One event loop serves the cache: the listener runs as a task of the loop
that first asked for it. Calls from another loop bypass the cache; when the
listener's loop has closed, the next call starts a new one in its own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from tokendb import _settings

__all__ = [
    "CHANNEL",
    "HEARTBEAT",
    "HEARTBEAT_SQL",
    "MAX_LAG",
    "CacheStats",
    "KeyCache",
    "Listener",
    "configure",
    "for_lookup",
    "forget",
    "stats",
    "stop",
]

CHANNEL = "tokendb_api_keys"
"""The channel migration 6's triggers notify: a key hash, ``u:<user id>`` or ``*``."""
HEARTBEAT = 0.02
"""Seconds between the listener's heartbeats (a NOTIFY to itself)."""
MAX_LAG = 0.06
"""A hit is served only while the newest echoed heartbeat was sent less than this many seconds
ago: the bound on how stale a hit may be when the listener itself is late (normally a
notification arrives a millisecond after its commit)."""
APPLICATION_NAME = "tokendb verify cache"
"""The listener connection's ``application_name`` (``pg_stat_activity`` shows it)."""
HEARTBEAT_SQL = "SELECT pg_notify($1, $2)"
"""The listener's heartbeat statement (tests that count statements leave it out)."""
_RECONNECT_DELAY = (0.05, 1.0)
"""First and longest wait between attempts to reconnect the listener."""
_CONNECT_TIMEOUT = 5.0
_LOG_SIZE = 4096
"""Invalidations remembered for lookups in flight (one that started longer ago is not cached)."""

log = logging.getLogger("tokendb.verify_cache")


@dataclass(frozen=True, slots=True)
class CacheStats:
    """What the verify cache did in this process (:func:`tokendb.verify_cache_stats`)."""

    enabled: bool
    """The cache is switched on and has a direct connection to listen on."""
    synchronised: bool
    """Hits are served right now (the listener is connected and its heartbeat recent)."""
    size: int
    maxsize: int
    hits: int
    misses: int
    """Lookups that went to the database while the cache was synchronised."""
    bypassed: int
    """Lookups that went to the database because the cache was not synchronised."""
    invalidations: int
    """Notifications handled (each drops what it names)."""
    evictions: int
    """Entries dropped to stay within ``maxsize``."""
    reconnects: int
    """Times the listener (re)connected; each one empties the cache."""


class KeyCache:
    """A bounded LRU of opaque values by key hash, with a generation counter."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.generation = 0
        self._entries: OrderedDict[str, tuple[str, Any]] = OrderedDict()
        """Key hash → (``u:<owner>``, the value)."""
        self._log: deque[tuple[int, str]] = deque(maxlen=_LOG_SIZE)
        self.hits = self.misses = self.bypassed = 0
        self.invalidations = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key_hash: str) -> Any:
        """The cached value, or None (counted as a hit or a miss)."""
        entry = self._entries.get(key_hash)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key_hash)
        self.hits += 1
        return entry[1]

    def put(self, key_hash: str, owner: Hashable, value: Any, *, generation: int) -> bool:
        """Cache ``value`` unless it was invalidated since ``generation``; True if cached.

        ``owner`` (the key's user) is what a ``u:<owner>`` notification drops.
        Invalidations of other keys since ``generation`` do not matter; when
        the log no longer reaches back that far, nothing is cached.
        """
        user = f"u:{owner}"
        if self.maxsize == 0 or (
            generation != self.generation and self._invalidated_since(generation, key_hash, user)
        ):
            return False
        self._entries[key_hash] = (user, value)
        self._entries.move_to_end(key_hash)
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)
            self.evictions += 1
        return True

    def _invalidated_since(self, generation: int, key_hash: str, user: str) -> bool:
        log = self._log
        if not log or log[0][0] > generation + 1:
            return True  # the log lost what happened since
        for bumped, payload in reversed(log):
            if bumped <= generation:
                return False
            if payload in ("*", key_hash, user):
                return True
        return False

    def invalidate(self, payload: str) -> None:
        """Drop what a notification names: a key hash, ``u:<user id>``, or ``*`` (everything)."""
        self.invalidations += 1
        self._drop(payload)

    def clear(self) -> None:
        """Drop everything (and refuse inserts of lookups started before)."""
        self._drop("*")

    def _drop(self, payload: str) -> None:
        self.generation += 1
        self._log.append((self.generation, payload))
        if payload == "*":
            self._entries.clear()
        elif payload.startswith("u:"):
            for key_hash in [h for h, (user, _) in self._entries.items() if user == payload]:
                del self._entries[key_hash]
        else:
            self._entries.pop(payload, None)


class Listener:
    """The task that keeps one :class:`KeyCache` synchronised, on a direct connection.

    ``connect`` are :func:`asyncpg.connect`'s keyword arguments. Until the
    first heartbeat after (re)connecting has come back,
    :meth:`synchronised` is False.
    """

    def __init__(self, cache: KeyCache, connect: Mapping[str, Any]) -> None:
        self.cache = cache
        self.loop = asyncio.get_running_loop()
        self.reconnects = 0
        self._connect = dict(connect)
        self._connect["server_settings"] = {
            **self._connect.get("server_settings", {}),
            "application_name": APPLICATION_NAME,
        }
        self._heartbeat_channel = f"{CHANNEL}_hb_{os.getpid()}_{id(self):x}"
        self._echoed_sent_at = float("-inf")
        self._sent: dict[str, float] = {}
        self._sequence = 0
        self._conn: asyncpg.Connection | None = None
        self._task = self.loop.create_task(self._run(), name="tokendb verify cache listener")

    def synchronised(self) -> bool:
        """True while hits may be served: connected, heartbeat echoed less than MAX_LAG ago."""
        # Reset to -inf on every disconnect: only a heartbeat of this connection sets it.
        return time.monotonic() - self._echoed_sent_at < MAX_LAG

    def alive(self) -> bool:
        """False once the task ended (stopped, or its loop closed)."""
        return not self._task.done() and not self.loop.is_closed()

    async def stop(self) -> None:
        """Cancel the task and close its connection."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task

    def _on_invalidation(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.cache.invalidate(payload)

    def _on_heartbeat(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        sent_at = self._sent.pop(payload, None)
        if sent_at is not None:
            self._echoed_sent_at = max(self._echoed_sent_at, sent_at)

    async def _run(self) -> None:
        delay = _RECONNECT_DELAY[0]
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a lost connection, a refused one: retry, bypassing
                log.warning("verify cache listener: %s; lookups bypass the cache", exc)
            finally:
                await self._disconnect()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_DELAY[1])

    async def _listen(self) -> None:
        conn = await asyncpg.connect(timeout=_CONNECT_TIMEOUT, **self._connect)
        self._conn = conn
        await conn.add_listener(CHANNEL, self._on_invalidation)
        await conn.add_listener(self._heartbeat_channel, self._on_heartbeat)
        # Whatever changed while no one listened is unknown: start empty. Only
        # now, with LISTEN in place, so nothing is missed from here on.
        self.cache.clear()
        self.reconnects += 1
        while True:
            self._sequence += 1
            payload = str(self._sequence)
            self._sent[payload] = time.monotonic()
            await conn.execute(
                HEARTBEAT_SQL, self._heartbeat_channel, payload, timeout=MAX_LAG * 10
            )
            if len(self._sent) > 100:  # heartbeats that never came back
                self._sent.clear()
            await asyncio.sleep(HEARTBEAT)

    async def _disconnect(self) -> None:
        self._echoed_sent_at = float("-inf")
        self._sent.clear()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()  # no polite close: the connection may be dead or hung


_connect: dict[str, Any] | None = None
_cache = KeyCache(0)
_listener: Listener | None = None


def configure(*, maxsize: int, connect: Mapping[str, Any] | None) -> None:
    """Set the cache's size and the listener's direct connection (:func:`tokendb.init` only).

    ``connect`` are :func:`asyncpg.connect`'s arguments; without them the
    cache stays off. Whether it is on is ``_settings.current().verify_cache``
    (so a block may turn it off). The cache is emptied; a running listener
    is left to :func:`stop`.
    """
    global _connect, _cache
    _connect = None if connect is None else dict(connect)
    _cache = KeyCache(maxsize)
    if _listener is not None:
        _listener.cache = _cache


def for_lookup() -> KeyCache | None:
    """The cache when it may answer now, else None (and the lookup is counted as bypassing).

    Starts the listener in the running loop when there is none (or its loop
    has closed): the first calls bypass the cache until it has synchronised.
    """
    global _listener
    if _connect is None or not _settings.current().verify_cache:
        return None
    listener = _listener
    if listener is None or not listener.alive():
        listener = _listener = Listener(_cache, _connect)
    if listener.loop is asyncio.get_running_loop() and listener.synchronised():
        return _cache
    _cache.bypassed += 1
    return None


def forget(payload: str) -> None:
    """Drop what ``payload`` names (as a notification would) now, for this process's own
    writes: the notification reaches the other processes, and this one a moment later."""
    _cache.invalidate(payload)


async def stop() -> None:
    """Stop the listener (if it runs in this loop) and empty the cache; the config stays."""
    global _listener
    listener, _listener = _listener, None
    _cache.clear()
    if listener is None:
        return
    if listener.alive() and listener.loop is asyncio.get_running_loop():
        await listener.stop()
    elif listener.alive():
        listener.loop.call_soon_threadsafe(listener._task.cancel)


def stats() -> CacheStats:
    """The counters of the cache of this process."""
    listener = _listener
    return CacheStats(
        enabled=_connect is not None and _settings.current().verify_cache,
        synchronised=listener is not None and listener.alive() and listener.synchronised(),
        size=len(_cache),
        maxsize=_cache.maxsize,
        hits=_cache.hits,
        misses=_cache.misses,
        bypassed=_cache.bypassed,
        invalidations=_cache.invalidations,
        evictions=_cache.evictions,
        reconnects=listener.reconnects if listener is not None else 0,
    )
