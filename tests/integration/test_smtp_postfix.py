"""The gateway as Postfix's after-queue content filter, end to end on 127.0.0.1.

client (smtplib, swaks) -> Postfix smtpd -> queue -> gateway (content filter)
  -> Postfix reinjection smtpd -> queue -> smtp-sink (the next hop, writes files)

What arrives is checked with ``openssl cms`` (decrypt as the recipient, verify against
the test root). The Postfix configuration is exactly the one in docs/postfix.md
(tests/integration/postfix.py writes it).
"""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater

from smimeproxy.config import load_config
from smimeproxy.keystore import MasterSecret, open_store
from smimeproxy.processing import MessageProcessor
from smimeproxy.smime import mime
from smimeproxy.smime.sealer import seal
from smimeproxy.smtp import make_service
from smimeproxy.testing import CertificateFactory
from tests.conftest import require_tool
from tests.integration.postfix import (
    UTF8_DOMAIN,
    Postfix,
    SinkMessage,
    SmtpSink,
    free_port,
    world_readable_tempdir,
)
from tests.smtp.sink import Sink

TEXT = b"The figures are attached."


def message(sender: str, to: str, tag: str) -> bytes:
    return (
        (
            f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {tag}\r\nMessage-ID: <{tag}@acme.test>\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        ).encode()
        + TEXT
        + b"\r\n.leading dot\r\n"
    )


@pytest.fixture(scope="module")
def world():
    require_tool("postfix")
    require_tool("smtp-sink")
    base = world_readable_tempdir("smimeproxy-postfix-")
    pki = CertificateFactory()
    users = {n: pki.user(f"{n}@{d}") for n, d in (("alice", "acme.test"), ("bob", "partner.test"))}
    gateway_port = free_port()
    sink = SmtpSink(base / "sink")
    sink.start()
    # smtp-sink does not offer SMTPUTF8: mail to UTF8_DOMAIN goes to this one instead
    utf8_sink = Sink(extensions=("PIPELINING", "SMTPUTF8", "DSN"))
    utf8_port = reactor.listenTCP(0, utf8_sink.factory(), interface="127.0.0.1")
    postfix = Postfix(
        base / "postfix",
        gateway_port=gateway_port,
        relay_port=sink.port,
        utf8_port=utf8_port.getHost().port,
    )
    config_path = base / "smimeproxy.toml"
    config_path.write_text(
        f"""
[keystore]
url = "sqlite:store.db"
[smime]
authserv_id = "mx.acme.test"
[smtp]
listen = ["tcp:{gateway_port}:interface=127.0.0.1"]
next_hop = "tcp:127.0.0.1:{postfix.reinject_port}"
local_domains = ["acme.test"]
"""
    )
    config = load_config(config_path)
    store = open_store(config.keystore.url, MasterSecret(os.urandom(32), "test"), create=True)
    store.add_trust(pki.root.certificate)
    store.import_key(users["alice"].private_key, users["alice"].certificate)
    store.import_certificate(users["bob"].certificate)
    processor = MessageProcessor(store, config.smime)
    service = make_service(config, processor, reactor)
    service.startService()
    try:
        postfix.start()
    except Exception:
        sink.stop()
        pytest_twisted.blockon(service.stopService())
        pytest_twisted.blockon(utf8_port.stopListening())
        raise
    world_ = {
        "postfix": postfix,
        "sink": sink,
        "utf8_sink": utf8_sink,
        "service": service,
        "pki": pki,
        "users": users,
        "base": base,
        "restart": lambda: make_service(config, processor, reactor),
    }
    yield world_
    postfix.stop()
    sink.stop()
    pytest_twisted.blockon(world_["service"].stopService())
    pytest_twisted.blockon(utf8_port.stopListening())
    shutil.rmtree(base, ignore_errors=True)


def send(world, sender: str, to: str, data: bytes):
    def run():
        with smtplib.SMTP("127.0.0.1", world["postfix"].smtpd_port, timeout=30) as c:
            c.sendmail(sender, [to], data)

    return threads.deferToThread(run)


@pytest_twisted.inlineCallbacks
def arrived(world, tag: str, timeout: float = 30):
    """The sink's messages whose Subject is ``tag`` (waits for at least one)."""
    waited = 0.0
    while waited < timeout:
        found = [m for m in world["sink"].messages() if f"Subject: {tag}\n".encode() in m.data]
        if found:
            return found
        yield deferLater(reactor, 0.2, lambda: None)
        waited += 0.2
    raise AssertionError(f"{tag} never arrived; Postfix log:\n{world['postfix'].log()[-3000:]}")


def openssl_cms(openssl: str, tmp: Path, *args: str, data: bytes) -> subprocess.CompletedProcess:
    src = tmp / "in.eml"
    src.write_bytes(data)
    return subprocess.run(
        [openssl, "cms", *args, "-in", str(src)], capture_output=True, check=False, timeout=60
    )


@pytest_twisted.inlineCallbacks
def test_outbound_through_postfix_arrives_signed_and_encrypted(world, openssl, tmp_path):
    yield send(
        world,
        "alice@acme.test",
        "bob@partner.test",
        message("alice@acme.test", "bob@partner.test", "out-1"),
    )
    [got] = yield arrived(world, "out-1")
    assert isinstance(got, SinkMessage)
    assert got.recipients == ["bob@partner.test"]
    top = mime.parse_entity(got.data)
    assert top.mime_type == "application/pkcs7-mime"
    assert TEXT not in got.data
    bob = world["users"]["bob"]
    (tmp_path / "bob.key").write_bytes(bob.key_pem)
    (tmp_path / "bob.pem").write_bytes(bob.cert_pem)
    (tmp_path / "root.pem").write_bytes(world["pki"].root.cert_pem)
    dec = openssl_cms(
        openssl, tmp_path, "-decrypt", "-inkey", str(tmp_path / "bob.key"),
        "-recip", str(tmp_path / "bob.pem"), data=got.data,
    )  # fmt: skip
    assert dec.returncode == 0, dec.stderr.decode()
    ver = openssl_cms(
        openssl, tmp_path, "-verify", "-CAfile", str(tmp_path / "root.pem"), "-purpose", "any",
        data=dec.stdout,
    )  # fmt: skip
    assert ver.returncode == 0, ver.stderr.decode()
    assert TEXT in ver.stdout and b".leading dot" in ver.stdout


@pytest_twisted.inlineCallbacks
def test_inbound_through_postfix_sent_with_swaks_arrives_decrypted(world, tmp_path):
    swaks = require_tool("swaks")
    users = world["users"]
    sealed = seal(
        message("bob@partner.test", "alice@acme.test", "in-1"),
        signer=users["bob"].pair,
        chain=[users["bob"].certificate],
        recipients=[users["alice"].certificate],
    )
    (tmp_path / "in.eml").write_bytes(sealed)
    done = yield threads.deferToThread(
        subprocess.run,
        [swaks, "--server", f"127.0.0.1:{world['postfix'].smtpd_port}",
         "--from", "bob@partner.test", "--to", "alice@acme.test",
         "--data", str(tmp_path / "in.eml"), "--silent", "2"],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    [got] = yield arrived(world, "in-1")
    assert got.recipients == ["alice@acme.test"]
    top = mime.parse_entity(got.data)
    [ar] = top.get_all("Authentication-Results")
    assert ar.startswith("mx.acme.test; smime=pass")
    assert "body.smime-identifier=bob@partner.test" in ar
    assert TEXT in got.data


@pytest_twisted.inlineCallbacks
def test_smuggling_attempt_through_postfix_yields_no_second_message(world):
    """SMTP smuggling from a client through Postfix and the gateway: whatever Postfix
    makes of the bare line ends, no smuggled message appears at the next hop."""

    def run():
        with socket.create_connection(("127.0.0.1", world["postfix"].smtpd_port), 30) as s:
            f = s.makefile("rwb")
            f.readline()
            f.write(
                b"EHLO c\r\nMAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<alice@acme.test>\r\nDATA\r\n"
            )
            f.flush()
            replies = []
            while not replies or replies[-1][:3] not in (b"354", b""):
                replies.append(f.readline())
            assert replies[-1].startswith(b"354")
            f.write(
                b"Subject: smuggle-outer\r\n\r\nouter\n.\n"
                b"MAIL FROM:<ceo@acme.test>\r\nRCPT TO:<alice@acme.test>\r\nDATA\r\n"
                b"Subject: smuggle-inner\r\n\r\ninner\r\n.\r\nQUIT\r\n"
            )
            f.flush()
            return f.read()

    rest = yield threads.deferToThread(run)
    # Postfix, configured as in docs/postfix.md, does not end DATA at "<LF>.<LF>": one
    # message, with the would-be second one inside it as content
    assert rest.startswith(b"250 "), rest
    [got] = yield arrived(world, "smuggle-outer")
    assert b"Subject: smuggle-inner" in got.data
    yield deferLater(reactor, 1, lambda: None)
    subjects = [mime.parse_entity(m.data).get("Subject") for m in world["sink"].messages()]
    alone = [s for s in subjects if s == "smuggle-inner"]
    assert alone == []


@pytest_twisted.inlineCallbacks
def test_gateway_down_postfix_defers_then_delivers_once_back(world):
    service = world["service"]
    yield service.stopService()
    yield send(
        world,
        "x@elsewhere.test",
        "alice@acme.test",
        message("x@elsewhere.test", "alice@acme.test", "down-1"),
    )
    waited = 0
    while b"status=deferred" not in world["postfix"].log().encode() and waited < 100:
        yield deferLater(reactor, 0.2, lambda: None)
        waited += 1
    assert "status=deferred" in world["postfix"].log()
    assert not [m for m in world["sink"].messages() if b"Subject: down-1\n" in m.data]
    # a stopped StreamServerEndpointService does not listen again: build a new one
    service = world["service"] = world["restart"]()
    service.startService()
    world["postfix"].flush()
    found = yield arrived(world, "down-1", timeout=60)
    assert len(found) == 1


@pytest_twisted.inlineCallbacks
def test_utf8_recipient_through_postfix_arrives_with_smtputf8(world):
    """Postfix (smtputf8_enable = yes) -> gateway -> reinjection -> a next hop that
    offers SMTPUTF8: the UTF-8 addresses and the UTF-8 Subject arrive, signed by the
    gateway, and SMTPUTF8 was asked for on every hop."""
    rcpt = f"用户@{UTF8_DOMAIN}"
    data = (
        f"From: <alice@acme.test>\r\nTo: <{rcpt}>\r\nSubject: grüße utf8-1\r\n"
        "Message-ID: <utf8-1@acme.test>\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\nHallo Jürgen.\r\n"
    ).encode()

    def run():
        with smtplib.SMTP("127.0.0.1", world["postfix"].smtpd_port, timeout=30) as c:
            c.ehlo("client.test")
            assert c.has_extn("smtputf8")
            c.sendmail("alice@acme.test", [rcpt], data, mail_options=["SMTPUTF8"])

    yield threads.deferToThread(run)
    sink = world["utf8_sink"]
    waited = 0.0
    while not sink.received and waited < 30:
        yield deferLater(reactor, 0.2, lambda: None)
        waited += 0.2
    assert sink.received, world["postfix"].log()[-3000:]
    [got] = sink.received
    assert got.sender == "alice@acme.test" and got.recipients == [rcpt]
    assert " SMTPUTF8" in got.mail_args
    assert got.rcpt_args[0].startswith(f"TO:<{rcpt}>")
    top = mime.parse_entity(got.data)
    assert top.mime_type == "multipart/signed"  # the gateway signed it
    assert "Subject: grüße utf8-1".encode() in got.data


@pytest_twisted.inlineCallbacks
def test_dsn_parameters_through_postfix_arrive_at_the_next_hop(world):
    """NOTIFY=SUCCESS,FAILURE and ORCPT from the client reach smtp-sink after the
    gateway (Postfix passes them to the gateway, which announces DSN, and the gateway to
    the reinjection smtpd); smtp-sink records the RCPT arguments."""
    data = message("x@elsewhere.test", "alice@acme.test", "dsn-1")

    def run():
        with smtplib.SMTP("127.0.0.1", world["postfix"].smtpd_port, timeout=30) as c:
            c.ehlo("client.test")
            assert c.has_extn("dsn")
            c.sendmail(
                "x@elsewhere.test",
                ["alice@acme.test"],
                data,
                mail_options=["RET=HDRS", "ENVID=dsn+2B1"],
                rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;alice+2Btag@acme.test"],
            )

    yield threads.deferToThread(run)
    [got] = yield arrived(world, "dsn-1")
    assert got.recipients == ["alice@acme.test"]
    dump = (world["sink"].directory).iterdir()
    raw = [p.read_bytes() for p in dump]
    [mine] = [r for r in raw if b"Subject: dsn-1\n" in r]
    args = {
        name: value.split()
        for name, _, value in (
            line.partition(": ") for line in mine.split(b"\n\n")[0].decode().splitlines()
        )
        if name in ("X-Mail-Args", "X-Rcpt-Args")
    }
    # Postfix writes the parameters in its own order
    assert args["X-Mail-Args"][0] == "<x@elsewhere.test>"
    assert sorted(args["X-Mail-Args"][1:]) == ["ENVID=dsn+2B1", "RET=HDRS"]
    assert args["X-Rcpt-Args"][0] == "<alice@acme.test>"
    assert sorted(args["X-Rcpt-Args"][1:]) == [
        "NOTIFY=SUCCESS,FAILURE",
        "ORCPT=rfc822;alice+2Btag@acme.test",
    ]
