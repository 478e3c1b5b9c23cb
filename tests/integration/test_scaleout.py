"""Two nodes on one PostgreSQL store and one Dovecot serve the same users identically.

Each node is a real ``twistd -n smimeproxy`` process running the SMTP gateway and the
IMAP proxy (so two gateway processes and two proxy processes in all); both share the
store, the master key and the upstream Dovecot. A key rotation made with the command
line against node 1's config is used by node 2 for the very next message, with no
restart and no cache to expire (the processor caches nothing between messages).
"""

from __future__ import annotations

import imaplib
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from smimeproxy.cli import main as cli_main
from smimeproxy.keystore import MasterSecret, create_key_file, open_store
from smimeproxy.pki.validation import PathValidator
from smimeproxy.smime.opener import open_message
from smimeproxy.smime.sealer import seal
from smimeproxy.testing import CertificateFactory
from tests.integration.dovecot import start_dovecot
from tests.integration.test_twistd import Sink, free_port
from tests.keystore.conftest import pg_server, pg_url  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]
ALICE = "alice@acme.test"
DAVE = "dave@partner.test"


def message(subject: str) -> bytes:
    return (
        f"From: {ALICE}\r\nTo: {DAVE}\r\nSubject: {subject}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        f"body of {subject}\r\n"
    ).encode()


def cli(config: Path, *args: str) -> str:
    out, err = io.BytesIO(), io.StringIO()
    rc = cli_main(["--config", str(config), *args], stdin=io.BytesIO(), stdout=out, stderr=err)
    assert rc == 0, (args, err.getvalue())
    return out.getvalue().decode()


class Node:
    def __init__(self, base: Path, name: str, url: str, next_hop: int, upstream: int):
        self.dir = base / name
        self.dir.mkdir()
        self.smtp_port, self.imap_port = free_port(), free_port()
        self.config = self.dir / "smimeproxy.toml"
        self.config.write_text(
            f'[keystore]\nurl = "{url}"\nmaster_key_file = "{base / "master.key"}"\n'
            "[smtp]\n"
            f'listen = ["tcp:{self.smtp_port}:interface=127.0.0.1"]\n'
            f'next_hop = "tcp:127.0.0.1:{next_hop}"\n'
            'local_domains = ["acme.test"]\n'
            'authserv_id = "acme.test"\n'
            'outbound_policy = "encrypt-if-possible"\n'
            "[imap]\n"
            f'listen = ["tcp:{self.imap_port}:interface=127.0.0.1"]\n'
            f'upstream = "tcp:127.0.0.1:{upstream}"\n'
            "plaintext_login = true\n"
        )
        self.log = self.dir / "twistd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                f"--logfile={self.log}",
                "smimeproxy",
                "--config",
                str(self.config),
            ],
            cwd=self.dir,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    def wait(self, timeout: float = 30.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while "service.reload_on_sighup" not in (self.log.read_text() if self.log.exists() else ""):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"node did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def send(self, data: bytes) -> None:
        import smtplib

        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as client:
            client.sendmail(ALICE, [DAVE], data)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def cluster(tmp_path: Path, pg_url: str) -> Iterator[dict]:  # noqa: F811
    partner = CertificateFactory()
    dave = partner.user(DAVE)
    create_key_file(tmp_path / "master.key")
    store = open_store(pg_url, MasterSecret.from_file(tmp_path / "master.key"), create=True)
    store.add_trust(partner.root.certificate)
    store.import_certificate(dave.certificate)
    store.close()
    dovecot = start_dovecot(tmp_path, {"alice": "alice-pw"})
    sink = Sink()
    nodes = [Node(tmp_path, f"node{n}", pg_url, sink.port, dovecot.port) for n in (1, 2)]
    cli(nodes[0].config, "ca", "init", "--issuing")
    cli(nodes[0].config, "users", "add", ALICE, "--login", "alice")
    cli(nodes[0].config, "keys", "generate", "--user", ALICE, "--kind", "p256")
    for node in nodes:
        node.start()
    try:
        for node in nodes:
            node.wait()
        yield {
            "nodes": nodes,
            "sink": sink,
            "dave": dave,
            "dovecot": dovecot,
            "url": pg_url,
            "master": tmp_path / "master.key",
        }
    finally:
        for node in nodes:
            node.stop()
        sink.close()
        dovecot.stop()


def current_certificate(cluster: dict):
    store = open_store(cluster["url"], MasterSecret.from_file(cluster["master"]))
    try:
        identity = store.signing_key(ALICE)
        return identity.pair.certificate, list(store.trust_anchors())
    finally:
        store.close()


def open_as_dave(cluster: dict, data: bytes, anchors: list):
    opened = open_message(
        data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"),
        keys=[cluster["dave"].pair],
        validator=PathValidator(anchors, [], []),
    )
    assert opened.status.decryption is not None and opened.status.decryption.decrypted
    (signer,) = opened.status.signers
    assert signer.verified
    return opened, signer.certificate


def test_two_nodes_process_alike_and_a_rotation_on_one_is_used_by_the_other(cluster):
    node1, node2 = cluster["nodes"]
    sink: Sink = cluster["sink"]
    first_cert, anchors = current_certificate(cluster)

    node1.send(message("via gateway 1"))
    node2.send(message("via gateway 2"))
    assert len(sink.received) == 2
    layers = []
    for n, data in enumerate(sink.received, 1):
        opened, signer = open_as_dave(cluster, data, anchors)
        assert signer == first_cert
        assert f"body of via gateway {n}".encode() in opened.data
        layers.append((opened.status.layers, str(opened.status.smime_result)))
    assert layers[0] == layers[1]  # same treatment: same layers, same verdict

    # rotate through the command line against node 1's config
    cli(node1.config, "keys", "rotate", "--user", ALICE)
    new_cert, anchors = current_certificate(cluster)
    assert new_cert != first_cert

    # node 2 signs the very next message with the new key
    node2.send(message("after the rotation"))
    _, signer = open_as_dave(cluster, sink.received[-1], anchors)
    assert signer == new_cert

    # mail encrypted to the new certificate opens through proxy 2
    secret = (
        b"From: dave@partner.test\r\nTo: alice@acme.test\r\nSubject: to the new key\r\n"
        b"Content-Type: text/plain\r\n\r\nread me with the new key\r\n"
    )
    direct = imaplib.IMAP4("127.0.0.1", cluster["dovecot"].port)
    direct.login("alice", "alice-pw")
    assert direct.append("INBOX", None, None, seal(secret, recipients=[new_cert]))[0] == "OK"
    direct.logout()
    proxy = imaplib.IMAP4("127.0.0.1", node2.imap_port)
    proxy.login("alice", "alice-pw")
    proxy.select("INBOX")
    typ, data = proxy.uid("FETCH", "1:*", "(BODY.PEEK[])")
    assert typ == "OK"
    proxy.logout()
    fetched = b"".join(part[1] for part in data if isinstance(part, tuple))
    assert b"read me with the new key" in fetched
