"""STARTTLS both ways: towards clients with the gateway's certificate, and towards the
next hop, required (name verified with service-identity) or opportunistic."""

from __future__ import annotations

import smtplib
import ssl as stdlib_ssl

import pytest
import pytest_twisted
from twisted.internet import ssl as tssl
from twisted.internet import threads
from twisted.internet.testing import StringTransport

from tests.smtp.conftest import PLAIN
from tests.smtp.loopback import Gateway
from tests.smtp.sink import Sink
from tests.smtp.test_server import ScriptedNextHop, Session


class TLSStringTransport(StringTransport):
    """Records startTLS instead of doing it (the protocol's side is what is tested)."""

    started = None

    def startTLS(self, options):
        self.started = options


def test_starttls_drops_pipelined_cleartext_and_resets_the_session(make_processor):
    s = Session(make_processor(), ScriptedNextHop(), tls_options=lambda: "ctx")
    s.transport = TLSStringTransport()
    s.proto.makeConnection(s.transport)
    s.take()
    assert "250 STARTTLS\r\n" in s.send(b"EHLO c\r\n")
    # CVE-2011-0411: commands sent in clear behind STARTTLS must not be executed
    out = s.send(b"STARTTLS\r\nMAIL FROM:<evil@elsewhere.test>\r\n")
    assert out == "220 2.0.0 Ready to start TLS\r\n"
    assert s.transport.started == "ctx"
    assert s.send(b"MAIL FROM:<x@elsewhere.test>\r\n").startswith("503 5.5.1 Say EHLO")
    assert "STARTTLS" not in s.send(b"EHLO c\r\n")
    assert s.send(b"STARTTLS\r\n").startswith("503 5.5.1 TLS already active")


@pytest_twisted.inlineCallbacks
def test_client_starttls_with_the_gateways_certificate(make_processor, tls_files):
    sink = Sink()
    g = Gateway(
        make_processor,
        sink,
        f'tls_certificate = "{tls_files / "gw.pem"}"\ntls_key = "{tls_files / "gw.key"}"',
    )
    try:

        def run():
            context = stdlib_ssl.create_default_context(cafile=str(tls_files / "root.pem"))
            with smtplib.SMTP("localhost", g.port, timeout=30) as c:
                c.ehlo("client.test")
                assert c.has_extn("starttls")
                c.starttls(context=context)
                c.ehlo("client.test")
                assert not c.has_extn("starttls")
                c.sendmail("x@elsewhere.test", ["bob@partner.test"], PLAIN)
                return c.sock.version()

        version = yield threads.deferToThread(run)
        assert version in ("TLSv1.2", "TLSv1.3")
        assert [r.data for r in sink.received] == [PLAIN]
    finally:
        yield g.stop()


def _tls_sink(tls_files) -> Sink:
    pem = (tls_files / "gw.pem").read_bytes() + (tls_files / "gw.key").read_bytes()
    options = tssl.PrivateCertificate.loadPEM(pem).options()
    return Sink(tls_options=lambda: options)


@pytest.mark.parametrize(
    ("extra", "sink_tls", "expected"),
    [
        ('next_hop_starttls = "require"\nnext_hop_tls_hostname = "localhost"', True, 250),
        ('next_hop_starttls = "require"\nnext_hop_tls_hostname = "wrong.test"', True, 451),
        ('next_hop_starttls = "require"\nnext_hop_tls_hostname = "localhost"', False, 451),
        ('next_hop_starttls = "opportunistic"\nnext_hop_tls_hostname = "wrong.test"', True, 250),
        ('next_hop_starttls = "opportunistic"', False, 250),
    ],
)
@pytest_twisted.inlineCallbacks
def test_next_hop_starttls_policy(make_processor, tls_files, extra, sink_tls, expected):
    sink = _tls_sink(tls_files) if sink_tls else Sink()
    g = Gateway(make_processor, sink, extra + f'\nnext_hop_ca_file = "{tls_files / "root.pem"}"')
    try:
        code, text = yield g.send("x@elsewhere.test", ["bob@partner.test"], PLAIN)
        assert code == expected, text
        assert len(sink.received) == (1 if expected == 250 else 0)
    finally:
        yield g.stop()
