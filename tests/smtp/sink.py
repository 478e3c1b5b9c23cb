"""An in-process SMTP sink for loopback tests: records what it accepts, and fails on
demand (refuse, stall, drop the connection mid-DATA). Built on the gateway's own codec,
which is tested on its own in test_codec.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.protocol import Factory, Protocol

from smimeproxy.smtp.codec import Command, DataChunk, DataEnd, ServerCodec


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    #: the MAIL and RCPT lines' arguments as sent (with their parameters)
    mail_args: str = ""
    rcpt_args: list[str] = field(default_factory=list)


@dataclass
class Sink:
    """``fault()`` is asked once per transaction: None, "refuse-data", "refuse-rcpt",
    "reject-rcpt", "drop-mid-data", "stall". ``extensions``: EHLO keywords announced
    besides 8BITMIME (say "SMTPUTF8", "DSN", "PIPELINING"); a MAIL or RCPT parameter of
    an extension not announced is refused with 555, as a strict server would."""

    fault: Callable[[], str | None] = lambda: None
    received: list[Received] = field(default_factory=list)
    tls_options: Callable[[], object] | None = None
    connections: list[Protocol] = field(default_factory=list)
    extensions: tuple[str, ...] = ()

    def factory(self) -> Factory:
        return Factory.forProtocol(lambda: _SinkProtocol(self))


class _SinkProtocol(Protocol):
    def __init__(self, sink: Sink):
        self.sink = sink
        self.codec = ServerCodec()
        self.sender = ""
        self.rcpts: list[str] = []
        self.mail_args = ""
        self.rcpt_args: list[str] = []
        self.chunks: list[bytes] = []
        self.fault: str | None = None

    def connectionMade(self) -> None:
        self.sink.connections.append(self)
        self.transport.write(b"220 sink.test ESMTP\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.codec.receive(data)
        while (event := self.codec.next_event()) is not None:
            if isinstance(event, DataChunk):
                self.chunks.append(event.data)
                if self.fault == "drop-mid-data":
                    self.transport.abortConnection()
                    return
            elif isinstance(event, DataEnd):
                if self.fault == "refuse-data":
                    self.transport.write(b"451 4.3.0 sink refuses for now\r\n")
                elif self.fault == "stall":
                    pass  # never answer
                else:
                    self.sink.received.append(
                        Received(
                            self.sender,
                            self.rcpts,
                            b"".join(self.chunks),
                            self.mail_args,
                            self.rcpt_args,
                        )
                    )
                    self.transport.write(b"250 2.0.0 Ok: sunk\r\n")
            elif isinstance(event, Command):
                self.command(event)

    def command(self, cmd: Command) -> None:
        w = self.transport.write
        if cmd.verb == "EHLO":
            tls = b"250-STARTTLS\r\n" if self.sink.tls_options else b""
            more = b"".join(f"250-{e}\r\n".encode() for e in self.sink.extensions)
            w(b"250-sink.test\r\n" + tls + more + b"250 8BITMIME\r\n")
        elif cmd.verb == "STARTTLS":
            w(b"220 go ahead\r\n")
            self.transport.startTLS(self.sink.tls_options())
        elif cmd.verb == "MAIL":
            self.fault = self.sink.fault()
            self.sender = cmd.argument.partition("<")[2].partition(">")[0]
            self.rcpts, self.chunks, self.rcpt_args = [], [], []
            self.mail_args = cmd.argument
            if not self._parameters_known(cmd.argument, {"SMTPUTF8", "RET", "ENVID"}):
                return w(b"555 5.5.4 parameter not announced\r\n")
            if not self.sender.isascii() and "SMTPUTF8" not in cmd.argument.upper():
                return w(b"553 5.6.7 non-ASCII without SMTPUTF8\r\n")
            w(b"250 2.1.0 Ok\r\n")
        elif cmd.verb == "RCPT":
            if not self._parameters_known(cmd.argument, {"NOTIFY", "ORCPT"}):
                return w(b"555 5.5.4 parameter not announced\r\n")
            if self.fault == "refuse-rcpt":
                w(b"450 4.2.0 <x>: mailbox busy\r\n")
            elif self.fault == "reject-rcpt":
                w(b"550 5.1.1 <x>: Recipient address rejected: User unknown\r\n")
            else:
                self.rcpts.append(cmd.argument.partition("<")[2].partition(">")[0])
                self.rcpt_args.append(cmd.argument)
                w(b"250 2.1.5 Ok\r\n")
        elif cmd.verb == "DATA":
            self.codec.start_data()
            w(b"354 go\r\n")
        elif cmd.verb == "QUIT":
            w(b"221 bye\r\n")
            self.transport.loseConnection()
        else:
            w(b"250 Ok\r\n")

    def _parameters_known(self, argument: str, of_extensions: set[str]) -> bool:
        """False when a parameter belongs to an extension this sink did not announce."""
        announced = {e.split()[0].upper() for e in self.sink.extensions}
        need = {"SMTPUTF8": "SMTPUTF8", "RET": "DSN", "ENVID": "DSN"}
        need |= {"NOTIFY": "DSN", "ORCPT": "DSN"}
        for param in argument.partition(">")[2].split():
            name = param.partition("=")[0].upper()
            if name in of_extensions and need[name] not in announced:
                return False
        return True
