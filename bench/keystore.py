"""Key store lookups at 10,000 users, on SQLite and PostgreSQL (not a timed test).

    python bench/keystore.py [--users 10000] [--lookups 5000] [--rotate 1000] [--pg URL]

Measures, per backend and on one thread (the blocking core the async face runs in
its pool):
- encryption lookup for a local user (their current certificate),
- encryption lookup for a partner address (external certificates),
- decryption-key lookup (every key of a user, unsealed),
- bulk rotation of ``--rotate`` users (seconds),
- the same lookups as the gateway makes them, through MessageProcessor: one store
  generation read per message, then lookups kept in memory under that generation
  (:mod:`smimeproxy.keystore.cache`, 4,096 entries); over ``--hot`` users (a working
  set that fits the cache) and over the addresses of all ``--lookups`` (per message
  three entries, so about 2x the cache at the defaults), with the hit rate,
and prints them next to the engine's own seal rate (4 KB, sign + encrypt to one
RSA-2048 recipient) measured in the same run: the issue's target is lookups at least
20x the engine's seal rate.

PostgreSQL: ``--pg URL`` or ``SMIMEPROXY_TEST_PG_URL``; otherwise a throwaway cluster
is started from /usr/lib/postgresql/*/bin (as the postgres user when run as root), and
skipped if none is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from smimeproxy.keystore import MasterSecret, SyncStore, open_store
from smimeproxy.processing import MessageProcessor
from smimeproxy.testing import CertificateFactory, Issued, smime_settings

SETTINGS = smime_settings("bench.test")


def rate(n: int, fn: Callable[[int], object]) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


def threaded_rate(threads: int, n: int, fn: Callable[[int], object]) -> float:
    """Lookups per second with ``threads`` workers, as the async face's pool runs them
    (one connection per thread)."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, range(threads)))  # open each thread's connection first
        start = time.perf_counter()
        list(pool.map(fn, range(n)))
        return n / (time.perf_counter() - start)


def engine_seal_rate(seconds: float = 1.5) -> float:
    """The engine's own seal rate (4 KB, sign + encrypt to one RSA-2048 recipient),
    measured here in the same run: the rate the lookups must stay far above."""
    from smimeproxy.smime.sealer import seal

    pki = CertificateFactory(root_key_kind="rsa2048")
    alice, bob = pki.user("alice@acme.test"), pki.user("bob@partner.test")
    body = b"x" * 4000 + b"\r\n"
    message = b"From: alice@acme.test\r\nTo: bob@partner.test\r\nSubject: b\r\n\r\n" + body
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        seal(message, signer=alice.pair, recipients=[bob.certificate])
        n += 1
    return n / (time.perf_counter() - start)


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[str | None]:
    bindir = next(
        (d for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
         if (d / "initdb").exists()),
        None,
    )  # fmt: skip
    if bindir is None:
        yield None
        return
    base = Path(tempfile.mkdtemp(prefix="smimeproxy-bench-pg-"))
    prefix = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = base / "data"
    try:
        subprocess.run(
            [*prefix, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
             "--no-sync"],
            check=True, capture_output=True,
        )  # fmt: skip
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w",
             "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start"],
            check=True, capture_output=True,
        )  # fmt: skip
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )  # fmt: skip
        shutil.rmtree(base, ignore_errors=True)


def populate(store: SyncStore, users: list[Issued], partners: list[Issued]) -> float:
    start = time.perf_counter()
    for issued in users:
        store.import_key(issued.private_key, issued.certificate)
    for issued in partners:
        store.harvest(issued.certificate, ("aes256_gcm", "aes256_cbc"), verified=True)
    return time.perf_counter() - start


def bench(
    name: str,
    store: SyncStore,
    users: list[Issued],
    partners: list[Issued],
    fresh: list[Issued],
    lookups: int,
    floor: float,
    hot: int,
) -> None:
    took = populate(store, users, partners)
    print(f"\n[{name}] populated {len(users)} users + {len(partners)} partners in {took:.1f} s")
    rng = random.Random(1)
    local = [rng.choice(users).certificate for _ in range(lookups)]
    local_addr = [c.extensions.get_extension_for_class(_san()).value for c in local]
    addresses = [str(v.get_values_for_type(_rfc822())[0]) for v in local_addr]
    partner_addresses = [
        f"partner{rng.randrange(len(partners))}@partner.test" for _ in range(lookups)
    ]

    results = {
        "encryption lookup, local user": rate(
            lookups, lambda i: store.encryption_certificate(addresses[i])
        ),
        "encryption lookup, partner": rate(
            lookups, lambda i: store.encryption_certificate(partner_addresses[i])
        ),
        "decryption keys (unsealed)": rate(lookups, lambda i: store.decryption_keys(addresses[i])),
        "signing key (unsealed)": rate(lookups, lambda i: store.signing_key(addresses[i])),
    }
    results["encryption lookup, local, 8 threads"] = threaded_rate(
        8, lookups, lambda i: store.encryption_certificate(addresses[i])
    )
    for label, per_second in results.items():
        print(f"  {label:37s} {per_second:10.0f} /s   {per_second / floor:6.1f}x engine seal")
    gateway(store, addresses, partner_addresses, lookups, floor, hot)
    start = time.perf_counter()
    for old, new in zip(users, fresh, strict=False):
        store.rotate(_address(old), new.private_key, new.certificate, actor="bench")
    print(f"  bulk rotation of {len(fresh)} users           {time.perf_counter() - start:10.2f} s")
    assert store.verify_audit().ok


def gateway(
    store: SyncStore,
    addresses: list[str],
    partner_addresses: list[str],
    lookups: int,
    floor: float,
    hot: int,
) -> None:
    """The lookups as MessageProcessor makes them: per message one generation read,
    then answers kept under that generation. ``hot``: the first that many distinct
    addresses of each list (a working set that fits the cache); else all of them."""
    print("  through MessageProcessor (1 generation read per message + kept lookups):")
    processor = MessageProcessor(store, SETTINGS)
    print(f"  {'generation read alone':37s} {rate(lookups, lambda i: store.generation()):10.0f} /s")
    for local, partner in (
        (_hot(addresses, hot), _hot(partner_addresses, hot)),
        (addresses, partner_addresses),
    ):
        label = f"{len(set(local))} users, random"
        _through_processor(processor, label, local, partner, lookups, floor)


def _through_processor(
    processor: MessageProcessor,
    label: str,
    local: list[str],
    partner: list[str],
    lookups: int,
    floor: float,
) -> None:
    cache = processor.cache
    cache.clear()
    # the measured pass visits the lookups in another random order than the warm-up
    # (a repeated cyclic order is the one pattern an LRU smaller than it always misses)
    order = list(range(lookups))
    random.Random(2).shuffle(order)

    def per_message(i: int) -> None:  # what seal_for looks up: signer, recipient, sender
        view = cache.view()
        view.signing_key(local[i % len(local)])
        view.encryption_certificate(partner[i % len(partner)])
        view.encryption_certificate(local[i % len(local)])

    def encryption(i: int) -> None:
        cache.view().encryption_certificate(partner[i % len(partner)])

    def decryption(i: int) -> None:
        processor.keys_for([local[i % len(local)]])

    for name, fn in (
        ("encryption lookup, partner", encryption),
        ("decryption keys (unsealed)", decryption),
        ("seal lookups per message (3)", per_message),
    ):
        rate(lookups, fn)  # warm up (and fill the cache)
        hits, misses = cache.hits, cache.misses
        per_second = rate(lookups, lambda i, fn=fn: fn(order[i]))
        share = (cache.hits - hits) / max(1, cache.hits - hits + cache.misses - misses)
        print(
            f"  {label[:22]:22s} {name:28s} {per_second:9.0f} /s"
            f" {per_second / floor:6.1f}x engine seal  {share:4.0%} hits"
        )


def _hot(addresses: list[str], n: int) -> list[str]:
    seen: dict[str, None] = {}
    for a in addresses:
        if len(seen) >= n:
            break
        seen.setdefault(a, None)
    return list(seen)


def _san():  # small helpers keep the lookups above readable
    from cryptography import x509

    return x509.SubjectAlternativeName


def _rfc822():
    from cryptography import x509

    return x509.RFC822Name


def _address(issued: Issued) -> str:
    san = issued.certificate.extensions.get_extension_for_class(_san()).value
    return str(san.get_values_for_type(_rfc822())[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--lookups", type=int, default=5_000)
    parser.add_argument("--rotate", type=int, default=1_000)
    parser.add_argument("--hot", type=int, default=1_000, help="users in the hot working set")
    parser.add_argument("--pg", default=os.environ.get("SMIMEPROXY_TEST_PG_URL"))
    args = parser.parse_args()

    floor = engine_seal_rate()
    print(f"engine seal rate (4 KB, sign + encrypt, same run): {floor:.0f} /s; target 20x")
    start = time.perf_counter()
    pki = CertificateFactory()
    users = [pki.user(f"user{n}@acme.test", key_kind="p256") for n in range(args.users)]
    partners = [pki.user(f"partner{n}@partner.test", key_kind="p256") for n in range(args.users)]
    fresh = [pki.user(_address(u), key_kind="p256") for u in users[: args.rotate]]
    print(f"made {len(users) + len(partners) + len(fresh)} certificates in "
          f"{time.perf_counter() - start:.1f} s")  # fmt: skip
    master = MasterSecret(os.urandom(32), "bench")

    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"sqlite:{tmp}/store.db", master, create=True)
        bench("sqlite", store, users, partners, fresh, args.lookups, floor, args.hot)

    with contextlib.ExitStack() as stack:
        url = args.pg or stack.enter_context(throwaway_cluster())
        if url is None:
            print("\n[postgresql] skipped: no server (--pg URL) and no PostgreSQL binaries")
            return
        store = open_store(url, master, create=True)
        bench("postgresql", store, users, partners, fresh, args.lookups, floor, args.hot)


if __name__ == "__main__":
    main()
