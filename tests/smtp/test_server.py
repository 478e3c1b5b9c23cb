"""The gateway's SMTP dialogue, exactly, over StringTransport (no sockets, no threads).

The next hop is scripted (it records what it was given and answers as told); the
key store, the policy and the engine behind the server are the real ones.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from smimeproxy.smtp.replies import Reply
from smimeproxy.smtp.server import GatewaySettings, SMTPGatewayProtocol
from smimeproxy.smtp.transform import MessageTransform
from tests.smtp.conftest import PLAIN, ImmediatePool, ThreadlessReactor


class ScriptedNextHop:
    """Answers each message with the next scripted reply (250 when none is left)."""

    def __init__(self, *replies: Reply):
        self.replies = list(replies)
        self.accepted: list[tuple[str, tuple]] = []
        self.envelopes: list = []
        self.pending: defer.Deferred | None = None

    def deliver(self, sender, copies, envelope=None):
        self.envelopes.append(envelope)
        reply = self.replies.pop(0) if self.replies else Reply(250, "2.0.0 Ok: queued")
        if reply == "hold":
            self.pending = defer.Deferred()
            return self.pending
        if reply.positive:
            self.accepted.append((sender, tuple(copies)))
        return defer.succeed(reply)


class Session:
    def __init__(self, processor, next_hop, tls_options=None):
        self.reactor = ThreadlessReactor()
        config = processor.config.smtp
        self.settings = GatewaySettings(
            config=config,
            transform=MessageTransform(processor, config),
            next_hop=next_hop,
            reactor=self.reactor,
            threadpool=ImmediatePool(),
            hostname="gw.acme.test",
            tls_options=tls_options,
        )
        self.proto = SMTPGatewayProtocol(self.settings)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self) -> str:
        out = self.transport.value().decode("ascii")
        self.transport.clear()
        return out

    def send(self, data: bytes) -> str:
        self.proto.dataReceived(data)
        return self.take()


@pytest.fixture
def session(make_processor):
    def make(smtp_extra: str = "", *replies: Reply, tls_options=None):
        hop = ScriptedNextHop(*replies)
        return Session(make_processor(smtp_extra), hop, tls_options), hop

    return make


def _stuff(data: bytes) -> bytes:
    return data.replace(b"\r\n.", b"\r\n..")


def test_exact_dialogue_of_one_message(session):
    s, hop = session()
    assert s.greeting == "220 gw.acme.test ESMTP smimeproxy\r\n"
    assert s.send(b"EHLO client.acme.test\r\n") == (
        "250-gw.acme.test\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n"
        "250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-DSN\r\n250 SMTPUTF8\r\n"
    )
    assert (
        s.send(b"MAIL FROM:<carol@elsewhere.test> BODY=8BITMIME\r\n") == "250 2.1.0 Sender OK\r\n"
    )
    assert s.send(b"RCPT TO:<bob@partner.test>\r\n") == "250 2.1.5 Recipient OK\r\n"
    assert s.send(b"DATA\r\n") == "354 End data with <CR><LF>.<CR><LF>\r\n"
    reply = s.send(_stuff(PLAIN) + b".\r\n")
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    assert s.send(b"QUIT\r\n") == "221 2.0.0 Bye\r\n"
    assert s.transport.disconnecting
    [(sender, copies)] = hop.accepted
    assert sender == "carol@elsewhere.test"
    # neither end local: transit, passed on byte for byte (dots unstuffed)
    assert [(c.recipients, c.data, c.direction) for c in copies] == [
        (("bob@partner.test",), PLAIN, "transit")
    ]


def test_pipelined_commands_answered_in_order(session):
    s, hop = session()
    out = s.send(
        b"EHLO c\r\nMAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<bob@partner.test>\r\n"
        b"RCPT TO:<nobody>\r\nDATA\r\n" + _stuff(PLAIN) + b".\r\nNOOP\r\nQUIT\r\n"
    )
    codes = [line[:4] for line in out.splitlines() if line[3] == " "]
    assert codes == ["250 ", "250 ", "250 ", "501 ", "354 ", "250 ", "250 ", "221 "]
    assert len(hop.accepted) == 1


def test_sequence_and_syntax_errors_are_replies(session):
    s, hop = session()
    assert s.send(b"MAIL FROM:<a@b.test>\r\n").startswith("503 5.5.1 Say EHLO")
    assert s.send(b"HELO c\r\n") == "250 gw.acme.test\r\n"
    assert s.send(b"RCPT TO:<bob@partner.test>\r\n").startswith("503 5.5.1 Need MAIL")
    assert s.send(b"DATA\r\n").startswith("503 5.5.1 Need MAIL")
    assert s.send(b"MAIL FROM:<a@b.test> FOO=1\r\n").startswith("555 ")
    assert s.send(b"MAIL TO:<a@b.test>\r\n").startswith("501 5.1.3")
    assert s.send(b"MAIL FROM:<a@b.test>\r\n").startswith("250 ")
    assert s.send(b"DATA\r\n").startswith("503 5.5.1 Need RCPT")
    assert s.send(b"BDAT 10 LAST\r\n").startswith("500 ")
    assert s.send(b"NOOP\n").startswith("500 5.5.2 Bare CR or LF")
    assert s.send(b"STARTTLS\r\n").startswith("454 4.7.0")
    assert s.send(b"VRFY bob\r\n").startswith("252 ")
    assert hop.accepted == []


SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r\n.\r", b"\r.\r\n"]


@pytest.mark.parametrize("ending", SMUGGLING)
def test_smuggling_refused_and_no_second_message(session, ending):
    """aiosmtpd's test_smtpsmuggling.py, against the gateway: a second message hidden
    behind a non-standard end of data is neither accepted nor relayed."""
    s, hop = session()
    s.send(b"EHLO c\r\nMAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<bob@partner.test>\r\nDATA\r\n")
    out = s.send(
        b"Subject: first\r\n\r\nfirst"
        + ending
        + b"MAIL FROM:<admin@acme.test>\r\nRCPT TO:<bob@partner.test>\r\nDATA\r\n"
        b"From: admin@acme.test\r\nSubject: smuggled\r\n\r\nsecond\r\n.\r\n"
    )
    assert out == "550 5.5.2 Bare CR or LF in the message content refused (RFC 5321 2.3.8)\r\n"
    assert hop.accepted == []
    # the session is still in step: a clean message afterwards goes through alone
    s.send(b"MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<bob@partner.test>\r\nDATA\r\n")
    assert s.send(_stuff(PLAIN) + b".\r\n").startswith("250 ")
    assert len(hop.accepted) == 1
    assert b"smuggled" not in hop.accepted[0][1][0].data


def test_size_limit_announced_checked_at_mail_and_in_data(session):
    s, hop = session("max_message_size = 2048")
    assert "250-SIZE 2048" in s.send(b"EHLO c\r\n")
    assert s.send(b"MAIL FROM:<x@elsewhere.test> SIZE=2049\r\n").startswith("552 5.3.4")
    s.send(b"MAIL FROM:<x@elsewhere.test> SIZE=999\r\nRCPT TO:<bob@partner.test>\r\nDATA\r\n")
    assert s.send(b"Subject: big\r\n\r\n" + b"x" * 4000 + b"\r\n.\r\n").startswith("552 5.3.4")
    assert hop.accepted == []


def test_recipient_limit(session):
    s, _ = session("max_recipients = 2")
    out = s.send(
        b"EHLO c\r\nMAIL FROM:<x@elsewhere.test>\r\n"
        + b"".join(b"RCPT TO:<r%d@partner.test>\r\n" % i for i in range(3))
    )
    assert out.splitlines()[-1] == "452 4.5.3 Too many recipients"


def test_idle_timeout_closes_with_421(session):
    s, _ = session("idle_timeout = 30")
    s.send(b"EHLO c\r\n")
    s.reactor.advance(29)
    assert not s.transport.disconnecting
    s.reactor.advance(2)
    assert s.take() == "421 4.4.2 Idle for too long, closing connection\r\n"
    assert s.transport.disconnecting


def test_no_timeout_while_the_next_hop_is_slow(session):
    s, hop = session("idle_timeout = 30", "hold")
    s.send(b"EHLO c\r\nMAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<bob@partner.test>\r\nDATA\r\n")
    assert s.send(_stuff(PLAIN) + b".\r\nNOOP\r\n") == ""
    s.reactor.advance(300)
    assert not s.transport.disconnecting
    hop.pending.callback(Reply(250, "2.0.0 fine"))
    out = s.take().splitlines()
    assert out[0].startswith("250 2.0.0 Ok: queued as") and out[1] == "250 2.0.0 OK"


def test_must_encrypt_refused_at_rcpt_naming_recipient_and_reason(session):
    s, _hop = session('[smtp.recipient_policy]\n"partner.test" = "must-encrypt"\n')
    s.send(b"EHLO c\r\nMAIL FROM:<alice@acme.test>\r\n")
    assert s.send(b"RCPT TO:<bob@partner.test>\r\n") == "250 2.1.5 Recipient OK\r\n"
    out = s.send(b"RCPT TO:<eve@partner.test>\r\n")
    assert out.startswith("550 5.7.1 <eve@partner.test>: must-encrypt and no usable certificate")
    assert "no certificate known" in out


def test_subject_keyword_forces_encryption_refused_at_data(session):
    s, hop = session('force_encrypt_keyword = "[secure]"')
    s.send(b"EHLO c\r\nMAIL FROM:<alice@acme.test>\r\nRCPT TO:<eve@other.test>\r\nDATA\r\n")
    out = s.send(_stuff(PLAIN.replace(b"Subject: ", b"Subject: [SECURE] ")) + b".\r\n")
    assert out.startswith("550 5.7.1 <eve@other.test>: the subject keyword asks for encryption")
    assert hop.accepted == []


@pytest.mark.parametrize(
    ("hop_reply", "expected"),
    [
        (Reply(550, "5.1.1 <bob@partner.test>: Recipient address rejected"), "550 5.1.1 <bob"),
        (Reply(452, "4.3.1 Insufficient system storage"), "452 4.3.1 Insufficient"),
        (Reply(451, "4.4.1 next hop unreachable, try again later"), "451 4.4.1"),
    ],
)
def test_next_hop_reply_passed_back(session, hop_reply, expected):
    s, _hop = session("", hop_reply)
    s.send(b"EHLO c\r\nMAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<bob@partner.test>\r\nDATA\r\n")
    assert s.send(_stuff(PLAIN) + b".\r\n").startswith(expected)


def test_client_dropping_mid_data_sends_nothing(session):
    s, hop = session()
    s.send(b"EHLO c\r\nMAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<bob@partner.test>\r\nDATA\r\n")
    s.send(PLAIN[:40])
    s.proto.connectionLost(None)
    s.proto.dataReceived(PLAIN[40:] + b".\r\n")
    assert hop.accepted == []


def test_peer_cut_at_every_byte_never_raises(session):
    s0, _ = session()
    dialogue = (
        b"EHLO c\r\nMAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<bob@partner.test>\r\nDATA\r\n"
        + _stuff(PLAIN)
        + b".\r\nQUIT\r\n"
    )
    for cut in range(0, len(dialogue), 7):
        s = Session(s0.settings.transform.processor, ScriptedNextHop())
        s.proto.dataReceived(dialogue[:cut])
        s.proto.connectionLost(None)
        assert all(line[:1] in "2345" for line in s.take().splitlines())


def test_one_structured_log_line_per_message_and_never_the_body(session):
    s, _ = session()
    s.send(b"EHLO c\r\nMAIL FROM:<alice@acme.test>\r\nRCPT TO:<bob@partner.test>\r\nDATA\r\n")
    with capturedLogs() as events:
        reply = s.send(_stuff(PLAIN) + b".\r\n")
    lines = [e for e in events if e.get("log_format", "").startswith("smtp.message ")]
    assert len(lines) == 1
    e = lines[0]
    assert (e["direction"], e["action"], e["outcome"]) == ("outbound", "sign+encrypt", "delivered")
    assert e["algorithms"] != "-"
    assert e["queue_id"] in reply
    assert "figures" not in repr(events)


@pytest.fixture
def processor(make_processor):
    return make_processor()


PIECES = [
    b"EHLO c\r\n",
    b"HELO c\r\n",
    b"MAIL FROM:<x@elsewhere.test>\r\n",
    b"MAIL FROM:<alice@acme.test> SIZE=10\r\n",
    b"RCPT TO:<bob@partner.test>\r\n",
    b"RCPT TO:<alice@acme.test>\r\n",
    b"DATA\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b".\r\n",
    b"\r\n",
    b"\n.\n",
    b"Subject: x\r\n\r\nbody\r\n",
    b"\xff\x00",
]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(st.sampled_from(PIECES) | st.binary(max_size=12), max_size=25))
def test_fuzz_dialogue_only_yields_protocol_replies(processor, chunks):
    s = Session(processor, ScriptedNextHop())
    for chunk in chunks:
        s.proto.dataReceived(chunk)
    s.proto.connectionLost(None)
    for line in s.take().split("\r\n")[:-1]:
        assert re.match(r"^[2-5][0-9][0-9][ -]", line), line
