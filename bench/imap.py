"""IMAP proxy benchmark: the proxy against direct Dovecot access, measured in one run.

    python bench/imap.py [--messages 2000] [--encrypted 0.2]

Two mailboxes of ``--messages`` messages (4 KB to 100 KB): ``Plain`` (no S/MIME) and
``Mixed`` (``--encrypted`` of them encrypted to alice).  For each: the first sync
(``UID FETCH 1:* (FLAGS INTERNALDATE RFC822.SIZE ENVELOPE BODYSTRUCTURE)``),
``BODY.PEEK[]`` of 500 messages, and 20 concurrent clients doing the first sync, direct
and through the proxy.  The proxy's Mixed first sync is compared with direct time plus
the engine's own decryption time for those messages (measured here too); a second,
cached, sync and body fetch follow.  Proxy memory (RSS) is read from /proc.  The plain
cases are also run through a do-nothing Twisted TCP relay (``portforward``) in the same
run: the floor any Python proxy in front of Dovecot starts from on this host.

Prints ratios; it is not a test and asserts nothing.
"""

from __future__ import annotations

import argparse
import imaplib
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smimeproxy.config import load_config
from smimeproxy.keystore import open_store
from smimeproxy.keystore.sealing import MasterSecret
from smimeproxy.processing import MessageProcessor
from tests.integration.imap_world import PASSWORDS, World, free_port, plain_message, start_world

RELAY = """
import sys
from twisted.internet import reactor
from twisted.protocols.portforward import ProxyFactory
port, upstream = int(sys.argv[1]), int(sys.argv[2])
reactor.listenTCP(port, ProxyFactory("127.0.0.1", upstream), interface="127.0.0.1")
reactor.callWhenRunning(lambda: print("READY", flush=True))
reactor.run()
"""


def start_relay(upstream: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    relay = subprocess.Popen(
        [sys.executable, "-c", RELAY, str(port), str(upstream)], stdout=subprocess.PIPE
    )
    assert relay.stdout is not None and b"READY" in relay.stdout.readline()
    return relay, port


SYNC = "(FLAGS INTERNALDATE RFC822.SIZE ENVELOPE BODYSTRUCTURE)"


def body(size: int, rng: random.Random) -> str:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    out = []
    length = 0
    while length < size:
        line = " ".join(rng.choice(words) for _ in range(12))
        out.append(line)
        length += len(line) + 2
    return "\r\n".join(out)


def populate(world: World, name: str, count: int, encrypted: float) -> list[bytes]:
    rng = random.Random(name)
    c = world.direct()
    c.create(name)
    secrets = []
    for i in range(count):
        text = body(rng.randint(4096, 100 * 1024), rng)
        if rng.random() < encrypted:
            data = world.encrypted(f"{name} {i}", text)
            secrets.append(data)
        else:
            data = plain_message(f"{name} {i}", text)
        assert c.append(name, None, None, data)[0] == "OK"
    c.logout()
    return secrets


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sync(connect, name: str) -> None:  # type: ignore[no-untyped-def]
    c = connect()
    c.select(name, readonly=True)
    typ, _data = c.uid("FETCH", "1:*", SYNC)
    assert typ == "OK"
    c.logout()


def bodies(connect, name: str, n: int = 500) -> None:  # type: ignore[no-untyped-def]
    c = connect()
    c.select(name, readonly=True)
    for uid in range(1, n + 1):
        typ, _ = c.uid("FETCH", str(uid), "(BODY.PEEK[])")
        assert typ == "OK"
    c.logout()


def concurrent(connect, name: str, clients: int = 20) -> None:  # type: ignore[no-untyped-def]
    threads = [threading.Thread(target=sync, args=(connect, name)) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def best(fn, repeat: int = 3) -> float:  # type: ignore[no-untyped-def]
    return min(timed(fn) for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--encrypted", type=float, default=0.2)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-imap-"))
    world = start_world(base, cache_bytes=256 << 20)
    try:
        t0 = time.perf_counter()
        populate(world, "Plain", args.messages, 0.0)
        secrets = populate(world, "Mixed", args.messages, args.encrypted)
        print(f"populated 2 x {args.messages} messages in {time.perf_counter() - t0:.1f}s")
        print(f"proxy RSS at start: {rss_mb(world.proxy.pid):.0f} MB")

        config = load_config(world.config)
        store = open_store(
            f"sqlite:{base / 'store.db'}", MasterSecret.from_file(base / "master.key")
        )
        processor = MessageProcessor(store, config.smime)
        decrypt = timed(lambda: [processor.open_for(m, ["alice@acme.test"]) for m in secrets])
        print(f"engine: {len(secrets)} decryptions in {decrypt:.2f}s")

        direct, proxy = world.direct, world.client
        relay, relay_port = start_relay(world.dovecot.port)

        def relayed() -> imaplib.IMAP4:
            c = imaplib.IMAP4("127.0.0.1", relay_port)
            c.login("alice", PASSWORDS["alice"])
            return c

        rows = []
        for label, fn in (
            ("Plain first sync", lambda c: sync(c, "Plain")),
            ("Plain BODY.PEEK[] x500", lambda c: bodies(c, "Plain")),
            ("Plain 20 concurrent syncs", lambda c: concurrent(c, "Plain")),
        ):
            d = best(lambda fn=fn: fn(direct))
            r = best(lambda fn=fn: fn(relayed))
            p = best(lambda fn=fn: fn(proxy))
            rows.append((label, d, p, p / d, f"target 1.5x (relay {r / d:.2f}x)"))
        relay.terminate()
        relay.wait(10)
        d = best(lambda: sync(direct, "Mixed"))
        p_first = timed(lambda: sync(proxy, "Mixed"))
        budget = d + 1.2 * decrypt
        rows.append(
            ("Mixed first sync (cold)", d, p_first, p_first / budget, "vs direct+1.2*decrypt")
        )
        p_cached = best(lambda: sync(proxy, "Mixed"))
        rows.append(("Mixed sync (cached)", d, p_cached, p_cached / d, "target 1.5x"))
        d = best(lambda: bodies(direct, "Mixed"))
        p = best(lambda: bodies(proxy, "Mixed"))
        rows.append(("Mixed BODY.PEEK[] x500 (cached)", d, p, p / d, "target 1.5x"))
        d = best(lambda: concurrent(direct, "Mixed"))
        p = best(lambda: concurrent(proxy, "Mixed"))
        rows.append(("Mixed 20 concurrent syncs", d, p, p / d, "target 1.5x"))
        print(f"\n{'case':34} {'direct s':>9} {'proxy s':>9} {'ratio':>7}")
        for label, d, p, ratio, note in rows:
            print(f"{label:34} {d:9.3f} {p:9.3f} {ratio:7.2f}  {note}")
        print(f"\nproxy RSS at end: {rss_mb(world.proxy.pid):.0f} MB (cache limit 256 MB)")
        sizes = [len(m) for m in secrets]
        if sizes:
            print(f"encrypted messages: {len(sizes)}, mean {statistics.mean(sizes) / 1024:.0f} KB")
        store.close()
    finally:
        world.stop()


if __name__ == "__main__":
    main()
