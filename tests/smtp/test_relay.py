"""The gateway on real loopback sockets, in front of an in-process sink that fails on
demand: next hop down, refusing, slow, dropping mid-DATA, and 1,000 messages with
random failures (every message answered 250 arrives, none is lost)."""

from __future__ import annotations

import random
import smtplib
import tracemalloc

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater

from smimeproxy.smime import mime
from tests.smtp.conftest import PLAIN
from tests.smtp.sink import Sink


def _msg(i: int) -> bytes:
    return PLAIN.replace(b"<q3@acme.test>", b"<m%d@acme.test>" % i)


@pytest_twisted.inlineCallbacks
def test_outbound_through_loopback_arrives_encrypted(gateway):
    sink = Sink()
    g = gateway(sink)
    code, text = yield g.send("alice@acme.test", ["bob@partner.test"], PLAIN)
    assert code == 250 and "queued as" in text
    [got] = sink.received
    assert got.sender == "alice@acme.test" and got.recipients == ["bob@partner.test"]
    top = mime.parse_entity(got.data)
    assert top.mime_type == "application/pkcs7-mime"


@pytest_twisted.inlineCallbacks
def test_next_hop_down_gives_451_then_delivery_once_back(gateway, make_processor):
    g = gateway(None)
    code, text = yield g.send("x@elsewhere.test", ["bob@partner.test"], PLAIN)
    assert (code, text) == (451, "4.4.1 next hop unreachable, try again later")


@pytest.mark.parametrize(
    ("fault", "code", "text"),
    [
        ("refuse-data", 451, "4.3.0 sink refuses for now"),
        ("refuse-rcpt", 450, "4.2.0 <x>: mailbox busy"),
        ("drop-mid-data", 451, "4.4.2 connection to the next hop lost"),
        ("stall", 451, "4.4.2 connection to the next hop lost"),
        ("reject-rcpt", 550, "5.1.1 <x>: Recipient address rejected: User unknown"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_next_hop_faults_then_delivery_when_back(gateway, fault, code, text):
    faults = [fault]
    sink = Sink(fault=lambda: faults.pop() if faults else None)
    g = gateway(sink, "next_hop_timeout = 1")
    got_code, got_text = yield g.send("x@elsewhere.test", ["bob@partner.test"], PLAIN)
    assert got_code == code
    assert got_text.startswith(text)
    assert sink.received == []
    # the sending MTA retries: now it goes through, exactly once
    got_code, _ = yield g.send("x@elsewhere.test", ["bob@partner.test"], PLAIN)
    assert got_code == 250
    assert [r.data for r in sink.received] == [PLAIN]


@pytest_twisted.inlineCallbacks
def test_thousand_messages_with_random_failures_none_lost(gateway):
    rng = random.Random(4)
    faults = ["refuse-data", "drop-mid-data", "refuse-rcpt", None, None, None, None]
    sink = Sink(fault=lambda: rng.choice(faults))
    g = gateway(sink)
    accepted: set[int] = set()

    def worker(ids):
        with smtplib.SMTP("127.0.0.1", g.port, timeout=30) as client:
            client.ehlo("client.test")
            for i in ids:
                while True:  # retry like a sending MTA until accepted
                    try:
                        client.sendmail("x@elsewhere.test", ["bob@partner.test"], _msg(i))
                    except smtplib.SMTPRecipientsRefused:
                        client.rset()
                        continue
                    except smtplib.SMTPDataError as e:
                        assert 400 <= e.smtp_code < 500
                        continue
                    accepted.add(i)
                    break

    yield threads.deferToThread(
        lambda: [f.result() for f in [_pool_submit(worker, range(k, 1000, 4)) for k in range(4)]]
    )
    assert accepted == set(range(1000))
    arrived = {r.data for r in sink.received}
    assert {_msg(i) for i in accepted} <= arrived


_executor = None


def _pool_submit(fn, ids):
    import concurrent.futures

    global _executor
    if _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(4)
    return _executor.submit(fn, list(ids))


@pytest_twisted.inlineCallbacks
def test_thirty_megabyte_attachment_passes(gateway):
    sink = Sink()
    g = gateway(sink)
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAx\r\n"
    big = (
        b"From: x@elsewhere.test\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + line * (30 * 1024 * 1024 // len(line))
        + b"--b--\r\n"
    )
    tracemalloc.start()
    try:
        code, _ = yield g.send("x@elsewhere.test", ["bob@partner.test"], big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == 250
    assert sink.received[0].data == big
    # the memory bound: the client's copy, ours, the sink's and a few transient ones
    print(f"peak traced memory {peak / len(big):.1f} x the message size")
    assert peak < 6 * len(big)


@pytest_twisted.inlineCallbacks
def test_next_hop_connection_reused_and_replaced_when_closed_while_idle(gateway):
    sink = Sink()
    g = gateway(sink)
    for i in range(3):
        code, _ = yield g.send("x@elsewhere.test", ["bob@partner.test"], _msg(i))
        assert code == 250
    assert len(sink.connections) == 1
    # the next hop closes the idle connection: the next message takes a new one
    sink.connections[0].transport.loseConnection()
    yield deferLater(reactor, 0.1, lambda: None)
    code, _ = yield g.send("x@elsewhere.test", ["bob@partner.test"], _msg(3))
    assert code == 250
    assert len(sink.connections) == 2
    assert [r.data for r in sink.received] == [_msg(i) for i in range(4)]
