"""write_now and flush: the fast paths only where they are exactly what the reactor
would do next; byte order kept across fast and buffered writes."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import StringTransport

from smimeproxy.sockets import _idle_plain_tcp, flush, write_now


def test_other_transports_just_write() -> None:
    t = StringTransport()
    write_now(t, b"* OK hi\r\n")
    flush(t)  # nothing to flush on a transport that is not a socket
    assert t.value() == b"* OK hi\r\n"
    assert not _idle_plain_tcp(t)


@pytest_twisted.inlineCallbacks
def test_live_tcp_keeps_byte_order_across_fast_and_buffered_writes():  # type: ignore[no-untyped-def]
    received = bytearray()
    done: defer.Deferred[None] = defer.Deferred()

    class Sink(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            received.extend(data)
            if received.endswith(b"END\r\n"):
                self.transport.loseConnection()
                done.callback(None)

    class Writer(protocol.Protocol):
        def connectionMade(self) -> None:
            assert _idle_plain_tcp(self.transport)
            write_now(self.transport, b"first\r\n")  # sent at once
            self.transport.write(b"x" * 300_000)  # buffered: the rest must queue behind
            assert not _idle_plain_tcp(self.transport)
            write_now(self.transport, b"y" * 300_000)  # queued behind, not sent first
            flush(self.transport)  # part may leave now; the rest stays with the reactor
            write_now(self.transport, b"END\r\n")

    sink = protocol.ServerFactory()
    sink.protocol = Sink
    port = reactor.listenTCP(0, sink, interface="127.0.0.1")
    try:
        writer = protocol.ClientFactory()
        writer.protocol = Writer
        reactor.connectTCP("127.0.0.1", port.getHost().port, writer)
        yield done
        assert bytes(received) == b"first\r\n" + b"x" * 300_000 + b"y" * 300_000 + b"END\r\n"
    finally:
        yield port.stopListening()
