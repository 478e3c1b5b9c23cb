"""SMTPUTF8 (RFC 6531) and DSN (RFC 3461): the parameters' syntax, the exact dialogue
over StringTransport, and what reaches a loopback next hop that announces them or not."""

from __future__ import annotations

import smtplib
from types import MappingProxyType

import pytest
import pytest_twisted
from twisted.internet import defer, threads
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from smimeproxy.smtp import replies as R
from smimeproxy.smtp.extensions import (
    Envelope,
    RecipientParameters,
    is_xtext,
    needs_smtputf8,
    parse_mail,
    parse_rcpt,
)
from smimeproxy.smtp.relay import NextHop
from smimeproxy.smtp.transform import Copy
from tests.smtp.sink import Sink
from tests.smtp.test_server import ScriptedNextHop, Session

UTF8_SENDER = "jösé@elsewhere.test"
UTF8_RCPT = "用户@例子.测试"
ASCII_MSG = b"From: <x@elsewhere.test>\r\nSubject: plain\r\n\r\nbody\r\n"
UTF8_HEADER_MSG = "From: <x@elsewhere.test>\r\nSubject: grüße\r\n\r\nbody\r\n".encode()


# -- the parameters ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ("", (False, None, None)),
        (" SMTPUTF8", (True, None, None)),
        (" smtputf8 BODY=8BITMIME", (True, None, None)),
        (" RET=hdrs ENVID=QQ314159", (False, "HDRS", "QQ314159")),
        (" RET=FULL ENVID=a+2Bb+3Dc", (False, "FULL", "a+2Bb+3Dc")),
    ],
)
def test_mail_parameters_accepted(params, expected):
    got = parse_mail(params)
    assert (got.smtputf8, got.ret, got.envid) == expected


@pytest.mark.parametrize(
    ("params", "reply"),
    [
        (" SMTPUTF8=yes", R.ARGUMENT_ERROR),
        (" RET=ALL", R.ARGUMENT_ERROR),
        (" RET=", R.ARGUMENT_ERROR),
        (" RET", R.ARGUMENT_ERROR),
        (" RET=FULL RET=HDRS", R.ARGUMENT_ERROR),
        (" ENVID=a=b", R.ARGUMENT_ERROR),
        (" ENVID=a+2b", R.ARGUMENT_ERROR),  # hexchar is upper-case
        (" ENVID=a+", R.ARGUMENT_ERROR),
        (" ENVID=" + "x" * 101, R.ARGUMENT_ERROR),
        (" ENVID=grüße", R.ARGUMENT_ERROR),
        (" BODY=BINARYMIME", R.ARGUMENT_ERROR),
        (" SIZE=12k", R.ARGUMENT_ERROR),
        (" FOO=bar", R.UNKNOWN_PARAMETER),
    ],
)
def test_mail_parameters_refused(params, reply):
    assert parse_mail(params) == reply


@pytest.mark.parametrize(
    ("params", "utf8", "expected"),
    [
        ("", False, RecipientParameters()),
        (" NOTIFY=never", False, RecipientParameters("NEVER")),
        (" NOTIFY=SUCCESS,FAILURE", False, RecipientParameters("SUCCESS,FAILURE")),
        (" NOTIFY=delay,failure,success", False, RecipientParameters("DELAY,FAILURE,SUCCESS")),
        (
            " ORCPT=rfc822;bob+40x@partner.test NOTIFY=FAILURE",
            False,
            RecipientParameters("FAILURE", "rfc822;bob+40x@partner.test"),
        ),
        (" ORCPT=utf-8;用户@例子.测试", True, RecipientParameters(None, "utf-8;用户@例子.测试")),
    ],
)
def test_rcpt_parameters_accepted(params, utf8, expected):
    assert parse_rcpt(params, utf8) == expected


@pytest.mark.parametrize(
    ("params", "utf8"),
    [
        (" NOTIFY=NEVER,SUCCESS", False),
        (" NOTIFY=SOMETIMES", False),
        (" NOTIFY=SUCCESS,SUCCESS", False),
        (" NOTIFY=", False),
        (" NOTIFY=SUCCESS,", False),
        (" ORCPT=rfc822", False),
        (" ORCPT=rfc822;", False),
        (" ORCPT=;a@b.test", False),
        (" ORCPT=rfc822;a=b@c.test", False),
        (" ORCPT=rfc822;" + "a" * 500, False),
        (" ORCPT=utf-8;用户@例子.测试", False),  # UTF-8 only with SMTPUTF8 (RFC 6533)
        (" ORCPT=rfc(822);a@b.test", False),
        (" NOTIFY=FAILURE NOTIFY=FAILURE", False),
    ],
)
def test_rcpt_parameters_refused(params, utf8):
    assert parse_rcpt(params, utf8) == R.ARGUMENT_ERROR


def test_unknown_rcpt_parameter_is_555():
    assert parse_rcpt(" RRVS=2030-01-01T00:00:00Z", False) == R.UNKNOWN_PARAMETER


def test_xtext():
    assert is_xtext("") and is_xtext("abc+2B+3D~!")
    assert not is_xtext("a b") and not is_xtext("a+ZZ") and not is_xtext("=")


def test_what_needs_smtputf8():
    yes = Envelope(smtputf8=True)
    assert needs_smtputf8(yes, UTF8_SENDER, ["a@b.test"], ASCII_MSG)
    assert needs_smtputf8(yes, "a@b.test", [UTF8_RCPT], ASCII_MSG)
    assert needs_smtputf8(yes, "a@b.test", ["a@b.test"], UTF8_HEADER_MSG)
    # a UTF-8 body needs 8BITMIME only
    assert not needs_smtputf8(yes, "a@b.test", ["a@b.test"], ASCII_MSG + "ü\r\n".encode())
    # the client did not ask for it: legacy 8-bit headers are passed on as before
    assert not needs_smtputf8(Envelope(), "a@b.test", ["a@b.test"], UTF8_HEADER_MSG)


# -- the dialogue --------------------------------------------------------------------------
@pytest.fixture
def session(make_processor):
    def make(*replies):
        hop = ScriptedNextHop(*replies)
        return Session(make_processor(), hop), hop

    return make


def test_exact_dialogue_with_smtputf8_and_dsn(session):
    s, hop = session()
    assert s.send(b"EHLO client.test\r\n").endswith("250-DSN\r\n250 SMTPUTF8\r\n")
    mail = f"MAIL FROM:<{UTF8_SENDER}> SMTPUTF8 RET=HDRS ENVID=QQ+2B1\r\n".encode()
    assert s.send(mail) == "250 2.1.0 Sender OK\r\n"
    rcpt = f"RCPT TO:<{UTF8_RCPT}> NOTIFY=SUCCESS,FAILURE ORCPT=utf-8;{UTF8_RCPT}\r\n"
    assert s.send(rcpt.encode()) == "250 2.1.5 Recipient OK\r\n"
    assert s.send(b"RCPT TO:<b@partner.test> NOTIFY=NEVER\r\n") == "250 2.1.5 Recipient OK\r\n"
    assert s.send(b"RCPT TO:<c@partner.test>\r\n") == "250 2.1.5 Recipient OK\r\n"
    assert s.send(b"DATA\r\n") == "354 End data with <CR><LF>.<CR><LF>\r\n"
    assert s.send(UTF8_HEADER_MSG + b".\r\n").startswith("250 2.0.0 Ok: queued as ")
    [(sender, copies)] = hop.accepted
    assert sender == UTF8_SENDER
    assert copies[0].recipients == (UTF8_RCPT, "b@partner.test", "c@partner.test")
    [envelope] = hop.envelopes
    assert (envelope.smtputf8, envelope.ret, envelope.envid) == (True, "HDRS", "QQ+2B1")
    assert envelope.for_recipient(UTF8_RCPT) == RecipientParameters(
        "SUCCESS,FAILURE", f"utf-8;{UTF8_RCPT}"
    )
    assert envelope.for_recipient("b@partner.test") == RecipientParameters("NEVER")
    assert envelope.for_recipient("c@partner.test") == RecipientParameters()
    # the next transaction starts without them
    assert s.send(b"MAIL FROM:<x@elsewhere.test>\r\n") == "250 2.1.0 Sender OK\r\n"
    assert s.send(f"RCPT TO:<{UTF8_RCPT}>\r\n".encode()) == R.render(R.NON_ASCII_ADDRESS).decode()


def test_exact_dialogue_without_the_parameters(session):
    s, hop = session()
    s.send(b"EHLO client.test\r\n")
    assert s.send(b"MAIL FROM:<x@elsewhere.test>\r\n") == "250 2.1.0 Sender OK\r\n"
    assert s.send(b"RCPT TO:<b@partner.test>\r\n") == "250 2.1.5 Recipient OK\r\n"
    s.send(b"DATA\r\n")
    assert s.send(ASCII_MSG + b".\r\n").startswith("250 2.0.0 Ok: queued as ")
    assert hop.envelopes == [Envelope()]


def test_non_ascii_addresses_without_smtputf8_are_553_5_6_7(session):
    s, _ = session()
    s.send(b"EHLO client.test\r\n")
    refused = "553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter on MAIL\r\n"
    assert s.send(f"MAIL FROM:<{UTF8_SENDER}>\r\n".encode()) == refused
    assert s.send(f"MAIL FROM:<{UTF8_SENDER}> BODY=8BITMIME\r\n".encode()) == refused
    assert s.send(b"MAIL FROM:<x@elsewhere.test>\r\n") == "250 2.1.0 Sender OK\r\n"
    assert s.send(f"RCPT TO:<{UTF8_RCPT}>\r\n".encode()) == refused
    assert s.send("RCPT TO:<b@例子.测试>\r\n".encode()) == refused


def test_non_ascii_outside_mail_and_rcpt_is_a_bad_line(session):
    s, _ = session()
    bad = R.render(R.BAD_LINE).decode()
    assert s.send("EHLO 例子.测试\r\n".encode()) == bad
    assert s.send(b"EHLO xn--fsqu00a.xn--0zwm56d\r\n").startswith("250-gw.acme.test")
    assert s.send("NOOP grüße\r\n".encode()) == bad
    assert s.send(b"NOOP \xc3\r\n") == bad  # not UTF-8 at all
    assert s.send("DÄTA\r\n".encode()) == "500 5.5.2 Syntax error, command unrecognised\r\n"
    assert s.send(b"MAIL FROM:<x@elsewhere.test> SMTPUTF8\r\n") == "250 2.1.0 Sender OK\r\n"
    assert s.send("DATA grüße\r\n".encode()) == bad  # refused, and commands follow
    assert s.send(b"RSET\r\n") == "250 2.0.0 Reset\r\n"


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"MAIL FROM:<x@elsewhere.test> SMTPUTF8=yes\r\n", "501 5.5.4"),
        (b"MAIL FROM:<x@elsewhere.test> RET=NONE\r\n", "501 5.5.4"),
        (b"MAIL FROM:<x@elsewhere.test> ENVID=a=b\r\n", "501 5.5.4"),
        (b"MAIL FROM:<x@elsewhere.test> RET=FULL RET=FULL\r\n", "501 5.5.4"),
        (b"MAIL FROM:<x@elsewhere.test> XYZ\r\n", "555 5.5.4"),
    ],
)
def test_bad_mail_parameters_in_the_dialogue(session, line, reply):
    s, _ = session()
    s.send(b"EHLO client.test\r\n")
    assert s.send(line).startswith(reply + " ")
    assert s.send(b"MAIL FROM:<x@elsewhere.test>\r\n") == "250 2.1.0 Sender OK\r\n"


@pytest.mark.parametrize(
    ("params", "reply"),
    [
        (b" NOTIFY=NEVER,FAILURE", "501 5.5.4"),
        (b" NOTIFY=ALWAYS", "501 5.5.4"),
        (b" ORCPT=rfc822", "501 5.5.4"),
        (b" ORCPT=rfc822;a=b@c.test", "501 5.5.4"),
        (b" XYZ=1", "555 5.5.4"),
    ],
)
def test_bad_rcpt_parameters_in_the_dialogue(session, params, reply):
    s, hop = session()
    s.send(b"EHLO client.test\r\nMAIL FROM:<x@elsewhere.test>\r\n")
    assert s.send(b"RCPT TO:<b@partner.test>" + params + b"\r\n").startswith(reply + " ")
    assert s.send(b"RCPT TO:<c@partner.test>\r\n") == "250 2.1.5 Recipient OK\r\n"
    s.send(b"DATA\r\n")
    s.send(ASCII_MSG + b".\r\n")
    [(_, copies)] = hop.accepted
    assert copies[0].recipients == ("c@partner.test",)


# -- the relay's dialogue ------------------------------------------------------------------
class FakeEndpoint:
    """Connects the relay to a StringTransport at once: the test plays the next hop."""

    def __init__(self):
        self.protocols = []

    def connect(self, factory):
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        self.protocols.append(proto)
        return defer.succeed(proto)


def relay(sender, envelope, copy, ehlo: bytes):
    """Start delivering ``copy``; answer the greeting and EHLO with ``ehlo``."""
    endpoint = FakeEndpoint()
    hop = NextHop(lambda: endpoint, Clock(), helo="gw.acme.test")
    done = []
    hop.deliver(sender, [copy], envelope).addBoth(done.append)
    [proto] = endpoint.protocols
    assert step(proto, b"220 hop.test ESMTP\r\n") == b"EHLO gw.acme.test\r\n"
    return proto, done, step(proto, ehlo)


def step(proto, reply: bytes) -> bytes:
    """The next hop says ``reply``: what the relay sends back."""
    proto.dataReceived(reply)
    sent = proto.transport.value()
    proto.transport.clear()
    return sent


BOTH = Envelope(
    smtputf8=True,
    ret="HDRS",
    envid="QQ1",
    recipients=MappingProxyType(
        {
            UTF8_RCPT: RecipientParameters("SUCCESS,FAILURE", "rfc822;x+2By@a.test"),
            "b@partner.test": RecipientParameters("NEVER"),
        }
    ),
)
OFFERS_BOTH = b"250-hop.test\r\n250-8BITMIME\r\n250-DSN\r\n250 SMTPUTF8\r\n"
OFFERS_NEITHER = b"250-hop.test\r\n250 8BITMIME\r\n"


def test_relay_dialogue_with_a_next_hop_offering_both():
    copy = Copy((UTF8_RCPT, "b@partner.test"), UTF8_HEADER_MSG, "transit", "pass")
    proto, done, sent = relay(UTF8_SENDER, BOTH, copy, OFFERS_BOTH)
    assert (
        sent == f"MAIL FROM:<{UTF8_SENDER}> BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ1\r\n".encode()
    )
    assert step(proto, b"250 ok\r\n") == (
        f"RCPT TO:<{UTF8_RCPT}> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x+2By@a.test\r\n".encode()
    )
    assert step(proto, b"250 ok\r\n") == b"RCPT TO:<b@partner.test> NOTIFY=NEVER\r\n"
    assert step(proto, b"250 ok\r\n") == b"DATA\r\n"
    assert step(proto, b"354 go\r\n") == UTF8_HEADER_MSG + b".\r\n"
    step(proto, b"250 2.0.0 queued\r\n")
    assert [r.code for r in done] == [250]


def test_relay_dialogue_without_the_parameters():
    copy = Copy(("b@partner.test",), ASCII_MSG, "transit", "pass")
    proto, _done, sent = relay("x@elsewhere.test", Envelope(), copy, OFFERS_BOTH)
    assert sent == b"MAIL FROM:<x@elsewhere.test>\r\n"
    assert step(proto, b"250 ok\r\n") == b"RCPT TO:<b@partner.test>\r\n"


def test_relay_dialogue_with_a_next_hop_offering_neither():
    """DSN parameters are dropped; SMTPUTF8 is not needed by an ASCII copy."""
    copy = Copy(("b@partner.test",), ASCII_MSG, "transit", "pass")
    proto, done, sent = relay("x@elsewhere.test", BOTH, copy, OFFERS_NEITHER)
    assert sent == b"MAIL FROM:<x@elsewhere.test>\r\n"
    assert step(proto, b"250 ok\r\n") == b"RCPT TO:<b@partner.test>\r\n"
    assert step(proto, b"250 ok\r\n") == b"DATA\r\n"
    assert step(proto, b"354 go\r\n") == ASCII_MSG + b".\r\n"
    step(proto, b"250 2.0.0 queued\r\n")
    assert [r.code for r in done] == [250]


@pytest.mark.parametrize(
    ("sender", "rcpt", "data", "reply"),
    [
        (UTF8_SENDER, "b@partner.test", ASCII_MSG, R.UTF8_NOT_RELAYABLE),
        ("x@elsewhere.test", UTF8_RCPT, ASCII_MSG, R.UTF8_NOT_RELAYABLE),
        ("x@elsewhere.test", "b@partner.test", UTF8_HEADER_MSG, R.UTF8_HEADERS_NOT_RELAYABLE),
    ],
)
def test_relay_sends_nothing_when_smtputf8_is_needed_and_not_offered(sender, rcpt, data, reply):
    copy = Copy((rcpt,), data, "transit", "pass")
    proto, done, sent = relay(sender, BOTH, copy, b"250-hop.test\r\n250-DSN\r\n250 8BITMIME\r\n")
    assert sent == b""  # no MAIL: the copy is not sent
    assert proto.transport.disconnecting
    assert done == [reply]


# -- through a loopback next hop -----------------------------------------------------------
def send(g, sender, recipients, data, mail_options=(), rcpt_options=None):
    """smtplib in a thread: (code, text) of the first refusal or of the end of data."""
    rcpt_options = rcpt_options or {}

    def run():
        with smtplib.SMTP("127.0.0.1", g.port, timeout=30) as client:
            client.ehlo("client.test")
            code, text = client.mail(sender, list(mail_options))
            if code >= 400:
                return code, text.decode()
            for r in recipients:
                code, text = client.rcpt(r, rcpt_options.get(r, []))
                if code >= 400:
                    return code, text.decode()
            code, text = client.data(data)
            return code, text.decode()

    return threads.deferToThread(run)


@pytest_twisted.inlineCallbacks
def test_next_hop_with_both_extensions_gets_every_parameter(gateway):
    sink = Sink(extensions=("SMTPUTF8", "DSN"))
    g = gateway(sink)
    code, text = yield send(
        g,
        UTF8_SENDER,
        [UTF8_RCPT, "b@partner.test"],
        UTF8_HEADER_MSG,
        ["SMTPUTF8", "RET=HDRS", "ENVID=QQ1"],
        {UTF8_RCPT: ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;x+2By@a.test"]},
    )
    assert code == 250, text
    [got] = sink.received
    assert got.sender == UTF8_SENDER and got.recipients == [UTF8_RCPT, "b@partner.test"]
    assert got.mail_args == f"FROM:<{UTF8_SENDER}> BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ1"
    assert got.rcpt_args == [
        f"TO:<{UTF8_RCPT}> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x+2By@a.test",
        "TO:<b@partner.test>",
    ]
    assert got.data == UTF8_HEADER_MSG


@pytest_twisted.inlineCallbacks
def test_smtputf8_only_when_the_message_needs_it(gateway):
    sink = Sink(extensions=("SMTPUTF8",))
    g = gateway(sink)
    code, _ = yield send(g, "x@elsewhere.test", ["b@partner.test"], ASCII_MSG, ["SMTPUTF8"])
    assert code == 250
    assert sink.received[0].mail_args == "FROM:<x@elsewhere.test>"


@pytest_twisted.inlineCallbacks
def test_next_hop_without_dsn_gets_no_dsn_parameters(gateway):
    sink = Sink()
    g = gateway(sink)
    code, _ = yield send(
        g,
        "x@elsewhere.test",
        ["b@partner.test"],
        ASCII_MSG,
        ["RET=FULL", "ENVID=e1"],
        {"b@partner.test": ["NOTIFY=SUCCESS", "ORCPT=rfc822;b@partner.test"]},
    )
    assert code == 250
    [got] = sink.received
    assert got.mail_args == "FROM:<x@elsewhere.test>"
    assert got.rcpt_args == ["TO:<b@partner.test>"]


@pytest.mark.parametrize(
    ("sender", "rcpt", "data", "reply"),
    [
        (UTF8_SENDER, "b@partner.test", ASCII_MSG, R.UTF8_NOT_RELAYABLE),
        ("x@elsewhere.test", UTF8_RCPT, ASCII_MSG, R.UTF8_NOT_RELAYABLE),
        ("x@elsewhere.test", "b@partner.test", UTF8_HEADER_MSG, R.UTF8_HEADERS_NOT_RELAYABLE),
    ],
)
@pytest_twisted.inlineCallbacks
def test_next_hop_without_smtputf8_gets_nothing_and_the_client_a_5xx(
    gateway, sender, rcpt, data, reply
):
    sink = Sink(extensions=("DSN",))
    g = gateway(sink)
    code, text = yield send(g, sender, [rcpt], data, ["SMTPUTF8"])
    assert (code, text) == (reply.code, reply.text)
    assert sink.received == []
    # without the client's SMTPUTF8, 8-bit header fields go through as they always did
    code, _ = yield send(g, "x@elsewhere.test", ["b@partner.test"], UTF8_HEADER_MSG)
    assert code == 250 and sink.received[0].mail_args == "FROM:<x@elsewhere.test> BODY=8BITMIME"


@pytest_twisted.inlineCallbacks
def test_recipients_split_into_copies_keep_their_own_parameters(gateway):
    """alice's message to bob (outbound: signed and encrypted) and dave (internal) is two
    copies; each recipient's NOTIFY and ORCPT go with its copy, RET and ENVID with both."""
    sink = Sink(extensions=("DSN", "PIPELINING"))
    g = gateway(sink, 'internal_policy = "sign-only"')
    msg = b"From: <alice@acme.test>\r\nSubject: split\r\n\r\nbody\r\n"
    code, text = yield send(
        g,
        "alice@acme.test",
        ["bob@partner.test", "dave@acme.test"],
        msg,
        ["RET=HDRS", "ENVID=split1"],
        {
            "bob@partner.test": ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob@partner.test"],
            "dave@acme.test": ["NOTIFY=NEVER"],
        },
    )
    assert code == 250, text
    by_rcpt = {tuple(r.recipients): r for r in sink.received}
    assert set(by_rcpt) == {("bob@partner.test",), ("dave@acme.test",)}
    for got in sink.received:
        assert got.mail_args.endswith(" RET=HDRS ENVID=split1")
    assert by_rcpt[("bob@partner.test",)].rcpt_args == [
        "TO:<bob@partner.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@partner.test"
    ]
    assert by_rcpt[("dave@acme.test",)].rcpt_args == ["TO:<dave@acme.test> NOTIFY=NEVER"]


def test_utf8_local_addresses_go_through_the_engine(session):
    """Inbound to jösé@acme.test (a local domain) and outbound from it: directions are
    found, and the store is asked in the form it holds (no key for jösé: the outbound
    copy is encrypted to bob without a signature, as for any sender without a key)."""
    s, hop = session()
    s.send(b"EHLO client.test\r\n")
    s.send(b"MAIL FROM:<bob@partner.test> SMTPUTF8\r\n")
    assert s.send("RCPT TO:<jösé@acme.test>\r\n".encode()) == "250 2.1.5 Recipient OK\r\n"
    s.send(b"DATA\r\n")
    assert s.send(UTF8_HEADER_MSG + b".\r\n").startswith("250 2.0.0 Ok: queued as ")
    s.send("MAIL FROM:<jösé@acme.test> SMTPUTF8\r\n".encode())
    s.send(b"RCPT TO:<bob@partner.test>\r\nDATA\r\n")
    assert s.send(UTF8_HEADER_MSG + b".\r\n").startswith("250 2.0.0 Ok: queued as ")
    [(_, (inbound,)), (_, (outbound,))] = hop.accepted
    assert (inbound.direction, inbound.recipients) == ("inbound", ("jösé@acme.test",))
    assert (outbound.direction, outbound.action) == ("outbound", "encrypt")
    assert outbound.details.get("note") == "no key to sign with"
