"""IMAP proxy benchmark: the proxy against direct Dovecot access, measured in one run.

    python bench/imap.py [--messages 2000] [--encrypted 0.2] [--rounds 5] [--workers N]

Two mailboxes of ``--messages`` messages (4 KB to 100 KB): ``Plain`` (no S/MIME) and
``Mixed`` (``--encrypted`` of them encrypted to alice).  For each: the first sync
(``UID FETCH 1:* (FLAGS INTERNALDATE RFC822.SIZE ENVELOPE BODYSTRUCTURE)``),
``BODY.PEEK[]`` of 500 messages, and 20 concurrent clients doing the first sync, direct
and through the proxy.  The proxy's Mixed first sync is compared with direct time plus
the engine's own decryption time for those messages (measured here too); a second,
cached, sync and body fetch follow.  Proxy memory (RSS) is read from /proc.  The plain
cases are also run through a do-nothing Twisted TCP relay (``portforward``) in the same
run: the floor any Python proxy in front of Dovecot starts from on this host.

Every case runs once untimed, then ``--rounds`` times with direct, relay and proxy
interleaved (the same client code and work for each); the minimum and the median of
each are printed, and the ratios of both.  The cold first sync runs once by nature.

The proxy runs with ``[imap] workers`` (``--workers``, default one per core): stored
messages are opened in engine processes of their own, as deployed on a multi-core host;
``--workers 0`` opens them in the proxy's own thread pool. (On two cores the cold mixed
sync measured 1.39-1.48x of its budget with 0 workers, 1.32-1.42x with 1, 0.89-1.04x
with 2: the decryption comes in bursts, so unlike the gateway's steady load it gains
from a worker on the reactor's core too.)

Prints ratios; it is not a test and asserts nothing.
"""

from __future__ import annotations

import argparse
import imaplib
import os
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
from tests.procs import rss_kib

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
    """Resident memory of ``pid`` and its children (the engine worker processes)."""
    return rss_kib(pid) / 1024


def cpu_seconds(pid: int) -> float:
    """CPU time of all threads of ``pid`` so far (scheduler nanoseconds, not ticks)."""
    return (
        sum(
            int(stat.read_text().split()[0])
            for stat in Path(f"/proc/{pid}/task").glob("*/schedstat")
        )
        / 1e9
    )


def rounds(fns: dict[str, object], count: int) -> dict[str, list[float]]:
    """Each of ``fns`` once untimed (warm-up), then ``count`` rounds in which each runs
    once, interleaved (direct, relay, proxy, direct, ...), so drift on a shared host
    hits all of them alike."""
    for fn in fns.values():
        fn()  # type: ignore[operator]
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(count):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return times


def per_command_cpu(pid: int, fn, count: int = 5) -> float:  # type: ignore[no-untyped-def]
    """The proxy's CPU seconds per command of ``fn`` (500 commands), median of runs."""
    spent = []
    for _ in range(count):
        before = cpu_seconds(pid)
        fn()
        spent.append((cpu_seconds(pid) - before) / 500)
    return statistics.median(spent)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--encrypted", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="[imap] workers: engine processes (default: one per core)",
    )
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-imap-"))
    world = start_world(base, cache_bytes=256 << 20, extra=f"workers = {args.workers}")
    print(f"proxy: [imap] workers = {args.workers} on {os.cpu_count()} cores")
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

        def row(label: str, times: dict[str, list[float]], note: str) -> None:
            d, p = times["direct"], times["proxy"]
            ratio_min = min(p) / min(d)
            ratio_med = statistics.median(p) / statistics.median(d)
            if "relay" in times:
                r = times["relay"]
                note += f" (relay {min(r) / min(d):.2f}x min, "
                note += f"{statistics.median(r) / statistics.median(d):.2f}x median)"
            rows.append(
                (
                    label,
                    min(d),
                    statistics.median(d),
                    min(p),
                    statistics.median(p),
                    ratio_min,
                    ratio_med,
                    note,
                )
            )

        n = args.rounds
        for label, fn in (
            ("Plain first sync", lambda c: sync(c, "Plain")),
            ("Plain BODY.PEEK[] x500", lambda c: bodies(c, "Plain")),
            ("Plain 20 concurrent syncs", lambda c: concurrent(c, "Plain")),
        ):
            times = rounds(
                {
                    "direct": lambda fn=fn: fn(direct),
                    "relay": lambda fn=fn: fn(relayed),
                    "proxy": lambda fn=fn: fn(proxy),
                },
                n,
            )
            row(label, times, "target 1.5x")
        plain_cpu = per_command_cpu(world.proxy.pid, lambda: bodies(proxy, "Plain"))
        relay.terminate()
        relay.wait(10)
        d = min(timed(lambda: sync(direct, "Mixed")) for _ in range(n))
        p_first = timed(lambda: sync(proxy, "Mixed"))
        budget = d + 1.2 * decrypt
        rows.append(
            (
                "Mixed first sync (cold)",
                d,
                d,
                p_first,
                p_first,
                p_first / budget,
                p_first / budget,
                "vs direct+1.2*decrypt, one run",
            )
        )
        for label, fn in (
            ("Mixed sync (cached)", lambda c: sync(c, "Mixed")),
            ("Mixed BODY.PEEK[] x500 (cached)", lambda c: bodies(c, "Mixed")),
            ("Mixed 20 concurrent syncs", lambda c: concurrent(c, "Mixed")),
        ):
            times = rounds(
                {"direct": lambda fn=fn: fn(direct), "proxy": lambda fn=fn: fn(proxy)}, n
            )
            row(label, times, "target 1.5x")
        print(f"\n{n} interleaved rounds after a warm-up; times in seconds")
        print(
            f"{'case':32} {'direct min':>10} {'med':>6} {'proxy min':>10} {'med':>6}"
            f" {'ratio min':>9} {'med':>5}"
        )
        for label, dmin, dmed, pmin, pmed, rmin, rmed, note in rows:
            print(
                f"{label:32} {dmin:10.3f} {dmed:6.3f} {pmin:10.3f} {pmed:6.3f}"
                f" {rmin:9.2f} {rmed:5.2f}  {note}"
            )
        mixed_cpu = per_command_cpu(world.proxy.pid, lambda: bodies(proxy, "Mixed"))
        print(
            f"proxy CPU per BODY.PEEK[] (all threads, median of {n}):"
            f" plain {plain_cpu * 1e6:.0f} us, mixed cached {mixed_cpu * 1e6:.0f} us"
        )
        print(f"\nproxy RSS at end: {rss_mb(world.proxy.pid):.0f} MB (cache limit 256 MB)")
        sizes = [len(m) for m in secrets]
        if sizes:
            print(f"encrypted messages: {len(sizes)}, mean {statistics.mean(sizes) / 1024:.0f} KB")
        store.close()
    finally:
        world.stop()


if __name__ == "__main__":
    main()
