"""Lookups kept in memory for as long as the store generation says they are current.

Every node of a gateway reads the same store, and a change made through any node (a
rotation, a new trust anchor, a revoked certificate) must be used by every node for
the very next message. So nothing may be reused on faith: a caller takes a
:class:`LookupView` per message (or per batch of messages), which reads the store
generation once (:meth:`SyncStore.generation`, one indexed read), and answers from
memory only what was looked up under that same generation. Every write that can
change a lookup's answer moves the generation in its own transaction
(:func:`smimeproxy.keystore.schema.bump_generation`), so an answer read after the
generation was read is at least as new as every write the generation counts.

What is kept: whatever a caller loads through :meth:`LookupView.memo`, and the store
lookups below, including negative answers (no such user, no current key). Unsealed
private keys (signing identities, decryption keys) are kept too: in this process's
memory only, never written anywhere, never in a ``repr`` or a log line; they leave
memory when the generation moves, when the entry is evicted, or at :meth:`clear`.

Not guaranteed: answers that depend on the clock are never kept as verdicts; the
encryption lookup keeps its time-independent candidates and chooses among them at
each use (:class:`~smimeproxy.keystore.certificates.EncryptionCandidates`). A
change committed between the generation read and a lookup is seen by that lookup
(newer, never older, than the generation promises). A view held for a long batch
keeps answering from its generation until the batch ends: that is its purpose.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from smimeproxy.errors import KeyNotFound
from smimeproxy.keystore.certificates import EncryptionCandidates, normalise
from smimeproxy.keystore.interface import CertificateRecord, SigningIdentity
from smimeproxy.keystore.store import SyncStore
from smimeproxy.smime.keys import KeyPair

T = TypeVar("T")

#: Entries kept by default (a few thousand users' keys and partners' certificates).
DEFAULT_SIZE = 4096


class _Missing:
    """A cached KeyNotFound: raised anew (with its message) on every use."""

    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


class LookupCache:
    """A bounded LRU of store lookups, valid for one store generation at a time.

    Thread-safe: the faces' thread pools share one. Loads run outside the lock (they
    do database I/O); two threads missing the same entry both load it.
    ``size=0`` keeps nothing (every lookup goes to the store)."""

    def __init__(self, store: SyncStore, *, size: int = DEFAULT_SIZE):
        if size < 0:
            raise ValueError("a cache size cannot be negative")
        self.store = store
        self._size = size
        self._lock = threading.Lock()
        self._generation: int | None = None
        self._epoch = 0
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.resets = 0

    def __repr__(self) -> str:  # never the entries: they hold private keys
        return f"<LookupCache {len(self._entries)}/{self._size} entries of {self.store!r}>"

    def __len__(self) -> int:
        return len(self._entries)

    def view(self) -> LookupView:
        """Read the store generation once; lookups through the view are answered from
        memory when they were made under the same generation."""
        with self._lock:
            epoch = self._epoch
        return LookupView(self, self.store.generation(), epoch)

    def clear(self) -> None:
        """Forget everything (e.g. the configuration changed what a memo depends on).
        Views taken before keep working but no longer read or fill the cache."""
        with self._lock:
            self._entries.clear()
            self._generation = None
            self._epoch += 1

    def _get(self, view: LookupView, key: Hashable, load: Callable[[], T]) -> T:
        with self._lock:
            usable = view.epoch == self._epoch and self._size > 0
            if usable and view.generation != self._generation:
                self._entries.clear()
                self._generation = view.generation
                self.resets += 1
            if usable and key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                value = self._entries[key]
                if isinstance(value, _Missing):
                    raise KeyNotFound(value.message)
                return value  # type: ignore[no-any-return]
            self.misses += 1
        try:
            value = load()
        except KeyNotFound as e:
            self._put(view, key, _Missing(str(e)))
            raise
        self._put(view, key, value)
        return value

    def _put(self, view: LookupView, key: Hashable, value: Any) -> None:
        with self._lock:
            # only into the generation it was loaded under (another thread may have
            # moved the cache on meanwhile), and never after a clear()
            if view.epoch != self._epoch or view.generation != self._generation:
                return
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


class LookupView:
    """The store's lookups as of one generation read. Take one per message or per
    batch (:meth:`LookupCache.view`); the answers are those of
    :class:`SyncStore`."""

    __slots__ = ("_cache", "epoch", "generation")

    def __init__(self, cache: LookupCache, generation: int, epoch: int):
        self._cache = cache
        self.generation = generation
        self.epoch = epoch

    def __repr__(self) -> str:
        return f"<LookupView generation {self.generation}>"

    @property
    def store(self) -> SyncStore:
        return self._cache.store

    def memo(self, key: Hashable, load: Callable[[], T]) -> T:
        """``load()`` once per generation (for values built from store lookups, such
        as a path validator over the store's trust). ``load`` must read the store
        itself, after this view was taken; a KeyNotFound it raises is kept too."""
        return self._cache._get(self, ("memo", key), load)

    def signing_key(self, address: str) -> SigningIdentity:
        """:meth:`SyncStore.signing_key` (the unsealed key stays in memory)."""
        return self._cache._get(
            self, ("signing", normalise(address)), lambda: self.store.signing_key(address)
        )

    def decryption_keys(self, address_or_login: str) -> list[KeyPair]:
        """:meth:`SyncStore.decryption_keys` (a fresh list; the keys are shared)."""
        pairs = self._cache._get(
            self,
            ("decryption", normalise(address_or_login)),
            lambda: tuple(self.store.decryption_keys(address_or_login)),
        )
        return list(pairs)

    def encryption_candidates(self, address: str) -> EncryptionCandidates:
        return self._cache._get(
            self,
            ("encryption", normalise(address)),
            lambda: self.store.encryption_candidates(address),
        )

    def encryption_certificate(self, address: str) -> CertificateRecord | None:
        """:meth:`SyncStore.encryption_certificate`, chosen now among the kept
        candidates (validity is judged at each call, never kept)."""
        return self.encryption_candidates(address).best(self.store._now())
