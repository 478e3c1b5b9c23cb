"""A Dovecot, a key store and the IMAP proxy in its own process, for integration tests
and the benchmark.  ``World`` holds alice (keys, login ``alice``), bob (keys, login
``bob``) and carol (no keys: pass-through), their certificates and helpers to put
messages straight into Dovecot.
"""

from __future__ import annotations

import email.utils
import imaplib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smimeproxy.keystore import create_key_file, open_store
from smimeproxy.keystore.sealing import MasterSecret
from smimeproxy.smime.sealer import seal
from smimeproxy.testing import CertificateFactory, Issued
from tests.integration.dovecot import Dovecot, start_dovecot
from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}


def plain_message(subject: str, body: str, *, sender: str = "dave@partner.test") -> bytes:
    return (
        f"From: {sender}\r\nTo: alice@acme.test\r\nSubject: {subject}\r\n"
        f"Date: {email.utils.formatdate()}\r\nMessage-ID: <{time.time_ns()}@t>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        f"{body}\r\n"
    ).encode()


@dataclass
class World:
    dovecot: Dovecot
    proxy_port: int
    proxy: subprocess.Popen[bytes]
    alice: Issued
    bob: Issued
    base: Path
    config: Path
    metrics_port: int = 0

    def metrics(self) -> dict[str, float]:
        """The proxy's ``/metrics`` as ``{'name{labels}': value}``."""
        import urllib.request

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def encrypted(self, subject: str, body: str, to: Issued | None = None) -> bytes:
        return seal(plain_message(subject, body), recipients=[(to or self.alice).certificate])

    def direct(self, user: str = "alice") -> imaplib.IMAP4:
        c = imaplib.IMAP4(self.dovecot.host, self.dovecot.port)
        c.login(user, PASSWORDS[user])
        return c

    def client(self, user: str = "alice") -> imaplib.IMAP4:
        c = imaplib.IMAP4("127.0.0.1", self.proxy_port)
        c.login(user, PASSWORDS[user])
        return c

    def append(self, mailbox: str, data: bytes, user: str = "alice", flags: str = "") -> None:
        c = self.direct(user)
        typ, _ = c.append(mailbox, flags or None, None, data)
        assert typ == "OK"
        c.logout()

    def stop(self) -> None:
        if self.proxy.poll() is None:
            self.proxy.terminate()
            self.proxy.wait(10)
        self.dovecot.stop()


def start_world(
    base: Path,
    *,
    cache_bytes: int = 64 << 20,
    extra: str = "",
    plaintext_login: bool = True,
    listen: str | None = None,
    upstream_tls: str = "none",
    dovecot_tls: tuple[Path, Path] | None = None,
) -> World:
    base.mkdir(parents=True, exist_ok=True)
    factory = CertificateFactory()
    alice = factory.user("alice@acme.test")
    bob = factory.user("bob@acme.test")
    create_key_file(base / "master.key")
    store = open_store(
        f"sqlite:{base / 'store.db'}", MasterSecret.from_file(base / "master.key"), create=True
    )
    store.add_trust(factory.root.certificate)
    for issued, login in ((alice, "alice"), (bob, "bob")):
        store.import_key(issued.private_key, issued.certificate)
        store.add_login(
            issued.certificate_email
            if hasattr(issued, "certificate_email")
            else f"{login}@acme.test",
            login,
        )
    store.close()
    dovecot = start_dovecot(base, dict(PASSWORDS), tls=dovecot_tls)
    port = free_port()
    config = base / "smimeproxy.toml"
    listen_at = (listen or "tcp:{port}:interface=127.0.0.1").format(port=port)
    config.write_text(
        f"""
[keystore]
url = "sqlite:store.db"
master_key_file = "master.key"

[imap]
listen = ["{listen_at}"]
upstream = "tcp:127.0.0.1:{dovecot.port}"
plaintext_login = {"true" if plaintext_login else "false"}
upstream_tls = "{upstream_tls}"
cache_bytes = {cache_bytes}
{extra}
"""
    )
    metrics_port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), SMIMEPROXY_IMAP_METRICS_PORT=str(metrics_port))
    proxy = subprocess.Popen(
        [sys.executable, "-m", "tests.imap.runner", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=open(base / "proxy.log", "wb"),
    )
    assert proxy.stdout is not None
    line = proxy.stdout.readline()
    if b"READY" not in line:
        proxy.kill()
        dovecot.stop()
        raise RuntimeError("proxy did not start: " + (base / "proxy.log").read_text()[-3000:])
    return World(dovecot, port, proxy, alice, bob, base, config, metrics_port)


def fetch_one(client: imaplib.IMAP4, spec: str, item: str) -> Any:
    typ, data = client.uid("FETCH", spec, item)
    assert typ == "OK", data
    return data
