"""SMIMEA queries per second: the built-in server beside BIND 9, same zone, same run.

    python bench/directory.py [--users 10000] [--seconds 10] [--clients 4]

Builds a SQLite key store with ``--users`` local users (P-256 certificates, so that
each answer fits one EDNS UDP datagram), starts

- the built-in directory server (``make_service`` from a config, in a child process,
  one reactor thread plus its store thread pool), and
- BIND 9 (``named``, one worker thread: ``-n 1``) serving the same records as a zone
  file written by ``smimeproxy directory zone``'s code,

both on 127.0.0.1, and runs ``dnsperf`` (UDP, EDNS0, random existing users, 100
queries outstanding) against each for ``--seconds``. Prints queries per second and the
ratio built-in / BIND (the issue's target: at least 0.30). Not a timed test.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smimeproxy.directory.publication import Publication
from smimeproxy.directory.zone import zone_file
from smimeproxy.keystore import create_key_file
from smimeproxy.pki.smimea import smimea_owner_name
from smimeproxy.processing import open_configured_store
from smimeproxy.testing import CertificateFactory
from tests.integration.bind import free_port


def serve(config: str) -> None:
    """Child process: run the directory service of ``config`` until killed."""
    from twisted.internet import reactor

    from smimeproxy.config import load_config
    from smimeproxy.directory.service import make_service

    cfg = load_config(config)
    store = open_configured_store(cfg)
    service = make_service(cfg, store, reactor, nameserver="ns1.acme.test")
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


def dnsperf(port: int, queries: Path, seconds: int, clients: int) -> float:
    out = subprocess.run(
        ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-l", str(seconds),
         "-c", str(clients), "-q", "100", "-e", "-t", "2"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    qps = re.search(r"Queries per second:\s+([\d.]+)", out)
    lost = re.search(r"Queries lost:\s+(\d+)", out)
    completed = re.search(r"Queries completed:\s+(\d+)", out)
    if qps is None:
        raise RuntimeError(out)
    print(f"    completed {completed.group(1) if completed else '?'}, "
          f"lost {lost.group(1) if lost else '?'}")  # fmt: skip
    return float(qps.group(1))


def wait_answering(port: int, name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["dig", "@127.0.0.1", "-p", str(port), "+time=1", "+tries=1", name, "SMIMEA"],
            capture_output=True, text=True, check=False,
        ).stdout  # fmt: skip
        if "status: NOERROR" in out and "ANSWER: 1" in out:
            return
        time.sleep(0.3)
    raise RuntimeError(f"nothing answers on port {port}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    for tool in ("dnsperf", "named", "dig"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (Debian: dnsperf, bind9, bind9-dnsutils)")
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="smimeproxy-bench-"))
    os.chmod(tmp, 0o755)
    ours_port, bind_port = free_port(), free_port()
    config = tmp / "smimeproxy.toml"
    config.write_text(
        f"""
[keystore]
url = "sqlite:store.db"
master_key_file = "master.key"

[directory]
dns_listen = ["udp:{ours_port}:interface=127.0.0.1"]
domains = ["acme.test"]
"""
    )
    create_key_file(tmp / "master.key")
    from smimeproxy.config import load_config

    store = open_configured_store(load_config(config), create=True)
    pki = CertificateFactory()
    start = time.perf_counter()
    addresses = [f"user{n}@acme.test" for n in range(args.users)]
    for address in addresses:
        issued = pki.user(address, key_kind="p256")
        store.import_key(issued.private_key, issued.certificate)
    print(f"{args.users} users in the store in {time.perf_counter() - start:.1f} s")

    publication = Publication(store, ["acme.test"])
    zone = tmp / "named" / "zone.db"
    zone.parent.mkdir()
    published = publication.everything("acme.test")
    serial = publication.serial()
    zone.write_text(zone_file("acme.test", published, serial=serial, nameserver="ns1.acme.test"))
    store.close()
    (tmp / "named" / "named.conf").write_text(
        f"""
options {{
    directory "{tmp / "named"}";
    listen-on port {bind_port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    pid-file "{tmp / "named" / "named.pid"}";
    session-keyfile "{tmp / "named" / "session.key"}";
    recursion no;
    minimal-responses yes;
}};
controls {{ }};
zone "_smimecert.acme.test" {{ type primary; file "{zone}"; }};
"""
    )
    rng = random.Random(7)
    queries = tmp / "queries.txt"
    queries.write_text(
        "".join(f"{smimea_owner_name(rng.choice(addresses))}. SMIMEA\n" for _ in range(50_000))
    )
    sample = smimea_owner_name(addresses[0])

    ours = subprocess.Popen([sys.executable, __file__, "--serve", str(config)])
    bind_argv = ["named", "-g", "-n", "1", "-c", str(tmp / "named" / "named.conf")]
    if os.geteuid() == 0 and shutil.which("named"):
        subprocess.run(["chown", "-R", "bind:bind", str(tmp / "named")], check=False)
        bind_argv += ["-u", "bind"]
    bind = subprocess.Popen(bind_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_answering(ours_port, sample)
        wait_answering(bind_port, sample)
        print(f"dnsperf: {args.seconds} s each, {args.clients} clients, UDP, EDNS0")
        print("  built-in (twisted.names, 1 reactor thread)")
        ours_qps = dnsperf(ours_port, queries, args.seconds, args.clients)
        print(f"    {ours_qps:10.0f} queries/s")
        print("  BIND 9 (named -n 1)")
        bind_qps = dnsperf(bind_port, queries, args.seconds, args.clients)
        print(f"    {bind_qps:10.0f} queries/s")
        print(f"ratio built-in / BIND: {ours_qps / bind_qps:.2f} (target >= 0.30)")
    finally:
        ours.terminate()
        bind.terminate()
        ours.wait()
        bind.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
