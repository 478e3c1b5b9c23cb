"""What the IMAP proxy reports to Prometheus (issue 8 metric names, used exactly).

One :class:`ImapMetrics` per service, shared by every session of every listener; the
registry is the process's (or a private one in tests).  Updates happen on the reactor
thread; the registry takes its own lock.

Not guaranteed: ``smimeproxy_imap_cache_bytes`` is refreshed after each FETCH that
touched the cache, not on a timer (eviction by another user's FETCH shows up then).
"""

from __future__ import annotations

from typing import Any

from smimeproxy.metrics import Registry


class ImapMetrics:
    """Sessions, cache use and decryptions of the IMAP proxy."""

    def __init__(self, registry: Registry | None = None):
        self.registry = registry if registry is not None else Registry()
        r = self.registry
        self.sessions = r.gauge("smimeproxy_imap_sessions", "Open IMAP client sessions")
        self.cache_requests = r.counter(
            "smimeproxy_imap_cache_requests_total",
            "Lookups of decrypted messages in the IMAP cache",
            ("result",),
        )
        self.cache_bytes = r.gauge(
            "smimeproxy_imap_cache_bytes", "Bytes of decrypted messages held in the IMAP cache"
        )
        self.decryptions = r.counter(
            "smimeproxy_imap_decryptions_total",
            "S/MIME messages the IMAP proxy tried to open for a FETCH",
            ("outcome",),
        )
        # show the gauges from the start (a scrape sees 0, not a missing series)
        self.sessions.inc(0)
        self.cache_bytes.inc(0)

    def cache_lookup(self, hit: bool) -> None:
        self.cache_requests.inc(result="hit" if hit else "miss")

    def decrypted(self, ok: bool) -> None:
        self.decryptions.inc(outcome="ok" if ok else "failed")

    def cache_size(self, cache: Any) -> None:
        if cache is not None:
            self.cache_bytes.set(cache.stats.bytes)
