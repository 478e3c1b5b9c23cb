"""The SMTP gateway as a service on real loopback sockets, in front of a sink (or of
nothing listening), and an smtplib client for it: shared by the gateway's tests."""

from __future__ import annotations

import smtplib

from twisted.internet import reactor, threads

from smimeproxy.smtp import make_service
from tests.ports import free_port
from tests.smtp.sink import Sink


class Gateway:
    def __init__(self, make_processor, sink: Sink | None, extra: str = ""):
        self.sink = sink
        self.sink_port = (
            reactor.listenTCP(0, sink.factory(), interface="127.0.0.1") if sink else None
        )
        hop_port = self.sink_port.getHost().port if sink else free_port()
        self.port = free_port()
        processor = make_processor(
            extra,
            next_hop=f"tcp:127.0.0.1:{hop_port}",
            listen=f"tcp:{self.port}:interface=127.0.0.1",
        )
        self.processor = processor
        self.service = make_service(processor.config, processor, reactor)
        self.service.startService()

    def stop(self):
        d = self.service.stopService()
        if self.sink_port is not None:
            d.addCallback(lambda _: self.sink_port.stopListening())
        return d

    def send(self, sender, recipients, data):
        """smtplib in a thread; returns (code, text) of the end-of-data reply."""

        def run():
            with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
                client.ehlo("client.test")
                client.mail(sender)
                for r in recipients:
                    code, text = client.rcpt(r)
                    if code >= 400:
                        return code, text.decode()
                code, text = client.data(data)
                return code, text.decode()

        return threads.deferToThread(run)
