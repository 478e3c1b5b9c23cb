"""What the directory publishes: each local user's current certificate, read live from
the key store.

Every face of the directory (DNS, HTTP, zone text, dynamic-update push) asks the same
question: "which certificates does this SMIMEA owner name, or this address, stand
for right now?". :class:`Publication` answers it from the store, with a cache that is
never stale beyond one question: before answering, it reads the store's audit head
(one cheap query) and drops whatever the new audit entries could have changed.

That relies on a property of the key store (``smimeproxy.keystore``): every change to
users, addresses or keys is audited in the same transaction that makes it, under an
action named ``user.*`` or ``key.*``. Changes to partners' certificates, trust and
CRLs (``certificate.*``, ``trust.*``, ``crl.*``) do not change what we publish and
leave the cache alone. If the store ever changed a key without auditing it, this
cache would miss it: that is the one thing it trusts.

What is *not* published: revoked and previous keys, and a current certificate that
has expired (the next question after its ``notAfter`` no longer sees it). The
certificate's chain is not checked here: a user's current key is published because
an administrator made it current.

:class:`LivePublication` is the asynchronous face for Twisted: questions queue up and
are answered in batches in the injected thread pool, each batch after a fresh audit
check started *after* every question in it arrived.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from smimeproxy.errors import ConfigError, KeyNotFound
from smimeproxy.keystore import KeyState, SyncStore
from smimeproxy.pki.smimea import smimea_owner_name

__all__ = ["LivePublication", "Publication", "Published"]

#: audit actions that can change what is published (see the module docstring)
_RELEVANT_ACTIONS = ("key.", "user.")
#: past this many new audit entries, drop everything instead of reading them all
_MAX_AUDIT_SCAN = 2000


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class Published:
    """The certificates published for one address (under its SMIMEA owner name)."""

    address: str
    owner: str  # the SMIMEA owner name, lower case, no trailing dot
    certificates: tuple[x509.Certificate, ...]


class Publication:
    """Blocking, thread-safe view of the certificates the directory publishes for
    ``domains``. Call from a thread (the CLI, or the pool of :class:`LivePublication`).

    ``serial()`` is the audit head's sequence number: it grows with every change the
    store audits, so it serves as the SOA serial (RFC 1982 arithmetic is not needed
    before 2**31 audit entries).
    """

    _log = Logger()

    def __init__(
        self,
        store: SyncStore,
        domains: Iterable[str],
        *,
        now: Callable[[], datetime.datetime] = _utcnow,
    ) -> None:
        self.store = store
        self.domains = tuple(sorted({d.strip().lower().rstrip(".") for d in domains}))
        if not self.domains:
            raise ConfigError("the directory publishes no domains")
        self._now = now
        self._lock = threading.Lock()
        self._seq = -1  # audit sequence the caches reflect; -1: nothing read yet
        self._index: dict[str, str] | None = None  # owner name -> address
        self._answers: dict[str, Published | None] = {}

    # -- freshness ------------------------------------------------------------------

    def refresh(self) -> int:
        """Read the audit head and drop cached answers that newer entries could have
        changed; returns the audit sequence number now reflected."""
        with self._lock:
            return self._refresh()

    def _refresh(self) -> int:
        seq, _ = self.store.audit_head()
        if seq == self._seq:
            return seq
        if self._seq < 0 or seq < self._seq or seq - self._seq > _MAX_AUDIT_SCAN:
            self._index = None
            self._answers.clear()
        else:
            entries = self.store.audit_entries(after=self._seq)
            actions = [e.action for e in entries]
            if any(a.startswith("user.") for a in actions):
                self._index = None
                self._answers.clear()
            elif any(a.startswith(_RELEVANT_ACTIONS) for a in actions):
                self._answers.clear()
            if entries:
                seq = max(seq, max(e.seq for e in entries))
        self._seq = seq
        return seq

    def serial(self) -> int:
        """The SOA serial: the audit sequence number after a refresh."""
        return self.refresh() & 0xFFFFFFFF

    # -- answers --------------------------------------------------------------------

    def _build_index(self) -> dict[str, str]:
        index: dict[str, str] = {}
        for user in self.store.users():
            for address in user.addresses:
                domain = address.rpartition("@")[2]
                if domain not in self.domains:
                    continue
                try:
                    index[smimea_owner_name(address)] = address
                except ConfigError:
                    continue  # an address DNS cannot name is not published
        self._log.debug("directory index rebuilt: {count} names", count=len(index))
        return index

    def _published(self, address: str, owner: str) -> Published | None:
        now = self._now()
        try:
            records = self.store.keys(address)
        except KeyNotFound:
            return None
        certs = tuple(
            r.certificate
            for r in records
            if r.state is KeyState.CURRENT and r.certificate.not_valid_after_utc > now
        )
        if not certs:
            return None
        return Published(address, owner, certs)

    def _lookup(self, owner: str) -> Published | None:
        owner = owner.lower().rstrip(".")
        if owner in self._answers:
            found = self._answers[owner]
            now = self._now()
            if found is None or all(c.not_valid_after_utc > now for c in found.certificates):
                return found
        if self._index is None:
            self._index = self._build_index()
        address = self._index.get(owner)
        found = None if address is None else self._published(address, owner)
        self._answers[owner] = found
        return found

    def by_owner(self, owner: str) -> Published | None:
        """The certificates under SMIMEA owner name ``owner`` (None: no such name)."""
        with self._lock:
            self._refresh()
            return self._lookup(owner)

    def by_owners(self, owners: Sequence[str]) -> tuple[int, list[Published | None]]:
        """One audit check, then every owner: ``(serial, answers)`` in order."""
        with self._lock:
            seq = self._refresh()
            return seq & 0xFFFFFFFF, [self._lookup(o) for o in owners]

    def by_address(self, address: str) -> Published | None:
        """The certificates published for ``address`` (one of our domains' users).
        None for an address outside our domains, an unknown user, or one without a
        current certificate."""
        address = address.strip().lower()
        if address.rpartition("@")[2] not in self.domains:
            return None
        try:
            owner = smimea_owner_name(address)
        except ConfigError:
            return None
        return self.by_owner(owner)

    def everything(self, domain: str) -> list[Published]:
        """Every published address of ``domain``, sorted by owner name (for zone text
        and pushes)."""
        domain = domain.strip().lower().rstrip(".")
        with self._lock:
            self._refresh()
            if self._index is None:
                self._index = self._build_index()
            owners = sorted(o for o, a in self._index.items() if a.rpartition("@")[2] == domain)
            return [p for o in owners if (p := self._lookup(o)) is not None]


class LivePublication:
    """The asynchronous face of a :class:`Publication` for the DNS and HTTP servers.

    Questions are answered in batches in ``threadpool``: a batch takes every question
    waiting when it starts and runs one audit check for all of them, so a question is
    never answered from state read before it arrived, and a burst of queries costs one
    store round trip instead of one each.
    """

    def __init__(
        self, publication: Publication, reactor: IReactorFromThreads, threadpool: ThreadPool
    ) -> None:
        self.publication = publication
        self._reactor = reactor
        self._threadpool = threadpool
        self._waiting: list[tuple[str, Deferred[tuple[int, Published | None]]]] = []
        self._running = False

    def by_owner(self, owner: str) -> Deferred[tuple[int, Published | None]]:
        """``(serial, published or None)`` for the owner name, read after this call."""
        d: Deferred[tuple[int, Published | None]] = Deferred()
        self._waiting.append((owner, d))
        if not self._running:
            self._next_batch()
        return d

    def by_address(self, address: str) -> Deferred[Published | None]:
        return deferToThreadPool(
            self._reactor, self._threadpool, self.publication.by_address, address
        )

    def _next_batch(self) -> None:
        batch, self._waiting = self._waiting, []
        if not batch:
            self._running = False
            return
        self._running = True
        owners = [o for o, _ in batch]
        d = deferToThreadPool(self._reactor, self._threadpool, self.publication.by_owners, owners)

        def done(result: tuple[int, list[Published | None]]) -> None:
            serial, answers = result
            for (_, waiter), answer in zip(batch, answers, strict=True):
                waiter.callback((serial, answer))

        def failed(failure: Failure) -> None:
            for _, waiter in batch:
                waiter.errback(failure)

        d.addCallbacks(done, failed)
        d.addBoth(lambda _: self._next_batch())
