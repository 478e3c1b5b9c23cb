"""The in-memory cache of decrypted messages, bounded in bytes, fair between users.

The IMAP proxy decrypts an S/MIME message once and then answers every FETCH of it
(``BODYSTRUCTURE``, then sections, then partials of sections, as Thunderbird fetches)
from one :class:`~smimeproxy.imap.views.MessageView`, so that size and structure stay the
same across the session and the private-key operation is not repeated per chunk.
Decrypted content lives only here, in memory, never on disk.

Bounds: the sum of ``len(view.data)`` over all entries never exceeds ``max_bytes``, and
one user's entries never exceed ``per_user_bytes`` (default a quarter of the total), so
one user syncing a large mailbox evicts their own oldest messages, not everyone's.
Eviction is least-recently-used, globally and within a user. A view larger than the
per-user cap is not cached at all (the caller just uses it once).

Keys are ``(user, mailbox, uidvalidity, uid)``: a UID is stable only within one
UIDVALIDITY (RFC 3501 section 2.3.1.1), so a recreated mailbox never serves old content.
The user is the key's first element and is the unit of accounting.

Thread-safe: one lock guards all state (the reactor thread reads, pool threads put).
Not guaranteed: the Python object overhead of a view (its parse tree, roughly the size of
the headers again, and up to 4 x 8 KB of remembered FETCH answers, see
:data:`smimeproxy.imap.intercept.MEMO_MAX_LINE`) is not counted; the bound is on message
bytes. Nothing is shared
between processes or nodes (each proxy node has its own cache, as the design requires:
no shared state outside the key store).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import NamedTuple

from smimeproxy.imap.views import MessageView

#: ``(user, mailbox, uidvalidity, uid)``
CacheKey = tuple[Hashable, ...]


class CacheStats(NamedTuple):
    """A snapshot for metrics: lookups answered, lookups missed, bytes held, entries."""

    hits: int
    misses: int
    bytes: int
    entries: int


class DecryptedCache:
    """LRU of :class:`MessageView` objects bounded in bytes, with a per-user cap."""

    def __init__(self, max_bytes: int, per_user_bytes: int | None = None):
        if max_bytes < 0 or (per_user_bytes is not None and per_user_bytes < 0):
            raise ValueError("cache sizes must not be negative")
        self.max_bytes = max_bytes
        cap = max_bytes // 4 if per_user_bytes is None else per_user_bytes
        self.per_user_bytes = min(cap, max_bytes)
        self._lock = threading.Lock()
        self._entries: OrderedDict[CacheKey, MessageView] = OrderedDict()
        self._by_user: dict[Hashable, OrderedDict[CacheKey, int]] = {}
        self._user_bytes: dict[Hashable, int] = {}
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self.evictions = 0

    # -- reading ----------------------------------------------------------------------
    def get(self, key: CacheKey) -> MessageView | None:
        """The cached view, marked as most recently used; ``None`` when absent."""
        with self._lock:
            view = self._entries.get(key)
            if view is None:
                self._misses += 1
                return None
            self._hits += 1
            self._entries.move_to_end(key)
            self._by_user[key[0]].move_to_end(key)
            return view

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._bytes, len(self._entries))

    def user_bytes(self, user: Hashable) -> int:
        """Bytes currently held for ``user``."""
        with self._lock:
            return self._user_bytes.get(user, 0)

    # -- writing ----------------------------------------------------------------------
    def put(self, key: CacheKey, view: MessageView) -> None:
        """Cache ``view`` under ``key``, evicting least recently used entries as needed.

        A view larger than the per-user cap is not cached (and replaces nothing).
        """
        if not key:
            raise ValueError("cache keys start with the user")
        size = len(view.data)
        user = key[0]
        if size > self.per_user_bytes:
            return
        with self._lock:
            if key in self._entries:
                self._remove(key)
            own = self._by_user.get(user)
            while own and self._user_bytes[user] + size > self.per_user_bytes:
                self._remove(next(iter(own)))
                self.evictions += 1
            while self._entries and self._bytes + size > self.max_bytes:
                self._remove(next(iter(self._entries)))
                self.evictions += 1
            self._entries[key] = view
            self._by_user.setdefault(user, OrderedDict())[key] = size
            self._user_bytes[user] = self._user_bytes.get(user, 0) + size
            self._bytes += size

    def drop(self, key: CacheKey) -> None:
        """Forget one entry (for instance after EXPUNGE)."""
        with self._lock:
            if key in self._entries:
                self._remove(key)

    def drop_user(self, user: Hashable) -> None:
        """Forget everything cached for ``user`` (logout, key change)."""
        with self._lock:
            for key in list(self._by_user.get(user, ())):
                self._remove(key)

    def clear(self) -> None:
        with self._lock:
            for key in list(self._entries):
                self._remove(key)

    def _remove(self, key: CacheKey) -> None:
        """Remove one entry; the lock is held."""
        del self._entries[key]
        user = key[0]
        own = self._by_user[user]
        size = own.pop(key)
        self._bytes -= size
        self._user_bytes[user] -= size
        if not own:
            del self._by_user[user]
            del self._user_bytes[user]
