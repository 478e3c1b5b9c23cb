"""Dovecot's auth protocol: the pure codec with plain bytes, the Twisted client over
StringTransport with a Clock (scripted server lines as Dovecot 2.3 sends them), and the
client against a real Dovecot's auth-client socket."""

from __future__ import annotations

import base64

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from smimeproxy.smtp import sasl
from smimeproxy.smtp.dovecot_auth import (
    AuthClientCodec,
    AuthProtocolError,
    Challenge,
    Ready,
    Refusal,
    Success,
    is_base64,
    tab_escape,
    tab_unescape,
)
from smimeproxy.smtp.dovecot_client import DovecotAuthClient

#: what Dovecot 2.3.19 sends after the client's VERSION/CPID (recorded from a real one)
HANDSHAKE = (
    b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\nSPID\t10909\n"
    b"CUID\t2\nCOOKIE\t2c3995650024579484a99fafe010ca1e\nDONE\n"
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ------------------------------------------------------------------------------ codec


def ready_codec() -> AuthClientCodec:
    codec = AuthClientCodec(pid=4242)
    assert codec.receive(HANDSHAKE) == [Ready(("PLAIN", "LOGIN"))]
    return codec


def test_handshake_lines():
    codec = AuthClientCodec(pid=4242)
    assert codec.hello() == b"VERSION\t1\t2\nCPID\t4242\n"
    assert not codec.ready
    # split anywhere: nothing until DONE
    events = [e for i in range(len(HANDSHAKE)) for e in codec.receive(HANDSHAKE[i : i + 1])]
    assert events == [Ready(("PLAIN", "LOGIN"))]
    assert codec.server_pid == "10909"


def test_auth_lines():
    codec = ready_codec()
    assert codec.start(1, "plain", secured=True, initial=b64(b"\0a\0pw")) == (
        b"AUTH\t1\tPLAIN\tservice=smtp\tsecured\tresp=AGEAcHc=\n"
    )
    assert codec.start(2, "LOGIN", fields={"rip": "127.0.0.1", "session": "a\tb"}) == (
        b"AUTH\t2\tLOGIN\tservice=smtp\trip=127.0.0.1\tsession=a\x01tb\n"
    )
    assert codec.start(3, "PLAIN", initial="") == b"AUTH\t3\tPLAIN\tservice=smtp\tresp=\n"
    assert codec.respond(2, "YWxpY2U=") == b"CONT\t2\tYWxpY2U=\n"
    assert codec.cancel(2) == b"CANCEL\t2\n"


@pytest.mark.parametrize("bad", ["a\tb", "YWxp\nY2U=", "not base64!", "YWx", "=YWx"])
def test_client_data_is_base64_or_refused(bad):
    # a response can never add a field (user-given data after resp= is the classic hole)
    codec = ready_codec()
    with pytest.raises(ValueError, match=r"not base64$"):
        codec.respond(1, bad)
    with pytest.raises(ValueError):
        codec.start(1, "PLAIN", initial=bad)


def test_fields_and_ids_are_checked():
    codec = ready_codec()
    for name in ("resp", "secured", "Bad Name", "x\ty"):
        with pytest.raises(ValueError):
            codec.start(1, "PLAIN", fields={name: "v"})
    with pytest.raises(ValueError):
        codec.start(0, "PLAIN")
    with pytest.raises(ValueError):
        codec.start(1, "PL\tAIN")


def test_answers():
    codec = ready_codec()
    got = codec.receive(
        b"CONT\t3\tVXNlcm5hbWU6\nCONT\t3\t\nOK\t1\tuser=alice@acme.test\n"
        b"FAIL\t2\tuser=alice\nFAIL\t4\tcode=temp_fail\treason=db down\n"
        b"FAIL\t5\ttemp\nFAIL\t6\tcode=invalid_base64\treason=Invalid base64\n"
        b"OK\t7\tuser=bob\tnologin\treason=go away\nOK\t8\tuser=bob\tproxy\thost=x\n"
        b"OK\t9\n"
        b"OK\t10\tuser=c\x01td\n"
        b"NEWTHING\tx\n"
    )
    assert got == [
        Challenge(3, "VXNlcm5hbWU6"),
        Challenge(3, ""),
        Success(1, "alice@acme.test"),
        Refusal(2, "alice", False, None, None),
        Refusal(4, None, True, "db down", "temp_fail"),
        Refusal(5, None, True, None, None),
        Refusal(6, None, False, "Invalid base64", "invalid_base64"),
        Refusal(7, "bob", False, "go away", "nologin"),
        Refusal(8, "bob", False, None, "nologin"),
        Refusal(9, None, False, None, "no_user"),
        Success(10, "c\td"),
    ]


@pytest.mark.parametrize(
    "data",
    [
        b"VERSION\t2\t0\n",  # another major version
        b"MECH\tPLAIN\n",  # before VERSION
        b"VERSION\t1\t2\nOK\t1\tuser=a\n",  # before DONE
        HANDSHAKE + b"OK\tone\tuser=a\n",  # no request number
        HANDSHAKE + b"CONT\t1\tnot base64!\n",
        HANDSHAKE + b"x" * 70000,  # no end of line in sight
    ],
)
def test_protocol_errors(data):
    with pytest.raises(AuthProtocolError):
        AuthClientCodec(pid=1).receive(data)


@given(st.text())
def test_tab_escaping_round_trips(value):
    escaped = tab_escape(value)
    assert not {"\t", "\n", "\r", "\0"} & set(escaped)
    assert tab_unescape(escaped) == value


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=50))
def test_codec_only_raises_its_own_error(data, cut):
    codec = AuthClientCodec(pid=1)
    try:
        codec.receive(HANDSHAKE + data[:cut])
        codec.receive(data[cut:])
    except AuthProtocolError:
        pass


@given(st.binary(max_size=64))
def test_is_base64_agrees_with_encoding(data):
    assert is_base64(b64(data))


# ----------------------------------------------------------------- the SMTP side (sasl)


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("PLAIN", sasl.AuthStart("PLAIN", None)),
        ("plain AGEAYg==", sasl.AuthStart("PLAIN", "AGEAYg==")),
        ("LOGIN =", sasl.AuthStart("LOGIN", "")),
        ("login YWxpY2U=", sasl.AuthStart("LOGIN", "YWxpY2U=")),
        ("CRAM-MD5", sasl.Invalid(sasl.UNKNOWN_MECHANISM)),
        ("", sasl.Invalid(sasl.SYNTAX)),
        ("PLAIN a b", sasl.Invalid(sasl.SYNTAX)),
        ("PLAIN  AGEAYg==", sasl.Invalid(sasl.SYNTAX)),
        ("PLAIN %%%", sasl.Invalid(sasl.BAD_BASE64)),
        ("PLAIN *", sasl.Invalid(sasl.BAD_BASE64)),
    ],
)
def test_parse_auth(argument, expected):
    assert sasl.parse_auth(argument) == expected


def test_parse_response():
    assert sasl.parse_response("*") == sasl.Invalid(sasl.CANCELLED)
    assert sasl.parse_response("") == ""
    assert sasl.parse_response("YWxpY2U=") == "YWxpY2U="
    assert sasl.parse_response("YWxpY2U") == sasl.Invalid(sasl.BAD_BASE64)


def test_allowed_senders():
    user = ("alice@acme.test", "a.smith@acme.test")
    assert sasl.allowed_senders("alice", user) == frozenset(user)
    assert sasl.allowed_senders("Alice@Acme.test", user) == frozenset(user)
    assert sasl.allowed_senders("carol@acme.test", None) == {"carol@acme.test"}
    assert sasl.allowed_senders("carol", None) == frozenset()
    allowed = sasl.allowed_senders("alice", user)
    assert sasl.may_send_as(allowed, "A.Smith@acme.test")
    assert not sasl.may_send_as(allowed, "dave@acme.test")
    assert not sasl.may_send_as(allowed, "")


def test_an_internationalised_domain_may_be_written_either_way():
    """A user of 例子.测试 may send as their address with the domain in U-labels or in
    A-labels, and a From in the other form is not "someone else's"."""
    allowed = sasl.allowed_senders("carol", ("carol@xn--fsqu00a.xn--0zwm56d",))
    assert sasl.may_send_as(allowed, "carol@例子.测试")
    assert sasl.may_send_as(allowed, "Carol@XN--FSQU00A.xn--0zwm56d")
    assert not sasl.may_send_as(allowed, "dave@例子.测试")
    data = "From: Carol <carol@例子.测试>\r\n\r\nhi\r\n".encode()
    assert sasl.foreign_from(data, allowed, ["xn--fsqu00a.xn--0zwm56d"]) is None
    data = "From: Dave <dave@例子.测试>\r\n\r\nhi\r\n".encode()
    assert sasl.foreign_from(data, allowed, ["xn--fsqu00a.xn--0zwm56d"]) == "dave@例子.测试"


@pytest.mark.parametrize(
    ("from_header", "expected"),
    [
        (b"From: Alice <alice@acme.test>", None),
        (b"From: a.smith@ACME.test", None),
        (b"From: Alice <alice@gmail.test>", None),  # not local: signed as the envelope
        (b"From: Dave <dave@acme.test>", "dave@acme.test"),
        (b"From: alice@acme.test, dave@acme.test", "dave@acme.test"),
        (b"From: alice@acme.test\r\nFrom: dave@acme.test", "dave@acme.test"),
        (b"Subject: no from", None),
    ],
)
def test_foreign_from(from_header, expected):
    allowed = frozenset({"alice@acme.test", "a.smith@acme.test"})
    data = from_header + b"\r\nTo: bob@partner.test\r\n\r\nFrom: dave@acme.test\r\n"
    assert sasl.foreign_from(data, allowed, ["acme.test"]) == expected


# ------------------------------------------------------------------ the Twisted client


class FakeEndpoint:
    """Connects each time to a fresh StringTransport (or fails when told to)."""

    def __init__(self):
        self.transports: list[StringTransport] = []
        self.protocols = []
        self.fail = False

    def __call__(self):
        return self

    def connect(self, factory):
        if self.fail:
            return defer.fail(ConnectionRefusedError("no socket"))
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.transports.append(transport)
        self.protocols.append(proto)
        return defer.succeed(proto)

    def take(self, i: int = -1) -> bytes:
        out = self.transports[i].value()
        self.transports[i].clear()
        return out


def results(d):
    got = []
    d.addCallback(got.append)
    return got


def test_client_queues_until_handshake_then_multiplexes():
    endpoint, clock = FakeEndpoint(), Clock()
    client = DovecotAuthClient(endpoint, clock, pid=7)
    alice = b64(b"\0alice\0pw")
    id1, d1 = client.start("PLAIN", secured=True, initial=alice)
    id2, d2 = client.start("LOGIN", secured=True)
    assert endpoint.take() == b"VERSION\t1\t2\nCPID\t7\n"  # nothing sent before DONE
    endpoint.protocols[0].dataReceived(HANDSHAKE)
    sent = endpoint.take()
    assert (
        sent
        == (
            f"AUTH\t{id1}\tPLAIN\tservice=smtp\tsecured\tresp={alice}\n"
            f"AUTH\t{id2}\tLOGIN\tservice=smtp\tsecured\n"
        ).encode()
    )
    r1, r2 = results(d1), results(d2)
    endpoint.protocols[0].dataReceived(
        f"CONT\t{id2}\tVXNlcm5hbWU6\nOK\t{id1}\tuser=alice\n".encode()
    )
    assert r1 == [Success(id1, "alice")] and r2 == [Challenge(id2, "VXNlcm5hbWU6")]
    r2b = results(client.respond(id2, b64(b"alice")))
    assert endpoint.take() == f"CONT\t{id2}\tYWxpY2U=\n".encode()
    endpoint.protocols[0].dataReceived(f"FAIL\t{id2}\tuser=alice\n".encode())
    assert r2b == [Refusal(id2, "alice", False, None, None)]
    # the same connection for the next request
    client.start("PLAIN", secured=False)
    assert endpoint.take().startswith(b"AUTH\t3\tPLAIN\tservice=smtp\n")
    assert len(endpoint.transports) == 1
    assert not clock.getDelayedCalls() or all(c.active() for c in clock.getDelayedCalls())


def test_client_down_is_temporary_and_reconnects_later():
    endpoint, clock = FakeEndpoint(), Clock()
    client = DovecotAuthClient(endpoint, clock)
    endpoint.fail = True
    request, d = client.start("PLAIN", secured=True)
    [refusal] = results(d)
    assert refusal.temporary and refusal.code == "unavailable"
    endpoint.fail = False
    request, d = client.start("PLAIN", secured=True)
    got = results(d)
    endpoint.protocols[-1].dataReceived(HANDSHAKE)
    endpoint.take()
    endpoint.protocols[-1].dataReceived(f"OK\t{request}\tuser=a\n".encode())
    assert got == [Success(request, "a")]


def test_connection_lost_mid_exchange_fails_open_requests_and_reconnects():
    endpoint, clock = FakeEndpoint(), Clock()
    client = DovecotAuthClient(endpoint, clock)
    request, d = client.start("LOGIN", secured=True)
    endpoint.protocols[0].dataReceived(HANDSHAKE)
    endpoint.protocols[0].dataReceived(f"CONT\t{request}\tVXNlcm5hbWU6\n".encode())
    assert results(d) == [Challenge(request, "VXNlcm5hbWU6")]
    endpoint.protocols[0].connectionLost(None)
    # the request lived on the lost connection: its next step cannot be answered
    [refusal] = results(client.respond(request, b64(b"alice")))
    assert refusal.temporary
    client.start("PLAIN", secured=True)
    assert len(endpoint.transports) == 2


def test_timeout_cancels_and_the_late_answer_is_ignored():
    endpoint, clock = FakeEndpoint(), Clock()
    client = DovecotAuthClient(endpoint, clock, timeout=5)
    request, d = client.start("PLAIN", secured=True, initial="")
    endpoint.protocols[0].dataReceived(HANDSHAKE)
    endpoint.take()
    got = results(d)
    clock.advance(5)
    assert got[0].temporary and got[0].code == "unavailable"
    assert endpoint.take() == f"CANCEL\t{request}\n".encode()
    endpoint.protocols[0].dataReceived(f"OK\t{request}\tuser=a\n".encode())
    assert len(got) == 1


def test_handshake_that_never_ends_is_dropped():
    endpoint, clock = FakeEndpoint(), Clock()
    client = DovecotAuthClient(endpoint, clock, timeout=5)
    _, d = client.start("PLAIN", secured=True)
    got = results(d)
    clock.advance(5)
    assert got[0].temporary
    assert endpoint.transports[0].disconnecting or endpoint.transports[0].disconnected


def test_protocol_error_drops_the_connection():
    endpoint, clock = FakeEndpoint(), Clock()
    client = DovecotAuthClient(endpoint, clock)
    client.start("PLAIN", secured=True)
    endpoint.protocols[0].dataReceived(b"VERSION\t9\t0\n")
    assert endpoint.transports[0].disconnecting or endpoint.transports[0].disconnected


def test_cancel_tells_dovecot():
    endpoint, clock = FakeEndpoint(), Clock()
    client = DovecotAuthClient(endpoint, clock)
    request, _ = client.start("LOGIN", secured=True)
    endpoint.protocols[0].dataReceived(HANDSHAKE)
    endpoint.take()
    endpoint.protocols[0].dataReceived(f"CONT\t{request}\tVXNlcm5hbWU6\n".encode())
    client.cancel(request)
    assert endpoint.take() == f"CANCEL\t{request}\n".encode()
    assert not clock.getDelayedCalls()


# ------------------------------------------------------------------------ real Dovecot


@pytest.fixture
def dovecot(tmp_path):
    from tests.integration.dovecot import start_dovecot

    server = start_dovecot(tmp_path, {"alice": "secret-pw"})
    yield server
    server.stop()


@pytest_twisted.inlineCallbacks
def test_against_a_real_dovecot(dovecot):
    from twisted.internet import reactor
    from twisted.internet.endpoints import clientFromString

    socket = dovecot.base / "run" / "auth-client"
    client = DovecotAuthClient(lambda: clientFromString(reactor, f"unix:{socket}"), reactor)
    try:
        request, d = client.start("PLAIN", secured=True, initial=b64(b"\0alice\0secret-pw"))
        step = yield d
        assert step == Success(request, "alice")
        assert client.mechanisms == ("PLAIN", "LOGIN")
        request, d = client.start("LOGIN", secured=True)
        step = yield d
        assert step == Challenge(request, b64(b"Username:"))
        step = yield client.respond(request, b64(b"alice"))
        assert step == Challenge(request, b64(b"Password:"))
        step = yield client.respond(request, b64(b"wrong"))
        assert isinstance(step, Refusal) and not step.temporary and step.user == "alice"
        # several at once on the one connection
        requests = [client.start("PLAIN", secured=True, initial=b64(b"\0alice\0secret-pw"))]
        requests.append(client.start("PLAIN", secured=True, initial=b64(b"\0bob\0x")))
        steps = yield defer.gatherResults([d for _, d in requests])
        assert isinstance(steps[0], Success) and isinstance(steps[1], Refusal)
    finally:
        client.close()
