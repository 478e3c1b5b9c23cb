"""Sending copies on to the next hop: one SMTP transaction per copy, no queue.

Connections are reused for the next copy while idle (a few seconds), and the envelope
is pipelined when the next hop offers PIPELINING (RFC 2920): per copy that is one round
trip for MAIL/RCPT/DATA and one for the content.

The gateway keeps nothing: :meth:`NextHop.deliver` sends every copy of a message and
answers with the one reply the gateway gives its client. A positive reply only when
the next hop accepted every copy; the first failure stops the rest and is passed
back: a 5xx from the next hop with its text (the sending MTA bounces with it), a 4xx
as it came, and a failed connection, a timeout or a connection dropped mid-DATA as 451
(the sending MTA retries). Copies already accepted before a failure will be sent
again on the retry: a rare duplicate is preferred to a loss (DESIGN.md).

STARTTLS towards the next hop (RFC 3207): ``require`` refuses to send without it and
verifies the server's identity (service-identity, through Twisted's
``optionsForClientTLS``) against ``next_hop_tls_hostname`` or the host of the endpoint;
``opportunistic`` uses it when offered, without verification (RFC 7435).

SMTPUTF8 (RFC 6531): a copy is sent with ``SMTPUTF8`` on MAIL when it needs it (the
client's MAIL had SMTPUTF8, and an address or a header field of the copy is not ASCII:
:func:`~.extensions.needs_smtputf8`) and the next hop announced it. When it needs it
and the next hop did not announce it, the copy is not sent (RFC 6531 section 3.2: an
SMTP client MUST NOT send such a message there; a relay rejects it or returns it):
the client gets ``553 5.6.7`` (non-ASCII addresses) or ``554 5.6.9`` (UTF-8 header
fields only), and its MTA bounces the message. Nothing is downgraded: the gateway is
not the originator (RFC 6530 section 7). 8BITMIME is sent for an 8-bit copy as before.

DSN (RFC 3461), a decision: when the next hop announced DSN, every copy carries the
client's ``RET`` and ``ENVID`` on MAIL and each recipient its own ``NOTIFY`` and
``ORCPT`` on RCPT, whichever copy it lands in (recipients split into separate copies
keep theirs). When the next hop did not announce DSN the parameters are dropped, as
RFC 3461 section 4.1 has a relaying MTA do. That section then makes the relaying MTA
send a "relayed" DSN for NOTIFY=SUCCESS; the gateway does not: it has no queue and
generates no DSN at all. Failures are not lost by this: the gateway's 250 comes only
after the next hop accepted the copy, and a refusal goes back to the sending MTA, which
bounces (NOTIFY=FAILURE) as it would anyway. Lost is only the "relayed" notice a
sender asked for with NOTIFY=SUCCESS, and only behind a next hop without DSN: in the
deployment of docs/postfix.md the next hop is Postfix's reinjection smtpd, which
announces DSN, so every parameter goes through.

What goes on the wire is made safe whatever the copy holds: every line end becomes
CRLF and dots are stuffed (RFC 5321 section 4.5.2), so no content can end the DATA
early (SMTP smuggling in the other direction). Not guaranteed: a next hop that answers
some recipients with 4xx and others with 250 sees the whole copy retried later.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from smimeproxy.smtp.extensions import Envelope, needs_smtputf8, utf8_refusal
from smimeproxy.smtp.replies import Reply
from smimeproxy.smtp.transform import Copy
from smimeproxy.sockets import write_now

_LINE_ENDS = re.compile(rb"\r\n|\r|\n")
_REPLY_LINE = re.compile(rb"^([2-5][0-9][0-9])([ -])(.*)$")


def wire_data(data: bytes) -> bytes:
    """``data`` as DATA content: CRLF line ends, dots stuffed, ending in CRLF."""
    crlf = data.count(b"\r\n")
    if crlf != data.count(b"\n") or crlf != data.count(b"\r"):
        data = _LINE_ENDS.sub(b"\r\n", data)
    if data.startswith(b"."):
        data = b"." + data
    data = data.replace(b"\r\n.", b"\r\n..")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


class ReplyParser:
    """Sans-I/O: feed bytes from the server, get complete (multi-line) replies."""

    def __init__(self) -> None:
        self._buffer = b""
        self._lines: list[str] = []

    def feed(self, data: bytes) -> list[Reply]:
        self._buffer += data
        replies = []
        while b"\n" in self._buffer:
            line, _, self._buffer = self._buffer.partition(b"\n")
            line = line.rstrip(b"\r")
            m = _REPLY_LINE.match(line) or _REPLY_LINE.match(line + b" ")
            if m is None:
                replies.append(Reply(451, "4.4.0 next hop sent a malformed reply"))
                continue
            self._lines.append(m.group(3).decode("utf-8", "replace"))
            if m.group(2) == b" ":
                replies.append(Reply(int(m.group(1)), "\n".join(self._lines)))
                self._lines = []
        if len(self._buffer) > 4096:
            self._buffer = b""
            replies.append(Reply(451, "4.4.0 next hop sent an over-long reply line"))
        return replies


class _Lost(Exception):
    """The connection closed while a reply was awaited."""

    def __init__(self, after_data: bool = False):
        super().__init__()
        self.after_data = after_data


class RelayProtocol(Protocol):
    """One connection to the next hop; :meth:`command` sends a line, awaits the reply."""

    def __init__(self, reactor: IReactorTime, timeout: float):
        self._reactor = reactor
        self._timeout = timeout
        self._parser = ReplyParser()
        self._waiting: defer.Deferred[Reply] | None = None
        self._pending: list[Reply] = []
        self._lost = False
        self._timer = None
        self.extensions: set[str] = set()

    def connectionMade(self) -> None:
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        self._pending.extend(self._parser.feed(data))
        self._deliver()

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        self._lost = True
        self._disarm()
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.errback(_Lost())

    def _arm(self) -> None:
        self._disarm()
        self._timer = self._reactor.callLater(self._timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self.transport.abortConnection()

    def _deliver(self) -> None:
        if self._waiting is not None and self._pending:
            d, self._waiting = self._waiting, None
            self._disarm()
            d.callback(self._pending.pop(0))

    def reply(self) -> defer.Deferred[Reply]:
        """The next reply from the server (errback with _Lost if the connection goes)."""
        d: defer.Deferred[Reply] = defer.Deferred()
        if self._lost:
            d.errback(_Lost())
            return d
        self._waiting = d
        self._arm()
        self._deliver()
        return d

    def command(self, line: bytes) -> defer.Deferred[Reply]:
        write_now(self.transport, line + b"\r\n")
        return self.reply()

    def send(self, data: bytes) -> defer.Deferred[Reply]:
        write_now(self.transport, data + b".\r\n")
        return self.reply()


@dataclass(frozen=True)
class TLSPolicy:
    """STARTTLS to the next hop: ``mode`` is "require" or "opportunistic"; ``options``
    makes the TLS options for a required (verified) or an opportunistic session."""

    mode: str
    verified_options: Callable[[], object] | None = None
    unverified_options: Callable[[], object] | None = None


def _address(a: str) -> bytes:
    return f"<{a}>".encode("utf-8", "surrogateescape")


class NextHop:
    """Delivers copies to the next hop, reusing idle connections.

    After a transaction the next hop accepted, the connection is kept for the next
    copy (RFC 5321 section 3.3: a new MAIL may follow a completed transaction) for up to
    :attr:`idle_seconds`, at most :attr:`max_idle` of them. A reused connection that
    turns out to be closed before the content was sent is replaced by a new one, once;
    after the content was sent, a lost connection is a 451 (it may have been accepted:
    the retry may duplicate, never lose).
    """

    _log = Logger()
    idle_seconds = 10.0
    max_idle = 16

    def __init__(
        self,
        endpoint: Callable[[], IStreamClientEndpoint],
        reactor: IReactorTime,
        *,
        helo: str = "localhost",
        timeout: float = 600,
        tls: TLSPolicy | None = None,
    ):
        self.endpoint = endpoint
        self.reactor = reactor
        self.helo = helo
        self.timeout = timeout
        self.tls = tls or TLSPolicy("opportunistic")
        self._idle: list[tuple[RelayProtocol, object]] = []

    @defer.inlineCallbacks
    def deliver(self, sender: str, copies: Sequence[Copy], envelope: Envelope | None = None):  # type: ignore[no-untyped-def]
        """One reply for all ``copies``: 250 when the next hop accepted each of them.
        ``envelope``: the client's SMTPUTF8 and DSN parameters, for every copy."""
        envelope = envelope or Envelope()
        last = Reply(250, "2.0.0 OK")
        for copy in copies:
            reply = yield self.send_copy(sender, copy, envelope)
            if not reply.positive:
                return reply
            last = reply
        return last

    def close_idle(self) -> None:
        """Close every idle connection (the service is stopping)."""
        while self._idle:
            proto, timer = self._idle.pop()
            if timer.active():  # type: ignore[attr-defined]
                timer.cancel()  # type: ignore[attr-defined]
            if not proto._lost:
                proto.transport.loseConnection()

    def _take_idle(self) -> RelayProtocol | None:
        while self._idle:
            proto, timer = self._idle.pop()
            if timer.active():  # type: ignore[attr-defined]
                timer.cancel()  # type: ignore[attr-defined]
            if not proto._lost and not proto._pending:
                return proto
            # something arrived while idle (a 421 before the server's own timeout, say):
            # its replies would answer our next commands, so the connection is not reused
            proto.transport.loseConnection()
        return None

    def _keep(self, proto: RelayProtocol) -> None:
        if proto._lost or len(self._idle) >= self.max_idle:
            if not proto._lost:
                proto.transport.write(b"QUIT\r\n")
                proto.transport.loseConnection()
            return

        def expire() -> None:
            self._idle[:] = [(p, t) for p, t in self._idle if p is not proto]
            if not proto._lost:
                proto.transport.write(b"QUIT\r\n")
                proto.transport.loseConnection()

        self._idle.append((proto, self.reactor.callLater(self.idle_seconds, expire)))

    @defer.inlineCallbacks
    def send_copy(self, sender: str, copy: Copy, envelope: Envelope | None = None):  # type: ignore[no-untyped-def]
        envelope = envelope or Envelope()
        data = wire_data(copy.data)
        reused = self._take_idle()
        if reused is not None:
            try:
                reply = yield self._transaction(reused, sender, copy, data, envelope)
            except _Lost as lost:
                if lost.after_data:
                    return _LOST_REPLY
                reused = None  # closed while idle: try once more on a new connection
            else:
                if reply.positive:
                    self._keep(reused)
                else:
                    reused.transport.loseConnection()
                return reply
        from twisted.internet.endpoints import connectProtocol

        proto = RelayProtocol(self.reactor, self.timeout)
        try:
            yield connectProtocol(self.endpoint(), proto)
        except Exception as e:
            self._log.warn("smtp.next_hop_unreachable error={error}", error=type(e).__name__)
            return Reply(451, "4.4.1 next hop unreachable, try again later")
        try:
            refusal = yield self._session(proto)
            if refusal is not None:
                proto.transport.loseConnection()
                return refusal
            reply = yield self._transaction(proto, sender, copy, data, envelope)
        except _Lost:
            return _LOST_REPLY
        if reply.positive:
            self._keep(proto)
        elif not proto._lost:
            proto.transport.loseConnection()
        return reply

    @defer.inlineCallbacks
    def _session(self, proto: RelayProtocol):  # type: ignore[no-untyped-def]
        """Greeting, EHLO and STARTTLS; None when ready, else the reply to give."""
        greeting = yield proto.reply()
        if greeting.code != 220:
            return _from_next_hop(greeting, "greeting")
        reply = yield proto.command(b"EHLO " + self.helo.encode("ascii"))
        if reply.code != 250:
            return _from_next_hop(reply, "EHLO")
        extensions = {line.split(" ")[0].upper() for line in reply.lines()[1:]}
        if "STARTTLS" in extensions and _tls_possible(proto):
            reply = yield proto.command(b"STARTTLS")
            if reply.code == 220:
                options = (
                    self.tls.verified_options
                    if self.tls.mode == "require"
                    else self.tls.unverified_options
                )
                if options is None:
                    return Reply(451, "4.7.5 no TLS settings for the next hop")
                proto.transport.startTLS(options())
                reply = yield proto.command(b"EHLO " + self.helo.encode("ascii"))
                if reply.code != 250:
                    return _from_next_hop(reply, "EHLO")
                extensions = {line.split(" ")[0].upper() for line in reply.lines()[1:]}
            elif self.tls.mode == "require":
                return Reply(451, "4.7.5 next hop refused STARTTLS")
        elif self.tls.mode == "require":
            return Reply(451, "4.7.5 next hop does not offer STARTTLS, which is required")
        proto.extensions = extensions
        return None

    @defer.inlineCallbacks
    def _transaction(  # type: ignore[no-untyped-def]
        self, proto: RelayProtocol, sender: str, copy: Copy, data: bytes, envelope: Envelope
    ):
        """MAIL, RCPT, DATA on a ready session; the caller closes a connection whose
        transaction was refused (no RSET dance: refusals are rare)."""
        extensions = proto.extensions
        if needs_smtputf8(envelope, sender, copy.recipients, data):
            if "SMTPUTF8" not in extensions:
                self._log.info("smtp.next_hop_without_smtputf8")
                return utf8_refusal(sender, copy.recipients)
            utf8 = True
        else:
            utf8 = False
        dsn = "DSN" in extensions
        mail = b"MAIL FROM:" + _address(sender)
        if "8BITMIME" in extensions and not data.isascii():
            mail += b" BODY=8BITMIME"
        if utf8:
            mail += b" SMTPUTF8"
        if dsn:
            mail += envelope.dsn_mail()
        rcpts = [
            b"RCPT TO:" + _address(r) + (envelope.for_recipient(r).wire(utf8) if dsn else b"")
            for r in copy.recipients
        ]
        commands = [mail, *rcpts, b"DATA"]
        stages = ["MAIL", *(f"RCPT <{r}>" for r in copy.recipients), "DATA"]
        expected = [(250,), *((250, 251) for _ in copy.recipients), (354,)]
        if "PIPELINING" in extensions:
            # RFC 2920: the whole envelope in one write, the replies read in order
            write_now(proto.transport, b"".join(c + b"\r\n" for c in commands))
            replies = []
            for _ in commands:
                replies.append((yield proto.reply()))
        else:
            replies = []
            for command, ok in zip(commands, expected, strict=True):
                replies.append((yield proto.command(command)))
                if replies[-1].code not in ok:
                    break
        for reply, ok, stage in zip(replies, expected, stages, strict=False):
            if reply.code not in ok:
                return _from_next_hop(reply, stage)
        try:
            reply = yield proto.send(data)
        except _Lost:
            raise _Lost(after_data=True) from None
        if reply.code != 250:
            return _from_next_hop(reply, "end of data")
        return reply


_LOST_REPLY = Reply(451, "4.4.2 connection to the next hop lost, try again later")


def _tls_possible(proto: RelayProtocol) -> bool:
    from twisted.internet.interfaces import ITLSTransport

    return ITLSTransport.providedBy(proto.transport)


def _from_next_hop(reply: Reply, stage: str) -> Reply:
    """The next hop's refusal as our reply: its code class and text kept."""
    if reply.code < 400:
        return Reply(451, f"4.4.0 next hop answered {reply.code} to {stage}")
    code = (
        reply.code
        if reply.code in (421, 450, 451, 452, 550, 551, 552, 553, 554)
        else (451 if reply.temporary else 554)
    )
    if code == 421:
        code = 451  # 421 closes *our* client's session; the message is what failed
    return Reply(code, f"{reply.text}\n(from the next hop at {stage})")
