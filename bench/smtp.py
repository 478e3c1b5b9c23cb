"""SMTP gateway throughput and memory (not a timed test).

    python bench/smtp.py [--messages 2000] [--sessions 10] [--memory-messages 10000]

Load generator: Postfix's ``smtp-source`` (10 concurrent sessions, 4 KB messages);
next hop: Postfix's ``smtp-sink``. Measured in the same run:

- direct: smtp-source straight into smtp-sink (the ceiling);
- pass-through: through the gateway (sender and recipient not local: relayed as is);
- sign + encrypt: through the gateway (local sender with a key, partner recipient with
  a certificate: signed, encrypted to recipient and sender);
- the engine's in-process seal rate (``MessageProcessor.seal_for`` on one thread, the
  same 4 KB message, the same key store);
- the gateway's resident memory (with its worker processes) after 10% and after 100% of
  ``--memory-messages`` pass-through messages (flat means no growth per message);
- the gateway's CPU time per message: reactor thread, pool threads and worker
  processes apart (from ``/proc``).

The gateway runs with ``[smtp] workers`` (``--workers``, default one per core but the
reactor's): the engine in processes of its own, as deployed on a multi-core host. With
``--workers 0`` the engine shares the gateway's process (and GIL) with the reactor.

The gateway runs in a child process (its own reactor and thread pool), as deployed.
Targets (issue 4): pass-through >= 30% of direct; sign + encrypt >= 60% of the
engine's single-process rate; memory flat.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smimeproxy.config import load_config
from smimeproxy.keystore import MasterSecret, create_key_file, open_store
from smimeproxy.processing import MessageProcessor
from smimeproxy.testing import CertificateFactory
from tests.ports import free_port, wait_port
from tests.procs import children, rss_kib


def tool(name: str) -> str:
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None
    )
    if path is None:
        raise SystemExit(f"{name} is missing: apt-get install -y postfix")
    return path


def setup(base: Path, gateway_port: int, sink_port: int, workers: int) -> tuple[Path, bytes]:
    """A config and a store: alice@acme.test (local, key), bob@partner.test (certificate)."""
    config_path = base / "smimeproxy.toml"
    config_path.write_text(
        f"""
[keystore]
url = "sqlite:store.db"
master_key_file = "master.key"
[smime]
authserv_id = "mx.acme.test"
[smtp]
listen = ["tcp:{gateway_port}:interface=127.0.0.1"]
next_hop = "tcp:127.0.0.1:{sink_port}"
local_domains = ["acme.test"]
workers = {workers}
"""
    )
    material = create_key_file(base / "master.key").material
    config = load_config(config_path)
    store = open_store(config.keystore.url, MasterSecret(material, "bench"), create=True)
    pki = CertificateFactory()
    alice, bob = pki.user("alice@acme.test"), pki.user("bob@partner.test")
    store.add_trust(pki.root.certificate)
    store.import_key(alice.private_key, alice.certificate)
    store.import_certificate(bob.certificate)
    return config_path, material


def run_gateway(config_path: str, material: bytes) -> None:
    """Child process: the gateway with its own reactor."""
    from twisted.internet import reactor

    from smimeproxy.smtp import make_service

    config = load_config(config_path)
    store = open_store(config.keystore.url, MasterSecret(material, "bench"))
    processor = MessageProcessor(store, config.smime)
    reactor.suggestThreadPoolSize(4)
    make_service(config, processor, reactor).startService()
    reactor.run()


def source(port: int, messages: int, sessions: int, sender: str, rcpt: str) -> float:
    """Messages per second that smtp-source got accepted."""
    start = time.perf_counter()
    subprocess.run(
        [tool("smtp-source"), "-s", str(sessions), "-m", str(messages), "-l", "4096",
         "-f", sender, "-t", rcpt, "-M", "client.test", f"127.0.0.1:{port}"],
        check=True, timeout=3600,
    )  # fmt: skip
    return messages / (time.perf_counter() - start)


def cpu_seconds(pid: int) -> tuple[float, float, float]:
    """(reactor thread, all other threads, worker processes) CPU seconds of process
    ``pid`` and its children so far."""
    tick = os.sysconf("SC_CLK_TCK")
    main_thread = other = workers = 0.0
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        seconds = (int(fields[11]) + int(fields[12])) / tick
        if stat.parent.name == str(pid):
            main_thread += seconds
        else:
            other += seconds
    for child in children(pid):  # the engine's worker processes
        try:
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended meanwhile
        workers += (int(fields[11]) + int(fields[12])) / tick
    return main_thread, other, workers


def measured(pid: int, run) -> tuple[float, tuple[float, ...]]:  # type: ignore[no-untyped-def]
    """``run()``'s rate and the gateway's (reactor, threads, worker processes) CPU
    microseconds per message."""
    before = cpu_seconds(pid)
    rate, n = run()
    after = cpu_seconds(pid)
    return rate, tuple((a - b) / n * 1e6 for a, b in zip(after, before, strict=True))  # type: ignore[return-value]


def engine_rate(config_path: Path, material: bytes, n: int) -> float:
    config = load_config(config_path)
    processor = MessageProcessor(
        open_store(config.keystore.url, MasterSecret(material, "b")), config.smime
    )
    body = b"x" * 4000
    message = (
        b"From: <alice@acme.test>\r\nTo: <bob@partner.test>\r\nSubject: bench\r\n\r\n"
        + b"\r\n".join(body[i : i + 72] for i in range(0, len(body), 72))
        + b"\r\n"
    )
    processor.seal_for(message, "alice@acme.test", ["bob@partner.test"])  # warm up
    start = time.perf_counter()
    for _ in range(n):
        processor.seal_for(message, "alice@acme.test", ["bob@partner.test"])
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--memory-messages", type=int, default=10_000)
    parser.add_argument(
        "--workers",
        type=int,
        default=max((os.cpu_count() or 2) - 1, 1),
        help="[smtp] workers: engine processes (default: one per core but the reactor's)",
    )
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="smimeproxy-bench-smtp-"))
    sink_port, gateway_port = free_port(), free_port()
    sink = subprocess.Popen([tool("smtp-sink"), "-u", "nobody", f"127.0.0.1:{sink_port}", "256"])
    config_path, material = setup(base, gateway_port, sink_port, args.workers)
    ctx = multiprocessing.get_context("spawn")
    gateway = ctx.Process(target=run_gateway, args=(str(config_path), material))
    try:
        wait_port(sink_port)
        gateway.start()
        wait_port(gateway_port)
        n, s = args.messages, args.sessions
        direct = source(sink_port, n, s, "x@elsewhere.test", "y@partner.test")
        passthrough, pass_cpu = measured(
            gateway.pid,
            lambda: (source(gateway_port, n, s, "x@elsewhere.test", "y@partner.test"), n),
        )
        sealed_n = max(n // 4, 100)
        sealing, seal_cpu = measured(
            gateway.pid,
            lambda: (
                source(gateway_port, sealed_n, s, "alice@acme.test", "bob@partner.test"),
                sealed_n,
            ),
        )
        engine = engine_rate(config_path, material, max(sealed_n // 4, 50))
        m = args.memory_messages
        source(gateway_port, m // 10, s, "x@elsewhere.test", "y@partner.test")
        rss_early = rss_kib(gateway.pid)
        source(gateway_port, m - m // 10, s, "x@elsewhere.test", "y@partner.test")
        rss_late = rss_kib(gateway.pid)
    finally:
        if gateway.is_alive():
            gateway.terminate()
            gateway.join(10)
        sink.terminate()
        sink.wait(10)
        shutil.rmtree(base, ignore_errors=True)

    print(f"4 KB messages, {s} concurrent sessions (smtp-source -> [gateway ->] smtp-sink)")
    print(f"  direct into smtp-sink          {direct:9.0f} msg/s")
    print(f"  pass-through via gateway       {passthrough:9.0f} msg/s  "
          f"= {passthrough / direct:.0%} of direct (target >= 30%)")  # fmt: skip
    print(f"  sign+encrypt via gateway       {sealing:9.0f} msg/s  "
          f"= {sealing / engine:.0%} of the engine's one-thread rate (target >= 60%)")  # fmt: skip
    print(f"  engine seal_for, one thread    {engine:9.0f} msg/s = {1e6 / engine:.0f} us/msg")
    print(f"  gateway: [smtp] workers = {args.workers} on {os.cpu_count()} cores")
    print("  gateway CPU per message (us)   reactor thread  pool threads  worker processes")
    for name, cpu in (("pass-through", pass_cpu), ("sign+encrypt", seal_cpu)):
        print(f"    {name:<28} {cpu[0]:9.0f}  {cpu[1]:12.0f}  {cpu[2]:16.0f}")
    print(f"  gateway RSS after {m // 10} msgs   {rss_early / 1024:9.1f} MiB")
    print(f"  gateway RSS after {m} msgs  {rss_late / 1024:9.1f} MiB  "
          f"(growth {(rss_late - rss_early) / 1024:+.1f} MiB)")  # fmt: skip


if __name__ == "__main__":
    main()
