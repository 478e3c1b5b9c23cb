"""DecryptedCache: byte bounds, per-user caps, LRU order, thread safety."""

from __future__ import annotations

import random
import threading

import pytest

from smimeproxy.imap.cache import CacheStats, DecryptedCache
from smimeproxy.imap.views import MessageView


def view(size: int, tag: bytes = b"x") -> MessageView:
    """A message of exactly ``size`` bytes."""
    header = b"Subject: " + tag + b"\r\n\r\n"
    assert size >= len(header)
    return MessageView(header + b"a" * (size - len(header)))


def key(user: str, uid: int, mailbox: str = "INBOX", uidvalidity: int = 1) -> tuple:
    return (user, mailbox, uidvalidity, uid)


def test_hit_miss_and_stats():
    cache = DecryptedCache(10_000)
    v = view(100)
    assert cache.get(key("alice", 1)) is None
    cache.put(key("alice", 1), v)
    assert cache.get(key("alice", 1)) is v
    assert cache.get(key("alice", 1, uidvalidity=2)) is None  # new UIDVALIDITY: new message
    assert cache.stats == CacheStats(hits=1, misses=2, bytes=100, entries=1)
    hits, misses, size, entries = cache.stats
    assert (hits, misses, size, entries) == (1, 2, 100, 1)


def test_total_bytes_never_exceed_the_bound_and_oldest_go_first():
    cache = DecryptedCache(1000, per_user_bytes=1000)
    for uid in range(1, 11):
        cache.put(key(f"user{uid}", uid), view(300))
        assert cache.stats.bytes <= 1000
    # only the three most recent fit
    assert [uid for uid in range(1, 11) if key(f"user{uid}", uid) in cache] == [8, 9, 10]


def test_get_refreshes_recency():
    cache = DecryptedCache(900, per_user_bytes=900)
    for uid in (1, 2, 3):
        cache.put(key("alice", uid), view(300))
    assert cache.get(key("alice", 1)) is not None  # 1 is now the most recent
    cache.put(key("alice", 4), view(300))
    assert key("alice", 2) not in cache
    assert all(key("alice", uid) in cache for uid in (1, 3, 4))


def test_one_user_cannot_evict_everyone():
    cache = DecryptedCache(4000)  # per-user cap defaults to a quarter: 1000
    assert cache.per_user_bytes == 1000
    for uid in range(3):
        cache.put(key("bob", uid), view(300))
        cache.put(key("carol", uid), view(300))
    for uid in range(100):  # alice syncs a big mailbox
        cache.put(key("alice", uid), view(250))
        assert cache.user_bytes("alice") <= 1000
    assert all(key(u, i) in cache for u in ("bob", "carol") for i in range(3))
    assert cache.user_bytes("alice") == 1000
    assert [i for i in range(100) if key("alice", i) in cache] == [96, 97, 98, 99]
    assert cache.stats.bytes == 1000 + 2 * 900


def test_views_larger_than_the_cap_are_not_cached():
    cache = DecryptedCache(4000, per_user_bytes=500)
    cache.put(key("alice", 1), view(400))
    cache.put(key("alice", 2), view(501))
    assert key("alice", 2) not in cache
    assert key("alice", 1) in cache  # nothing was evicted for it
    assert cache.stats.bytes == 400


def test_replacing_a_key_does_not_double_count():
    cache = DecryptedCache(1000, per_user_bytes=1000)
    cache.put(key("alice", 1), view(300))
    cache.put(key("alice", 1), view(200, b"y"))
    assert cache.stats.bytes == 200 and len(cache) == 1
    assert cache.get(key("alice", 1)).section("HEADER.FIELDS (SUBJECT)") == b"Subject: y\r\n\r\n"


def test_drop_user_and_drop():
    cache = DecryptedCache(10_000)
    for uid in range(3):
        cache.put(key("alice", uid), view(100))
        cache.put(key("bob", uid), view(100))
    cache.drop_user("alice")
    assert cache.user_bytes("alice") == 0
    assert not any(key("alice", uid) in cache for uid in range(3))
    cache.drop(key("bob", 0))
    assert cache.stats.bytes == 200 and len(cache) == 2
    cache.drop_user("nobody")  # unknown user: nothing happens
    cache.clear()
    assert cache.stats.bytes == 0 and len(cache) == 0


def test_zero_sized_cache_caches_nothing():
    cache = DecryptedCache(0)
    cache.put(key("alice", 1), view(50))
    assert len(cache) == 0


def test_invalid_sizes_are_refused():
    with pytest.raises(ValueError):
        DecryptedCache(-1)


def test_thread_safety_under_concurrent_use():
    cache = DecryptedCache(20_000, per_user_bytes=6_000)
    views = [view(random.Random(i).randint(40, 900), b"%d" % i) for i in range(50)]
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        rng = random.Random(n)
        user = f"user{n % 5}"
        try:
            for _ in range(2000):
                uid = rng.randrange(50)
                op = rng.random()
                if op < 0.6:
                    got = cache.get(key(user, uid))
                    assert got is None or got is views[uid]
                elif op < 0.95:
                    cache.put(key(user, uid), views[uid])
                elif op < 0.99:
                    cache.drop(key(user, uid))
                else:
                    cache.drop_user(user)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = cache.stats
    assert stats.bytes <= 20_000
    held = [(u, uid) for u in (f"user{i}" for i in range(5)) for uid in range(50)]
    present = [(u, uid) for u, uid in held if key(u, uid) in cache]
    assert stats.entries == len(present)
    assert stats.bytes == sum(len(views[uid].data) for _, uid in present)
    for i in range(5):
        assert cache.user_bytes(f"user{i}") <= 6_000
