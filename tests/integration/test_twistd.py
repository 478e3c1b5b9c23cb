"""A real ``twistd -n smimeproxy`` process: SIGHUP reloads, SIGTERM drains, /metrics counts.

The next hop is a small SMTP sink in this process (a thread) that can hold its reply to
the end of DATA, so a transaction is provably in flight when SIGTERM arrives.
"""

from __future__ import annotations

import datetime
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.ports import free_port
from tests.procs import alive, children

REPO = Path(__file__).resolve().parents[2]
MESSAGE = b"From: alice@acme.test\r\nTo: bob@partner.test\r\nSubject: hi\r\n\r\nhello\r\n"


class Sink:
    """A minimal SMTP next hop: accepts everything, delays the reply to DATA by
    ``delay`` seconds, and keeps the messages it accepted."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.delay = 0.0
        self.received: list[bytes] = []
        self.data_started = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"220 sink\r\n")
            for line in lines:
                verb = line[:4].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250-sink\r\n250 PIPELINING\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go\r\n")
                    self.data_started.set()
                    body = b""
                    for data_line in lines:
                        if data_line == b".\r\n":
                            break
                        body += data_line
                    time.sleep(self.delay)
                    self.received.append(body)
                    conn.sendall(b"250 ok\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 ok\r\n")

    def close(self) -> None:
        self.sock.close()


def self_signed(directory: Path, name: str) -> bytes:
    """Writes ``name``.pem/.key; returns the certificate's DER."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert.public_bytes(serialization.Encoding.DER)


class Node:
    """One ``twistd -n smimeproxy`` subprocess with a config it can rewrite."""

    def __init__(
        self, directory: Path, next_hop: int, policy: str = "pass-through", extra: str = ""
    ):
        from smimeproxy.config import load_config
        from smimeproxy.keystore import create_key_file
        from smimeproxy.processing import open_configured_store

        self.dir = directory
        self.smtp_port = free_port()
        self.metrics_port = free_port()
        self.next_hop = next_hop
        self.certs = {name: self_signed(directory, name) for name in ("first", "second")}
        create_key_file(directory / "master.key")
        self.conf = directory / "smimeproxy.toml"
        self.write(policy=policy, cert="first", extra=extra)
        open_configured_store(load_config(self.conf), create=True).close()
        self.log = directory / "twistd.log"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
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
                str(self.conf),
            ],
            cwd=directory,
            env=env,
        )
        self.wait_listening()

    def write(self, *, policy: str, cert: str, extra: str = "") -> None:
        self.conf.write_text(
            '[keystore]\nurl = "sqlite:store.db"\nmaster_key_file = "master.key"\n'
            "[smtp]\n"
            f'listen = ["tcp:{self.smtp_port}:interface=127.0.0.1"]\n'
            f'next_hop = "tcp:127.0.0.1:{self.next_hop}"\n'
            'local_domains = ["acme.test"]\n'
            'authserv_id = "acme.test"\n'
            f'outbound_policy = "{policy}"\n'
            f'tls_certificate = "{cert}.pem"\n'
            f'tls_key = "{cert}.key"\n'
            f"{extra}"
            "[metrics]\n"
            f'listen = ["tcp:{self.metrics_port}:interface=127.0.0.1"]\n'
        )

    def wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"twistd exited: {self.log_text()}")
            if "service.reload_on_sighup" in self.log_text():  # the last thing started
                socket.create_connection(("127.0.0.1", self.smtp_port), timeout=1).close()
                return
            time.sleep(0.1)
        pytest.fail("twistd did not listen in time")

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def hup_and_wait(self, event: str, timeout: float = 10.0) -> None:
        before = self.log_text().count(event)
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self.log_text().count(event) == before:
            if time.monotonic() > deadline:
                pytest.fail(f"no {event} in the log after SIGHUP")
            time.sleep(0.05)

    def smtp(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.close()


@pytest.fixture
def node(tmp_path: Path, sink: Sink) -> Iterator[Node]:
    n = Node(tmp_path, sink.port)
    yield n
    n.stop()


def peer_certificate(node: Node) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with node.smtp() as client:
        client.starttls(context=context)
        der = client.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        client.quit()
    assert der is not None
    return bytes(der)


def test_sighup_swaps_policy_and_certificate_without_dropping_a_session(node: Node, sink: Sink):
    assert peer_certificate(node) == node.certs["first"]
    kept = node.smtp()
    kept.ehlo("client.test")
    with node.smtp() as client:
        client.sendmail("alice@acme.test", ["bob@partner.test"], MESSAGE)
    assert len(sink.received) == 1

    node.write(policy="must-encrypt", cert="second")
    node.hup_and_wait("service.reloaded")

    assert peer_certificate(node) == node.certs["second"]
    with node.smtp() as client:
        client.ehlo("client.test")
        client.mail("alice@acme.test")
        code, text = client.rcpt("bob@partner.test")
        assert code == 550
        assert b"must-encrypt" in text
    # the session opened before the reload is still there, under the new policy
    assert kept.noop()[0] == 250
    kept.mail("alice@acme.test")
    assert kept.rcpt("bob@partner.test")[0] == 550
    kept.quit()


def test_a_bad_config_on_sighup_is_logged_and_the_old_one_kept(node: Node, sink: Sink):
    node.conf.write_text("[smtp]\nlisten = 5\n")
    node.hup_and_wait("service.reload_refused")
    node.write(policy="must-encrypt", cert="missing")  # loads, but the TLS files do not exist
    node.hup_and_wait("service.reload_refused")
    with node.smtp() as client:
        client.sendmail("alice@acme.test", ["bob@partner.test"], MESSAGE)
    assert len(sink.received) == 1
    assert peer_certificate(node) == node.certs["first"]


def test_sigterm_lets_the_transaction_in_flight_finish(node: Node, sink: Sink):
    sink.delay = 2.0
    outcome: dict[str, object] = {}

    def send() -> None:
        client = node.smtp()
        try:
            client.sendmail("alice@acme.test", ["bob@partner.test"], MESSAGE)
            outcome["ok"] = True
        except smtplib.SMTPException as e:
            outcome["error"] = e
        finally:
            client.close()  # no QUIT: the server says 421 and closes after the reply

    sender = threading.Thread(target=send)
    sender.start()
    assert sink.data_started.wait(10)
    idle = node.smtp()  # a session without a transaction: told 421 at shutdown
    node.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(OSError):  # the listener is closed at once
        socket.create_connection(("127.0.0.1", node.smtp_port), timeout=2).close()
    assert idle.noop()[0] == 421  # "service shutting down", then the connection closes
    idle.close()
    sender.join(15)
    assert outcome == {"ok": True}
    assert len(sink.received) == 1
    # twistd exits by re-raising the signal once the services have stopped
    assert node.proc.wait(timeout=20) in (0, -signal.SIGTERM)
    assert "smtp.drain_timeout" not in node.log_text()


def test_metrics_count_real_traffic(node: Node, sink: Sink):
    with node.smtp() as client:
        client.sendmail("alice@acme.test", ["bob@partner.test"], MESSAGE)
        client.sendmail("carol@partner.test", ["bob@acme.test"], MESSAGE)
    text = node.metrics()
    assert 'smimeproxy_messages_total{direction="outbound",outcome="relayed"} 1' in text
    assert 'smimeproxy_messages_total{direction="inbound",outcome="relayed"} 1' in text
    assert 'smimeproxy_smtp_seconds_count{direction="outbound"} 1' in text
    # the inbound message was opened by the engine (unsigned: no signature counted)
    assert "smimeproxy_open_seconds_count 1" in text


def test_engine_worker_processes_under_twistd(tmp_path: Path, sink: Sink):
    """``workers = 1``: the engine runs in a child of twistd; its work shows in the
    metrics, SIGHUP replaces it, SIGTERM ends it with twistd."""
    n = Node(tmp_path, sink.port, extra="workers = 1\n")
    try:
        deadline = time.monotonic() + 30
        while "smtp.workers_ready" not in n.log_text():
            assert time.monotonic() < deadline, n.log_text()
            time.sleep(0.1)
        [worker] = set(children(n.proc.pid))
        with n.smtp() as client:
            client.sendmail("carol@partner.test", ["bob@acme.test"], MESSAGE)
        assert "smimeproxy_open_seconds_count 1" in n.metrics()  # counted in the worker
        n.write(policy="pass-through", cert="first", extra="workers = 1\n")
        n.hup_and_wait("smtp.reloaded")
        deadline = time.monotonic() + 30
        while worker in set(children(n.proc.pid)) or not set(children(n.proc.pid)):
            assert time.monotonic() < deadline, "the worker was not replaced on SIGHUP"
            time.sleep(0.1)
        [fresh] = set(children(n.proc.pid))
        with n.smtp() as client:
            client.sendmail("carol@partner.test", ["bob@acme.test"], MESSAGE)
        assert len(sink.received) == 2
        n.proc.send_signal(signal.SIGTERM)
        assert n.proc.wait(timeout=40) in (0, -signal.SIGTERM)
        deadline = time.monotonic() + 10
        while alive(fresh):
            assert time.monotonic() < deadline, "the worker outlived twistd"
            time.sleep(0.1)
    finally:
        n.stop()
