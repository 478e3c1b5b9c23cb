"""``make demo``: the whole product working on this machine, on 127.0.0.1.

What it does, in order:

1. checks for Dovecot, dig and openssl (installs the Debian packages when run as root,
   otherwise prints the exact ``apt-get`` line and stops);
2. starts clean in ``var/demo/`` (0700): a throwaway Dovecot, a configuration, and,
   with the product's own CLI, ``init``, ``ca init``, ``users add``, ``keys generate``
   and ``trust add`` (the partner's CA);
3. runs every face in this process (:func:`smimeproxy.service.make_service`: SMTP
   gateway with ``inbound_storage = "keep-encrypted"``, IMAP proxy, directory DNS and
   HTTP, archive, metrics) plus the demo's stand-in for the organisation's mail server
   (:mod:`smimeproxy.demo.sink`: the gateway's next hop, filing into Dovecot's Maildir);
4. walks through :mod:`smimeproxy.demo.steps`: a partner (Bob, keys held by the demo)
   fetches Alice's certificate, signs, encrypts and sends through the gateway; Dovecot
   holds ciphertext; the IMAP proxy shows it decrypted and verified; the archive
   indexes and finds it; ``dig`` gets its SMIMEA record; /metrics;
5. prints how to point a mail client at it and stays up until Ctrl-C (``--once``
   stops after the walkthrough).

Not guaranteed: that a second demo can run at the same time in the same directory, or
anything about security: plaintext IMAP logins and a fixed demo password, on loopback.
Dovecot's files live in a 0755 temporary directory linked as ``var/demo/dovecot``
(its unprivileged processes cannot enter a 0700 tree) and are removed on exit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smimeproxy.demo.steps import ALICE, BOB, DemoFailed, Ports

if TYPE_CHECKING:
    from smimeproxy.servers.dovecot import Dovecot
    from smimeproxy.smime.keys import KeyPair

PASSWORD = "alice-demo"
#: Debian packages the walkthrough needs
PACKAGES = ("dovecot-imapd", "openssl", "bind9-dnsutils")
_MARKER = ".smimeproxy-demo"

CONFIG = """\
# written by the smimeproxy demo: every face on 127.0.0.1
[keystore]
url = "sqlite:store.db"
master_key_file = "master.key"

[smime]
authserv_id = "mx.acme.test"

[smtp]
listen = ["tcp:{p.smtp}:interface=127.0.0.1"]
next_hop = "tcp:127.0.0.1:{p.sink}"
local_domains = ["acme.test"]
inbound_storage = "keep-encrypted"

[imap]
listen = ["tcp:{p.imap}:interface=127.0.0.1"]
upstream = "tcp:127.0.0.1:{p.dovecot}"
plaintext_login = true
upstream_tls = "none"

[directory]
dns_listen = ["udp:{p.dns}:interface=127.0.0.1", "tcp:{p.dns}:interface=127.0.0.1"]
http_listen = ["tcp:{p.http}:interface=127.0.0.1"]
domains = ["acme.test"]
ttl = 300

[archive]
index_dir = "index"

[[archive.sources]]
kind = "maildir"
path = "{maildir}"
owner = "{alice}"

[metrics]
listen = ["tcp:{p.metrics}:interface=127.0.0.1"]
"""


def _free_port(wanted: int) -> int:
    if wanted:
        return wanted
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        port = int(tcp.getsockname()[1])
        udp.bind(("127.0.0.1", port))  # the DNS port is used for both
        return port


def _missing_tools() -> list[str]:
    from smimeproxy.servers.dovecot import find_dovecot

    missing = []
    if find_dovecot() is None:
        missing.append("dovecot-imapd")
    if shutil.which("openssl") is None:
        missing.append("openssl")
    if shutil.which("dig") is None:
        missing.append("bind9-dnsutils")
    return missing


def ensure_tools() -> bool:
    """Install the Debian packages when root and missing; False (with advice) otherwise."""
    missing = _missing_tools()
    if not missing:
        return True
    line = "apt-get install -y " + " ".join(PACKAGES)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        print(f"The demo needs {', '.join(missing)}. Install them as root:\n\n  {line}\n")
        return False
    print(f"installing {', '.join(missing)}: {line}", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(line.split(), env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env)
        subprocess.run(line.split(), env=env)
    still = _missing_tools()
    if still:
        print(f"still missing after apt-get: {', '.join(still)}")
        return False
    return True


def fresh_directory(base: Path) -> None:
    """Empty ``base`` if it is a previous demo's (marker file), create it 0700."""
    if base.exists() and any(base.iterdir()):
        if not (base / _MARKER).exists() and not (base / "inbound.eml").exists():
            raise DemoFailed(f"{base} exists and is not a demo directory; not deleting it")
        link = base / "dovecot"
        if link.is_symlink():
            target = link.resolve()
            if target.name.startswith("smimeproxy-dovecot-"):
                shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(base)
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    base.chmod(0o700)
    (base / _MARKER).write_text("a throwaway smimeproxy demo: deleted by the next run\n")


def _partner(base: Path) -> KeyPair:
    """Bob at partner.test: his own CA and key, held by the demo (never by the store)."""
    from cryptography.hazmat.primitives import serialization

    from smimeproxy.pki.ca import create_root, generate_user_key, issue_user_certificate
    from smimeproxy.smime.keys import KeyPair, SoftwareKey

    ca_key, ca_cert = create_root("Partner Test Root CA", key_kind="p256")
    key = generate_user_key("rsa2048")
    cert = issue_user_certificate(ca_key, ca_cert, key.public_key(), [BOB])  # type: ignore[arg-type]
    partner = base / "partner"
    partner.mkdir(mode=0o700)
    (partner / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (partner / "bob.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return KeyPair(cert, SoftwareKey(key))


def provision(config: Path, base: Path) -> KeyPair:
    """The operator's part, with the product's own CLI; returns Bob's key pair."""
    from smimeproxy.demo.steps import heading, run_cli

    heading("0. set up: key store, internal CA, user Alice, trust in the partner's CA")
    run_cli(config, "init")
    run_cli(config, "ca", "init", "--name", "Acme Demo Root CA")
    run_cli(config, "users", "add", ALICE, "--login", "alice")
    run_cli(config, "keys", "generate", "--user", ALICE)
    bob = _partner(base)
    run_cli(config, "trust", "add", str(base / "partner" / "ca.pem"))
    return bob


def serve_and_walk(
    config_path: Path,
    base: Path,
    ports: Ports,
    maildir: Path,
    dovecot: Dovecot,
    bob: KeyPair,
    once: bool,
) -> int:
    """Run the faces and the sink under the reactor; the walkthrough in a thread."""
    from twisted.internet import reactor as global_reactor
    from twisted.internet import threads
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.python.failure import Failure

    from smimeproxy.config import load_config
    from smimeproxy.demo import steps
    from smimeproxy.demo.sink import MaildirSinkFactory
    from smimeproxy.service import make_service

    reactor: Any = global_reactor  # zope-typed: mypy sees interfaces, not methods
    log = open(base / "smimeproxy.log", "a")
    observer: Any = textFileLogObserver(log)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    service: Any = make_service(load_config(config_path), reactor=reactor)
    sink = MaildirSinkFactory(
        lambda address: maildir if address == ALICE else None,
        dovecot.own,
    )
    reactor.listenTCP(ports.sink, sink, interface="127.0.0.1")
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    outcome = {"status": 0}

    def walk() -> None:
        steps.partner_sends(ports, bob)
        steps.dovecot_holds_ciphertext(
            maildir,
            base / "dovecot" / maildir.relative_to(dovecot.base),
        )
        steps.read_through_proxy(ports, PASSWORD)
        steps.archive(config_path)
        steps.smimea_record(ports)
        steps.metrics(ports)
        steps.how_to_connect(ports, PASSWORD, base)

    def done(_: object) -> None:
        if once:
            print("\nwalkthrough complete (--once): stopping", flush=True)
            reactor.stop()
        else:
            print("\nThe demo stays up: press Ctrl-C to stop it.", flush=True)

    def failed(failure: Failure) -> None:
        outcome["status"] = 1
        print("\nDEMO FAILED:", flush=True)
        traceback.print_exception(failure.value)
        print(f"(logs: {base}/smimeproxy.log and {base}/dovecot/dovecot.log)", flush=True)
        reactor.stop()

    reactor.callWhenRunning(lambda: threads.deferToThread(walk).addCallbacks(done, failed))
    reactor.run()
    log.close()
    return outcome["status"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m smimeproxy.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--dir", default="var/demo", help="where the demo lives (emptied first)")
    parser.add_argument("--once", action="store_true", help="exit after the walkthrough")
    parser.add_argument("--engine-only", action="store_true", help="the engine alone, no servers")
    for face in ("smtp", "imap", "dns", "http", "metrics"):
        parser.add_argument(f"--{face}-port", type=int, default=0, help="default: a free port")
    args = parser.parse_args(argv)
    base = Path(args.dir).resolve()
    if not args.engine_only and not ensure_tools():
        return 2
    try:
        fresh_directory(base)
    except DemoFailed as exc:
        print(exc)
        return 2
    if args.engine_only:
        from smimeproxy.demo import engine

        return engine.main(["--dir", str(base)])
    from smimeproxy.servers.dovecot import start_dovecot

    print(f"smimeproxy demo in {base}/ (Dovecot, gateway, IMAP proxy, directory, archive)")
    dovecot = start_dovecot(base, {"alice": PASSWORD})
    try:
        maildir = dovecot.maildir("alice")
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        dovecot.own(dovecot.base / "mail" / "alice")
        ports = Ports(
            smtp=_free_port(args.smtp_port),
            sink=_free_port(0),
            imap=_free_port(args.imap_port),
            dns=_free_port(args.dns_port),
            http=_free_port(args.http_port),
            metrics=_free_port(args.metrics_port),
            dovecot=dovecot.port,
        )
        config = base / "smimeproxy.toml"
        config.write_text(CONFIG.format(p=ports, maildir=maildir, alice=ALICE))
        config.chmod(0o600)
        bob = provision(config, base)
        return serve_and_walk(config, base, ports, maildir, dovecot, bob, args.once)
    except DemoFailed as exc:
        print(f"\nDEMO FAILED: {exc}")
        return 1
    finally:
        dovecot.stop()


if __name__ == "__main__":
    sys.exit(main())
