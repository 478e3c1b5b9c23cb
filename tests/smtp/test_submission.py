"""SMTP AUTH on a submission listener (RFC 4954), two ways:

* the exact dialogue over StringTransport with a Clock: the real protocol, the real
  Dovecot client and codec, and a scripted Dovecot behind them that answers PLAIN and
  LOGIN from a password table the way Dovecot 2.3 does (lines recorded from a real one);
* on loopback against a real Dovecot (passwd-file, its auth-client socket): smtplib's
  ``login()`` through STARTTLS, swaks ``--auth``, Dovecot stopped, a client that goes
  away mid-AUTH, and the mail arriving at the next hop signed and encrypted.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import smtplib
import socket
import ssl as stdlib_ssl
import subprocess
import time
from pathlib import Path

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, threads
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from smimeproxy.errors import ConfigError
from smimeproxy.smime import mime
from smimeproxy.smtp import make_service
from smimeproxy.smtp.dovecot_client import DovecotAuthClient
from smimeproxy.smtp.server import GatewaySettings, SMTPGatewayProtocol
from smimeproxy.smtp.submission import Submission, store_senders
from smimeproxy.smtp.transform import MessageTransform
from tests.conftest import require_tool
from tests.ports import free_port
from tests.smtp.conftest import PLAIN, ImmediatePool, ThreadlessReactor, write_config
from tests.smtp.sink import Sink
from tests.smtp.test_server import ScriptedNextHop, Session
from tests.smtp.test_tls import TLSStringTransport

PASSWORD = "alice-secret-pw"
STUFFED = PLAIN.replace(b"\r\n.", b"\r\n..")  # dot-stuffed for DATA
HANDSHAKE = (
    b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\nSPID\t10909\n"
    b"CUID\t2\nCOOKIE\t2c3995650024579484a99fafe010ca1e\nDONE\n"
)


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def plain(user: str, password: str) -> str:
    return b64(f"\0{user}\0{password}")


# ------------------------------------------------------------- a scripted Dovecot


class ScriptedDovecot:
    """The auth-client socket of a Dovecot with ``users`` (login -> password): PLAIN and
    LOGIN as Dovecot 2.3 answers them, at once (inside the client's write)."""

    def __init__(self, users: dict[str, str]):
        self.users = users
        self.down = False
        self.silent = False  # accept requests, never answer
        self.lines: list[str] = []
        self.connections = 0
        self.wires: list[_Wire] = []

    def __call__(self):
        return self

    def connect(self, factory):
        if self.down:
            return defer.fail(ConnectionRefusedError("auth-client: no such file"))
        self.connections += 1
        proto = factory.buildProtocol(None)
        wire = _Wire(self, proto)
        self.wires.append(wire)
        proto.makeConnection(wire)
        return defer.succeed(proto)

    def stop(self):
        """Dovecot goes away: every connection drops."""
        self.down = True
        for wire in self.wires:
            wire.proto.connectionLost(None)
        self.wires = []


class _Wire(StringTransport):
    def __init__(self, server: ScriptedDovecot, proto):
        super().__init__()
        self.server, self.proto = server, proto
        self.partial = b""
        self.requests: dict[str, list[str]] = {}  # id -> [mechanism, user so far]

    def write(self, data: bytes) -> None:
        self.partial += data
        while b"\n" in self.partial:
            line, self.partial = self.partial.split(b"\n", 1)
            self.server.lines.append(line.decode())
            self.line(line.decode().split("\t"))

    def answer(self, text: str) -> None:
        self.proto.dataReceived(text.encode() + b"\n")

    def line(self, f: list[str]) -> None:
        if f[0] == "CPID":
            self.proto.dataReceived(HANDSHAKE)
        elif self.server.silent or f[0] in ("VERSION", "CANCEL"):
            self.requests.pop(f[1], None) if f[0] == "CANCEL" else None
        elif f[0] == "AUTH":
            rid, mech = f[1], f[2]
            self.requests[rid] = [mech, ""]
            resp = next((x[5:] for x in f if x.startswith("resp=")), None)
            if resp is None:
                self.answer(f"CONT\t{rid}\t" + ("" if mech == "PLAIN" else b64("Username:")))
            else:
                self.step(rid, resp)
        elif f[0] == "CONT":
            self.step(f[1], f[2])

    def step(self, rid: str, data: str) -> None:
        mech, user = self.requests[rid]
        raw = base64.b64decode(data).decode()
        if mech == "LOGIN" and not user:
            self.requests[rid][1] = raw
            self.answer(f"CONT\t{rid}\t{b64('Password:')}")
            return
        if mech == "PLAIN":
            _, user, password = [*raw.split("\0"), "", "", ""][:3]
        else:
            password = raw
        del self.requests[rid]
        if self.server.users.get(user) == password:
            self.answer(f"OK\t{rid}\tuser={user}")
        else:
            self.answer(f"FAIL\t{rid}\tuser={user}")


# ------------------------------------------------------------- dialogue tests


@pytest.fixture
def sub(make_processor):
    """Sessions of a submission listener; all of one test share one key store, where
    alice has the alias a.smith@acme.test and the login name "alice"."""
    processors = []

    def make(*, plaintext=True, tls_options=None, transport=None, users=None):
        if not processors:
            processor = make_processor()
            processor.store.add_alias("alice@acme.test", "a.smith@acme.test")
            processor.store.add_login("alice@acme.test", "alice")
            processors.append(processor)
        dovecot = ScriptedDovecot(users or {"alice": PASSWORD, "carol@acme.test": "carol-pw"})
        return _session(processors[0], dovecot, plaintext, tls_options, transport)

    return make


def _session(processor, dovecot, plaintext, tls_options, transport):
    s = Session.__new__(Session)
    s.reactor = ThreadlessReactor()
    config = processor.config.smtp
    s.settings = GatewaySettings(
        config=config,
        transform=MessageTransform(processor, config),
        next_hop=ScriptedNextHop(),
        reactor=s.reactor,
        threadpool=ImmediatePool(),
        hostname="gw.acme.test",
        tls_options=tls_options,
    )
    s.dovecot = dovecot
    s.submission = Submission(
        DovecotAuthClient(dovecot, s.reactor), store_senders(processor.store), plaintext=plaintext
    )
    s.proto = SMTPGatewayProtocol(s.settings, s.submission)
    s.transport = transport or StringTransport()
    s.proto.makeConnection(s.transport)
    s.greeting = s.take()
    return s


def test_auth_offered_only_after_tls_unless_the_listener_is_plaintext(sub):
    s = sub(plaintext=False, tls_options=lambda: "ctx", transport=TLSStringTransport())
    ehlo = s.send(b"EHLO c\r\n")
    assert "AUTH" not in ehlo and ehlo.endswith("250 STARTTLS\r\n")
    assert s.send(b"AUTH PLAIN " + plain("alice", PASSWORD).encode() + b"\r\n") == (
        "538 5.7.11 Encryption required for requested authentication mechanism\r\n"
    )
    assert s.send(b"MAIL FROM:<alice@acme.test>\r\n") == ("530 5.7.0 Authentication required\r\n")
    assert s.dovecot.lines == []  # nothing reached Dovecot
    assert s.send(b"STARTTLS\r\n").startswith("220")
    assert s.send(b"EHLO c\r\n").endswith("250-DSN\r\n250-SMTPUTF8\r\n250 AUTH PLAIN LOGIN\r\n")
    assert s.send(b"AUTH PLAIN " + plain("alice", PASSWORD).encode() + b"\r\n") == (
        "235 2.7.0 Authentication successful\r\n"
    )
    assert "AUTH" not in s.send(b"EHLO c\r\n")  # not offered again


def test_exact_dialogue_plain_with_initial_response(sub):
    s = sub()
    assert s.send(b"EHLO c\r\n").endswith("250 AUTH PLAIN LOGIN\r\n")
    resp = plain("alice", PASSWORD)
    assert s.send(f"AUTH PLAIN {resp}\r\n".encode()) == "235 2.7.0 Authentication successful\r\n"
    assert s.dovecot.lines[-1].startswith("AUTH\t1\tPLAIN\tservice=smtp\tsecured\t")
    assert s.dovecot.lines[-1].endswith(f"\tresp={resp}")
    assert s.send(b"AUTH PLAIN " + resp.encode() + b"\r\n").startswith("503 5.5.1")
    assert s.send(b"MAIL FROM:<alice@acme.test>\r\n") == "250 2.1.0 Sender OK\r\n"
    assert s.send(b"RCPT TO:<bob@partner.test>\r\n") == "250 2.1.5 Recipient OK\r\n"
    assert s.send(b"DATA\r\n").startswith("354")
    assert s.send(STUFFED + b".\r\n").startswith("250 2.0.0 Ok: queued as")
    [(sender, copies)] = s.settings.next_hop.accepted
    assert sender == "alice@acme.test"
    # processed as outbound exactly like mail from the content filter
    assert [(c.direction, c.action) for c in copies] == [("outbound", "sign+encrypt")]


def test_plain_with_empty_challenge_and_login(sub):
    s = sub()
    s.send(b"EHLO c\r\n")
    assert s.send(b"AUTH PLAIN\r\n") == "334 \r\n"
    assert s.send(plain("alice", PASSWORD).encode() + b"\r\n") == (
        "235 2.7.0 Authentication successful\r\n"
    )
    s = sub()
    s.send(b"EHLO c\r\n")
    assert s.send(b"AUTH LOGIN\r\n") == "334 VXNlcm5hbWU6\r\n"
    assert s.send(b64("alice").encode() + b"\r\n") == "334 UGFzc3dvcmQ6\r\n"
    assert s.send(b64(PASSWORD).encode() + b"\r\n") == "235 2.7.0 Authentication successful\r\n"
    s = sub()
    s.send(b"EHLO c\r\n")
    # LOGIN with the user name as initial response (RFC 4954 allows it for any mechanism)
    assert s.send(f"AUTH LOGIN {b64('alice')}\r\n".encode()) == "334 UGFzc3dvcmQ6\r\n"
    # pipelined after the last response: answered in order after 235
    out = s.send(b64(PASSWORD).encode() + b"\r\nMAIL FROM:<a.smith@acme.test>\r\n")
    assert out == "235 2.7.0 Authentication successful\r\n250 2.1.0 Sender OK\r\n"


def test_cancel_bad_base64_and_unknown_mechanism(sub):
    s = sub()
    s.send(b"EHLO c\r\n")
    assert s.send(b"AUTH LOGIN\r\n") == "334 VXNlcm5hbWU6\r\n"
    assert s.send(b"*\r\n") == "501 5.7.0 Authentication cancelled\r\n"
    assert s.dovecot.lines[-1] == "CANCEL\t1"
    assert s.send(b"AUTH PLAIN\r\n") == "334 \r\n"
    assert s.send(b"not base64!\r\n") == "501 5.5.2 Cannot decode the base64 response\r\n"
    assert s.dovecot.lines[-1] == "CANCEL\t2"
    assert s.send(b"AUTH PLAIN %%%\r\n") == "501 5.5.2 Cannot decode the base64 response\r\n"
    assert s.send(b"AUTH CRAM-MD5\r\n") == "504 5.5.4 Unrecognized authentication type\r\n"
    assert s.send(b"AUTH\r\n").startswith("501 5.5.4")
    # none of it counted as a failed login: the right password still works
    assert s.send(f"AUTH PLAIN {plain('alice', PASSWORD)}\r\n".encode()).startswith("235")


def test_wrong_password_waits_then_535_and_the_third_closes(sub):
    s = sub()
    s.send(b"EHLO c\r\n")
    for attempt in (1, 2):
        assert s.send(f"AUTH PLAIN {plain('alice', 'wrong')}\r\n".encode()) == ""
        s.reactor.advance(0.9)
        assert s.take() == ""  # not before the delay
        s.reactor.advance(0.2)
        assert s.take() == "535 5.7.8 Authentication credentials invalid\r\n", attempt
    assert s.send(b"NOOP\r\n") == "250 2.0.0 OK\r\n"
    s.send(f"AUTH PLAIN {plain('alice', 'wrong')}\r\n".encode())
    s.reactor.advance(1.1)
    assert s.take() == "421 4.7.0 Too many failed authentication attempts, closing connection\r\n"
    assert s.transport.disconnecting


def test_unknown_user_and_someone_elses_address(sub):
    s = sub()
    s.send(b"EHLO c\r\n")
    s.send(f"AUTH PLAIN {plain('mallory', 'x')}\r\n".encode())
    s.reactor.advance(1.1)
    assert s.take().startswith("535 5.7.8")
    assert s.send(f"AUTH PLAIN {plain('alice', PASSWORD)}\r\n".encode()).startswith("235")
    assert s.send(b"MAIL FROM:<dave@acme.test>\r\n") == (
        "553 5.7.1 Sender address not owned by the authenticated user\r\n"
    )
    assert s.send(b"MAIL FROM:<>\r\n").startswith("553 5.7.1")
    assert s.send(b"MAIL FROM:<ALICE@acme.test>\r\n") == "250 2.1.0 Sender OK\r\n"
    s.send(b"RCPT TO:<bob@partner.test>\r\nDATA\r\n")
    # the From header chooses the signing key: dave's is not alice's to use
    forged = STUFFED.replace(b"From: Alice <alice@acme.test>", b"From: Dave <dave@acme.test>")
    assert s.send(forged + b".\r\n") == (
        "550 5.7.1 From address not owned by the authenticated user\r\n"
    )
    assert s.settings.next_hop.accepted == []


def test_login_without_store_user_may_send_only_as_itself(sub):
    s = sub()
    s.send(b"EHLO c\r\n")
    assert s.send(f"AUTH PLAIN {plain('carol@acme.test', 'carol-pw')}\r\n".encode()).startswith(
        "235"
    )
    assert s.send(b"MAIL FROM:<alice@acme.test>\r\n").startswith("553 5.7.1")
    assert s.send(b"MAIL FROM:<carol@acme.test>\r\n").startswith("250")


def test_dovecot_down_is_454_and_not_a_failure(sub):
    s = sub()
    s.send(b"EHLO c\r\n")
    s.dovecot.down = True
    for _ in range(4):
        assert s.send(f"AUTH PLAIN {plain('alice', PASSWORD)}\r\n".encode()) == (
            "454 4.7.0 Temporary authentication failure\r\n"
        )
    assert not s.transport.disconnecting
    s.dovecot.down = False  # back: the next AUTH connects again
    assert s.send(f"AUTH PLAIN {plain('alice', PASSWORD)}\r\n".encode()).startswith("235")


def test_dovecot_silent_times_out_as_454(sub):
    s = sub()
    s.send(b"EHLO c\r\n")
    s.dovecot.silent = True
    assert s.send(f"AUTH PLAIN {plain('alice', PASSWORD)}\r\n".encode()) == ""
    s.reactor.advance(31)
    assert s.take() == "454 4.7.0 Temporary authentication failure\r\n"


def test_client_gone_mid_auth_cancels_at_dovecot(sub):
    s = sub()
    s.send(b"EHLO c\r\n")
    assert s.send(b"AUTH LOGIN\r\n").startswith("334")
    s.proto.connectionLost(None)
    assert s.dovecot.lines[-1] == "CANCEL\t1"


def test_starttls_forgets_the_authentication(sub):
    s = sub(plaintext=True, tls_options=lambda: "ctx", transport=TLSStringTransport())
    s.send(b"EHLO c\r\n")
    assert s.send(f"AUTH PLAIN {plain('alice', PASSWORD)}\r\n".encode()).startswith("235")
    s.send(b"STARTTLS\r\n")
    s.send(b"EHLO c\r\n")
    assert s.send(b"MAIL FROM:<alice@acme.test>\r\n").startswith("530 5.7.0")


def test_no_password_in_any_log(sub):
    s = sub()
    with capturedLogs() as events:
        s.send(b"EHLO c\r\n")
        s.send(f"AUTH PLAIN {plain('alice', 'wrong-secret')}\r\n".encode())
        s.reactor.advance(2)
        s.send(b"AUTH LOGIN\r\n")
        s.send(b64("alice").encode() + b"\r\n")
        s.send(b64(PASSWORD).encode() + b"\r\n")
    from twisted.logger import formatEvent

    text = "\n".join(formatEvent(e) + repr(e) for e in events)
    assert "smtp.auth_ok" in text and "smtp.auth_failed" in text
    for secret in ("wrong-secret", PASSWORD, plain("alice", "wrong-secret"), b64(PASSWORD)):
        assert secret not in text


def test_auth_on_a_plain_listener_is_refused(session):
    s, _ = session()
    s.send(b"EHLO c\r\n")
    assert s.send(b"AUTH PLAIN " + plain("alice", PASSWORD).encode() + b"\r\n") == (
        "503 5.5.1 Authentication not enabled\r\n"
    )


@pytest.fixture
def session(make_processor):
    def make(smtp_extra: str = ""):
        hop = ScriptedNextHop()
        return Session(make_processor(smtp_extra), hop), hop

    return make


# ------------------------------------------------------------- configuration


def test_config_submission_needs_auth_dovecot(tmp_path):
    with pytest.raises(ConfigError) as e:
        write_config(tmp_path, 'submission_listen = ["tcp:0:interface=127.0.0.1"]')
    assert e.value.key == "smtp.auth_dovecot" and str(tmp_path) in str(e.value)
    # AUTH is offered over TLS only: a listener that could never offer it is an error
    with pytest.raises(ConfigError) as e:
        write_config(
            tmp_path,
            'submission_listen = ["tcp:0:interface=127.0.0.1"]\n'
            'auth_dovecot = "unix:/run/dovecot/auth-client"',
        )
    assert e.value.key == "smtp.submission_listen" and "tls_certificate" in str(e.value)
    config = write_config(
        tmp_path,
        'submission_listen = ["tcp:0:interface=127.0.0.1"]\n'
        'auth_dovecot = "unix:/run/dovecot/auth-client"\nsubmission_plaintext = true',
    )
    assert config.smtp.submission_listen == ("tcp:0:interface=127.0.0.1",)
    assert config.smtp.auth_dovecot == "unix:/run/dovecot/auth-client"
    assert config.smtp.submission_plaintext is True
    (tmp_path / "k.pem").write_text("")
    config = write_config(  # implicit TLS (RFC 8314) needs no STARTTLS certificate
        tmp_path,
        'submission_listen = ["ssl:0:privateKey=k.pem:certKey=k.pem"]\n'
        'auth_dovecot = "unix:auth-client"',
    )
    assert config.smtp.auth_dovecot == f"unix:{tmp_path / 'auth-client'}"
    with pytest.raises(ConfigError) as e:
        write_config(tmp_path, 'auth_dovecot = "udp:1"')
    assert e.value.key == "smtp.auth_dovecot"


# ------------------------------------------------------------- a real Dovecot


class RealWorld:
    """A real Dovecot, the gateway with a submission listener using it, and a sink."""

    def __init__(self, tmp_path, make_processor, tls_files):
        from tests.integration.dovecot import start_dovecot

        self.dovecot = start_dovecot(tmp_path, {"alice": PASSWORD, "carol@acme.test": "carol-pw"})
        self.socket = self.dovecot.base / "run" / "auth-client"
        self.sink = Sink()
        self.sink_port = reactor.listenTCP(0, self.sink.factory(), interface="127.0.0.1")
        self.port = free_port()
        self.implicit_port = free_port()  # submissions, implicit TLS (RFC 8314)
        self.plain_port = free_port()
        pem, key = tls_files / "gw.pem", tls_files / "gw.key"
        implicit = f"ssl:{self.implicit_port}:interface=127.0.0.1:privateKey={key}:certKey={pem}"
        processor = make_processor(
            f'tls_certificate = "{tls_files / "gw.pem"}"\ntls_key = "{tls_files / "gw.key"}"\n'
            f'submission_listen = ["tcp:{self.port}:interface=127.0.0.1", "{implicit}"]\n'
            f'auth_dovecot = "unix:{self.socket}"',
            next_hop=f"tcp:127.0.0.1:{self.sink_port.getHost().port}",
            listen=f"tcp:{self.plain_port}:interface=127.0.0.1",
        )
        processor.store.add_alias("alice@acme.test", "a.smith@acme.test")
        processor.store.add_login("alice@acme.test", "alice")
        self.service = make_service(processor.config, processor, reactor)
        self.service.startService()
        self.context = stdlib_ssl.create_default_context(cafile=str(tls_files / "root.pem"))

    def stop(self):
        d = self.service.stopService()
        d.addCallback(lambda _: self.sink_port.stopListening())
        pytest_twisted.blockon(d)
        self.dovecot.stop()

    def client(self) -> smtplib.SMTP:
        c = smtplib.SMTP("localhost", self.port, timeout=30)
        c.ehlo("client.test")
        c.starttls(context=self.context)
        c.ehlo("client.test")
        return c


@pytest.fixture
def world(tmp_path, make_processor, tls_files):
    w = RealWorld(tmp_path, make_processor, tls_files)
    yield w
    w.stop()


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def wait_gone(pids: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{p}").exists() for p in pids):
        assert time.monotonic() < deadline, f"Dovecot processes {pids} still running"
        time.sleep(0.1)


def in_thread(f):
    return threads.deferToThread(f)


@pytest_twisted.inlineCallbacks
def test_real_dovecot_login_send_and_refusals(world):
    def run():
        with smtplib.SMTP("localhost", world.port, timeout=30) as c:
            c.ehlo("client.test")
            assert not c.has_extn("auth")  # not in clear
            assert c.mail("alice@acme.test")[0] == 530
        with world.client() as c:
            assert c.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
            with pytest.raises(smtplib.SMTPAuthenticationError) as e:
                c.login("alice", "wrong")
            assert e.value.smtp_code == 535
        with world.client() as c:
            assert c.login("alice", PASSWORD)[0] == 235
            assert c.mail("dave@acme.test")[0] == 553
            c.rset()
            c.sendmail("a.smith@acme.test", ["bob@partner.test"], PLAIN)
        with world.client() as c:
            c.user, c.password = "alice", PASSWORD
            assert c.auth("LOGIN", c.auth_login)[0] == 235  # LOGIN through smtplib too
        return True

    assert (yield in_thread(run))
    [got] = world.sink.received
    assert got.sender == "a.smith@acme.test" and got.recipients == ["bob@partner.test"]
    # outbound processing as for any local sender: signed and encrypted to bob
    assert mime.parse_entity(got.data).mime_type == "application/pkcs7-mime"


@pytest_twisted.inlineCallbacks
def test_real_dovecot_client_gone_mid_auth_and_dovecot_stopped(world):
    def mid_auth():
        raw = socket.create_connection(("127.0.0.1", world.port), timeout=30)
        tls = None
        try:
            f = raw.makefile("rb")
            f.readline()
            raw.sendall(b"EHLO c\r\n")
            while f.readline()[3:4] == b"-":
                pass
            raw.sendall(b"STARTTLS\r\n")
            f.readline()
            tls = world.context.wrap_socket(raw, server_hostname="localhost")
            g = tls.makefile("rb")
            tls.sendall(b"EHLO c\r\n")
            while g.readline()[3:4] == b"-":
                pass
            tls.sendall(b"AUTH LOGIN\r\n")
            assert g.readline().startswith(b"334 ")
        finally:
            (tls or raw).close()  # gone, half-way through

    yield in_thread(mid_auth)

    def after():
        with world.client() as c:
            return c.login("alice", PASSWORD)[0]

    assert (yield in_thread(after)) == 235  # the gateway and its Dovecot link survived
    # Dovecot's helpers outlive its master while a client holds a connection (the
    # gateway holds one to the auth process, which, its passwd-file gone, would answer
    # FAIL): stopped means all of them gone, as systemd's stop would have it
    helpers = children(world.dovecot.process.pid)
    assert helpers
    world.dovecot.stop()
    for pid in helpers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    yield in_thread(lambda: wait_gone(helpers))

    def down():
        with world.client() as c:
            with pytest.raises(smtplib.SMTPAuthenticationError) as e:
                c.login("alice", PASSWORD)
            return e.value.smtp_code, c.noop()[0]

    assert (yield in_thread(down)) == (454, 250)


@pytest_twisted.inlineCallbacks
def test_real_dovecot_with_swaks(world):
    swaks = require_tool("swaks")

    def run(password):
        return subprocess.run(
            [
                swaks, "--server", "127.0.0.1", "--port", str(world.port), "--tls",
                "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", password,
                "--from", "alice@acme.test", "--to", "bob@partner.test",
                "--header", "Subject: via swaks", "--body", "sent by swaks --auth",
            ],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip

    ok = yield in_thread(lambda: run(PASSWORD))
    assert ok.returncode == 0, ok.stdout.decode(errors="replace")
    assert b"235 2.7.0" in ok.stdout
    bad = yield in_thread(lambda: run("wrong"))
    assert bad.returncode != 0 and b"535 5.7.8" in bad.stdout
    assert len(world.sink.received) == 1


_LINES = st.lists(
    st.one_of(
        st.sampled_from(
            ["AUTH PLAIN", "AUTH LOGIN", "*", "=", "AUTH PLAIN =", "MAIL FROM:<alice@acme.test>",
             plain("alice", PASSWORD), plain("alice", "x"), b64("alice"), b64(PASSWORD), "RSET",
             "EHLO c", "AUTH X", "DATA", "."]
        ),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
    ),
    max_size=12,
)  # fmt: skip


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lines=_LINES)
def test_any_dialogue_gets_only_well_formed_replies(sub, lines):
    s = sub()
    s.send(b"EHLO c\r\n")
    out = s.send("".join(f"{line}\r\n" for line in lines).encode())
    s.reactor.advance(5)
    out += s.take()
    for reply in out.splitlines():
        assert re.fullmatch(r"[2-5]\d\d([ -].*)?", reply), reply


@pytest_twisted.inlineCallbacks
def test_real_dovecot_over_implicit_tls(world):
    def run():
        with smtplib.SMTP_SSL(
            "localhost", world.implicit_port, context=world.context, timeout=30
        ) as c:
            c.ehlo("client.test")
            assert not c.has_extn("starttls")  # TLS already: nothing to start
            assert c.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
            assert c.login("alice", PASSWORD)[0] == 235
            c.sendmail("alice@acme.test", ["bob@partner.test"], PLAIN)

    yield in_thread(run)
    assert [m.sender for m in world.sink.received] == ["alice@acme.test"]
