"""The gateway's ESMTP server: a thin Twisted protocol over :mod:`.codec`.

One message at a time per connection: the session state (EHLO, MAIL, RCPT) lives
here, the wire rules live in the codec, what happens to the message in
:mod:`.transform` (run by :mod:`.engine`: the thread pool or worker processes) and
the sending in :mod:`.relay`. The client
gets 250 only after the next hop accepted every copy; while that happens no further
input is read (pipelined commands wait in the codec and are answered in order).

Announced (RFC 5321 EHLO keywords): PIPELINING (RFC 2920), SIZE (RFC 1870), 8BITMIME
(RFC 6152), ENHANCEDSTATUSCODES (RFC 2034), DSN (RFC 3461), SMTPUTF8 (RFC 6531),
STARTTLS (RFC 3207, when a certificate is configured), AUTH PLAIN LOGIN (RFC 4954, on
submission listeners only: see :mod:`.submission`). Not implemented: CHUNKING,
XFORWARD; VRFY answers 252.

SMTPUTF8 and DSN are carried, not acted on: their MAIL and RCPT parameters are checked
(:mod:`.extensions`) and passed to the next hop with every copy (:mod:`.relay` says
when and why not). UTF-8 is allowed in the addresses of MAIL and RCPT only, and only
in a transaction whose MAIL had SMTPUTF8 (else ``553 5.6.7``); any other command with
a non-ASCII octet is ``500 5.5.2``.

Errors become replies, never tracebacks: a key store failure or a bug while
processing is 451 (the client retries); a client that vanishes mid-DATA leaves nothing
behind (the content is only acted on after the final dot).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from smimeproxy.bugs import log_bug
from smimeproxy.config import SMTPConfig
from smimeproxy.errors import KeystoreError, WorkerError
from smimeproxy.metrics import Registry
from smimeproxy.smtp import replies as R
from smimeproxy.smtp.codec import BadLine, Command, DataChunk, DataEnd, Response, ServerCodec
from smimeproxy.smtp.engine import Engine, ThreadEngine
from smimeproxy.smtp.extensions import Envelope, RecipientParameters, parse_mail, parse_rcpt
from smimeproxy.smtp.relay import NextHop
from smimeproxy.smtp.replies import Reply, render
from smimeproxy.smtp.sasl import MECHANISMS
from smimeproxy.smtp.submission import Submission, SubmissionMixin
from smimeproxy.smtp.transform import MessageTransform, TransformResult
from smimeproxy.sockets import write_now

_PATH = re.compile(r"^(?P<kw>FROM|TO):\s*<(?P<addr>[^<>\s]*)>(?P<params>.*)$", re.IGNORECASE)
#: more errors than this in one session and the client is sent away (Postfix: 20)
MAX_ERRORS = 20
#: what a session still open when the gateway stops is told (RFC 5321 section 3.8)
SHUTTING_DOWN = Reply(421, "4.3.2 Service shutting down, try again later")


class GatewayMetrics:
    """The gateway's counters: messages by direction and outcome, and the time from the
    end of DATA to the final reply. A message whose recipients lie in several
    directions is counted once in each."""

    def __init__(self, registry: Registry | None = None):
        registry = registry or Registry()
        self.messages = registry.counter(
            "smimeproxy_messages_total",
            "Messages at the end of DATA, by direction and outcome",
            ("direction", "outcome"),
        )
        self.seconds = registry.histogram(
            "smimeproxy_smtp_seconds",
            "Time from the end of DATA to the final reply",
            ("direction",),
        )

    def record(self, directions: set[str], outcome: str, seconds: float) -> None:
        for direction in sorted(directions) or ["unknown"]:
            self.messages.inc(direction=direction, outcome=outcome)
            self.seconds.observe(seconds, direction=direction)


@dataclass
class GatewaySettings:
    """What a session needs besides the config: collaborators and TLS options."""

    config: SMTPConfig
    transform: MessageTransform
    next_hop: NextHop
    reactor: Any
    threadpool: Any
    hostname: str = "localhost"
    #: makes the server-side TLS context for STARTTLS; None: STARTTLS not offered
    tls_options: Callable[[], object] | None = None
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    #: where :meth:`MessageTransform.transform` runs (default: ``threadpool``)
    engine: Engine | None = None

    def __post_init__(self) -> None:
        if self.engine is None:
            self.engine = ThreadEngine(self.reactor, self.threadpool)


class SMTPGatewayProtocol(SubmissionMixin, Protocol, TimeoutMixin):
    """One client session (of a submission listener when ``submission`` is given)."""

    _log = Logger()

    def __init__(self, settings: GatewaySettings, submission: Submission | None = None):
        self.s = settings
        self.submission = submission
        self.codec = ServerCodec()
        self.callLater = settings.reactor.callLater  # TimeoutMixin's clock
        self.helo: str | None = None
        self.tls = False
        self.busy = False
        self.errors = 0
        self.closing = False
        self._reset()

    # -- connection -----------------------------------------------------------------------
    def connectionMade(self) -> None:
        # an implicit-TLS listener ("ssl:" endpoint; submissions on 465, RFC 8314) is
        # TLS from the first byte: no STARTTLS to offer, AUTH may be
        self.tls = ISSLTransport.providedBy(self.transport)
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory.sessions.add(self)
            if factory.draining:
                return self._close(SHUTTING_DOWN)
        self.setTimeout(self.s.config.idle_timeout)
        self._reply(Reply(220, f"{self.s.hostname} ESMTP smimeproxy"))

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.setTimeout(None)
        self.closing = True
        self._chunks = []  # a message cut off mid-DATA is simply forgotten
        self.auth_abandon()  # an AUTH exchange cut off: Dovecot forgets it too
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory.session_ended(self)

    @property
    def in_transaction(self) -> bool:
        """A message is being received or processed: stopping waits for its reply."""
        return self.busy or self.sender is not None

    def drain(self) -> None:
        """The gateway is stopping: an idle session is told so now, one in a
        transaction after its final reply (see :meth:`_resume`)."""
        if not self.in_transaction and not self.closing:
            self._close(SHUTTING_DOWN)

    def timeoutConnection(self) -> None:
        if self.busy:
            return
        self._reply(R.IDLE_TIMEOUT)
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        self.codec.receive(data)
        self._process()

    def _reply(self, reply: Reply) -> None:
        if not self.closing:
            write_now(self.transport, render(reply))

    def _close(self, reply: Reply) -> None:
        self._reply(reply)
        self.closing = True
        self.transport.loseConnection()

    def _reset(self) -> None:
        self.sender: str | None = None
        self.recipients: list[str] = []
        self.envelope = Envelope()
        self._rcpt_parameters: dict[str, RecipientParameters] = {}
        self._chunks: list[bytes] = []
        self._size = 0
        self._too_big = False

    # -- event loop -----------------------------------------------------------------------
    def _process(self) -> None:
        while not self.busy and not self.closing:
            event = self.codec.next_event()
            if event is None:
                return
            if isinstance(event, DataChunk):
                self._data_chunk(event.data)
            elif isinstance(event, DataEnd):
                self._data_end(event)
            elif isinstance(event, Response):
                self.auth_response(event.line)
            elif isinstance(event, BadLine):
                self.auth_abandon()  # a bad line in place of a SASL response ends AUTH
                self._error(R.LINE_TOO_LONG if "long" in event.reason else R.BAD_LINE)
            else:
                self._command(event)

    def _error(self, reply: Reply) -> None:
        self.errors += 1
        if self.errors > MAX_ERRORS:
            self._close(R.TOO_MANY_ERRORS)
        else:
            self._reply(reply)

    def _command(self, cmd: Command) -> None:
        handler = getattr(self, f"smtp_{cmd.verb}", None)
        if handler is None or not (cmd.verb.isascii() and cmd.verb.isalpha()):
            if cmd.verb == "DATA":
                self.codec.cancel_data()
            self._error(R.SYNTAX_ERROR)
            return
        if not cmd.argument.isascii() and cmd.verb not in ("MAIL", "RCPT"):
            # RFC 6531 section 3.3 extends MAIL and RCPT only (EHLO names A-labels)
            if cmd.verb == "DATA":
                self.codec.cancel_data()
            self._error(R.BAD_LINE)
            return
        handler(cmd.argument.strip())

    # -- commands -------------------------------------------------------------------------
    def _ehlo_lines(self) -> list[str]:
        lines = [
            self.s.hostname,
            "PIPELINING",
            f"SIZE {self.s.config.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "DSN",
            "SMTPUTF8",
        ]
        if self.s.tls_options is not None and not self.tls:
            lines.append("STARTTLS")
        if self.auth_offered():
            lines.append("AUTH " + " ".join(MECHANISMS))
        return lines

    def smtp_EHLO(self, arg: str) -> None:
        if not arg:
            return self._error(R.ARGUMENT_ERROR)
        self.helo = arg
        self._reset()
        self._reply(Reply(250, "\n".join(self._ehlo_lines())))

    def smtp_HELO(self, arg: str) -> None:
        if not arg:
            return self._error(R.ARGUMENT_ERROR)
        self.helo = arg
        self._reset()
        self._reply(Reply(250, self.s.hostname))

    def smtp_STARTTLS(self, arg: str) -> None:
        if self.tls:
            return self._error(R.ALREADY_TLS)
        if self.s.tls_options is None:
            return self._error(R.TLS_UNAVAILABLE)
        if arg:
            return self._error(R.ARGUMENT_ERROR)
        self._reply(R.READY_TLS)
        # anything pipelined after STARTTLS was sent in clear: drop it (CVE-2011-0411)
        self.codec.discard_buffer()
        self.transport.startTLS(self.s.tls_options())
        self.tls = True
        self.helo = None
        self.auth_reset()
        self._reset()

    def smtp_NOOP(self, arg: str) -> None:
        self._reply(R.NOOP_OK)

    def smtp_RSET(self, arg: str) -> None:
        self._reset()
        self._reply(R.RESET_OK)

    def smtp_VRFY(self, arg: str) -> None:
        self._reply(R.VRFY_NO)

    def smtp_QUIT(self, arg: str) -> None:
        self._close(R.BYE)

    def smtp_MAIL(self, arg: str) -> None:
        if self.helo is None:
            return self._error(R.NEED_EHLO)
        if self.sender is not None:
            return self._error(R.BAD_SEQUENCE)
        if self.submission is not None and self.auth_user is None:
            return self._error(R.AUTH_REQUIRED)
        m = _PATH.match(arg)
        if m is None or m["kw"].upper() != "FROM":
            return self._error(R.BAD_ADDRESS)
        params = parse_mail(m["params"])
        if isinstance(params, Reply):
            return self._error(params)
        if params.size is not None and params.size > self.s.config.max_message_size:
            return self._error(R.TOO_BIG)
        if not m["addr"].isascii() and not params.smtputf8:
            return self._error(R.NON_ASCII_ADDRESS)
        refusal = self.auth_mail_refusal(m["addr"])
        if refusal is not None:
            return self._error(refusal)
        self.sender = m["addr"]
        self.envelope = Envelope(params.smtputf8, params.ret, params.envid)
        self._reply(R.SENDER_OK)

    def smtp_RCPT(self, arg: str) -> None:
        if self.sender is None:
            return self._error(R.NEED_MAIL)
        m = _PATH.match(arg)
        if m is None or m["kw"].upper() != "TO" or "@" not in m["addr"]:
            return self._error(R.BAD_ADDRESS)
        params = parse_rcpt(m["params"], self.envelope.smtputf8)
        if isinstance(params, Reply):
            return self._error(params)
        if not m["addr"].isascii() and not self.envelope.smtputf8:
            return self._error(R.NON_ASCII_ADDRESS)
        if len(self.recipients) >= self.s.config.max_recipients:
            return self._reply(R.TOO_MANY_RECIPIENTS)
        rcpt = m["addr"]
        sender = self.sender
        if not self.s.transform.needs_recipient_check(sender, rcpt):
            self._accept(rcpt, params)
            return self._reply(R.RECIPIENT_OK)
        self.busy = True
        d = deferToThreadPool(
            self.s.reactor, self.s.threadpool, self.s.transform.check_recipient, sender, rcpt
        )

        def done(refusal: Reply | None) -> None:
            if refusal is None:
                self._accept(rcpt, params)
                self._reply(R.RECIPIENT_OK)
            else:
                self._reply(refusal)

        def failed(f: Failure) -> None:
            self._log.failure("smtp.rcpt_check_failed", f)
            self._reply(R.LOCAL_ERROR)

        d.addCallbacks(done, failed)
        d.addBoth(self._resume)

    def _accept(self, rcpt: str, params: RecipientParameters) -> None:
        self.recipients.append(rcpt)
        if params.notify is not None or params.orcpt is not None:
            # the same address twice keeps its first parameters (one copy reaches it)
            self._rcpt_parameters.setdefault(rcpt, params)

    def smtp_DATA(self, arg: str) -> None:
        if self.sender is None:
            self.codec.cancel_data()
            return self._error(R.NEED_MAIL)
        if not self.recipients:
            self.codec.cancel_data()
            return self._error(R.NEED_RCPT)
        self.codec.start_data()
        self._reply(R.START_DATA)

    # -- the message ----------------------------------------------------------------------
    def _data_chunk(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self.s.config.max_message_size:
            self._too_big = True
            self._chunks = []
        elif not self._too_big:
            self._chunks.append(data)

    def _data_end(self, end: DataEnd) -> None:
        if self._too_big:
            self._reset()
            return self._reply(R.TOO_BIG)
        if end.bare_line_end:
            self._reset()
            return self._reply(R.BARE_LINE_END)
        data = b"".join(self._chunks)
        refusal = self.auth_data_refusal(data)
        if refusal is not None:
            self._reset()
            return self._reply(refusal)
        sender, recipients = self.sender or "", list(self.recipients)
        envelope = Envelope(
            self.envelope.smtputf8,
            self.envelope.ret,
            self.envelope.envid,
            MappingProxyType(dict(self._rcpt_parameters)),
        )
        self._reset()
        self.busy = True
        self.setTimeout(None)
        queue_id = secrets.token_hex(6).upper()
        started = time.monotonic()
        directions = {self.s.transform.direction(sender, r) for r in recipients}
        d = self._handle(queue_id, sender, recipients, data, envelope)

        def count(reply: Reply) -> Reply:
            outcome = self._outcome
            self.s.metrics.record(directions, outcome, time.monotonic() - started)
            return reply

        d.addCallback(count)
        d.addCallback(self._reply)
        d.addBoth(self._resume)

    @defer.inlineCallbacks
    def _handle(  # type: ignore[no-untyped-def]
        self, queue_id: str, sender: str, recipients: list[str], data: bytes, envelope: Envelope
    ):
        size = len(data)
        transform = self.s.transform
        self._outcome = "tempfail"
        try:
            if transform.engine_free(sender, recipients):
                result: TransformResult = transform.transform(sender, recipients, data)
            else:
                assert self.s.engine is not None
                result = yield self.s.engine.transform(transform, sender, recipients, data)
        except (KeystoreError, WorkerError) as e:
            self._log_message(queue_id, (), "tempfail", size, len(recipients), str(e))
            return R.LOCAL_ERROR
        except Exception:
            log_bug(self._log, "smtp.transform_failed queue_id={queue_id}", queue_id=queue_id)
            self._log_message(queue_id, (), "tempfail", size, len(recipients), "internal error")
            return R.LOCAL_ERROR
        del data
        if result.refusal is not None:
            self._log_message(queue_id, (), "refused", size, len(recipients), "policy")
            self._outcome = "refused"
            return result.refusal
        try:
            reply = yield self.s.next_hop.deliver(sender, result.copies, envelope)
        except Exception:
            self._log.failure("smtp.relay_failed queue_id={queue_id}", queue_id=queue_id)
            reply = R.LOCAL_ERROR
        outcome = "delivered" if reply.positive else ("tempfail" if reply.temporary else "bounced")
        self._log_message(queue_id, result.copies, outcome, size, len(recipients), "")
        if reply.positive:
            unprocessed = any(c.action == "unprocessed" for c in result.copies)
            self._outcome = "unprocessable" if unprocessed else "relayed"
        else:
            self._outcome = "tempfail" if reply.temporary else "refused"
        if reply.positive:
            return Reply(250, f"2.0.0 Ok: queued as {queue_id}")
        return reply

    def _log_message(self, queue_id, copies, outcome, size, count, reason) -> None:  # type: ignore[no-untyped-def]
        self._log.info(
            "smtp.message queue_id={queue_id} direction={direction} action={action} "
            "algorithms={algorithms} outcome={outcome} size={size} recipients={recipients} "
            "copies={copies} reason={reason}",
            queue_id=queue_id,
            direction=",".join(sorted({c.direction for c in copies})) or "-",
            action=",".join(c.action for c in copies) or "-",
            algorithms=",".join(
                sorted({c.details["cipher"] for c in copies if c.details.get("cipher")})
            )
            or "-",
            outcome=outcome,
            size=size,
            recipients=count,
            copies=len(copies),
            reason=reason or "-",
        )

    def _resume(self, _: object) -> None:
        self.busy = False
        factory = getattr(self, "factory", None)
        if factory is not None and factory.draining and self.sender is None:
            if not self.closing:
                self._close(SHUTTING_DOWN)
            return
        if not self.closing:
            self.setTimeout(self.s.config.idle_timeout)
            self._process()


class SMTPGatewayFactory(Factory):
    """Builds sessions sharing one :class:`GatewaySettings`; on :meth:`drain` lets the
    transactions in flight finish before the gateway stops."""

    _log = Logger()

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.sessions: set[SMTPGatewayProtocol] = set()
        self.draining = False
        self._drained: list[defer.Deferred[None]] = []

    def buildProtocol(self, addr: object) -> SMTPGatewayProtocol:
        return self.build(None)

    def build(self, submission: Submission | None) -> SMTPGatewayProtocol:
        """A session; of a submission listener when ``submission`` is given."""
        proto = SMTPGatewayProtocol(self.settings, submission)
        proto.factory = self
        return proto

    def session_ended(self, proto: SMTPGatewayProtocol) -> None:
        """A session's connection is gone."""
        self.sessions.discard(proto)
        if self.draining and not self.sessions:
            self._fire()

    def drain(self, timeout: float) -> defer.Deferred[None]:
        """Fires when every session's connection is closed (so the final replies were
        flushed, not cut by the reactor's shutdown), or after ``timeout`` seconds (then
        the remaining sessions are cut: their clients retry the message, which was not
        acknowledged). Idle sessions get 421 at once, the others after their final
        reply. Not done here: closing the listening ports (the endpoint services do)."""
        self.draining = True
        d: defer.Deferred[None] = defer.Deferred()
        self._drained.append(d)
        for proto in list(self.sessions):
            proto.drain()
        busy = [p for p in self.sessions if p.in_transaction]
        self._log.info("smtp.draining transactions={count}", count=len(busy))
        if not self.sessions:
            self._fire()
            return d
        reactor = self.settings.reactor
        call = reactor.callLater(timeout, self._expire)
        d.addBoth(lambda r: (call.cancel() if call.active() else None, r)[1])
        return d

    def _expire(self) -> None:
        left = list(self.sessions)
        self._log.warn("smtp.drain_timeout sessions={count}", count=len(left))
        for proto in left:
            proto.closing = True
            proto.transport.abortConnection()
        self._fire()

    def _fire(self) -> None:
        waiting, self._drained = self._drained, []
        for d in waiting:
            d.callback(None)


class SubmissionListener(Factory):
    """The factory of a submission listener: sessions of the gateway's factory (so that
    stopping drains them too) that must authenticate before MAIL."""

    def __init__(self, gateway: SMTPGatewayFactory, submission: Submission):
        self.gateway = gateway
        self.submission = submission

    def buildProtocol(self, addr: object) -> SMTPGatewayProtocol:
        return self.gateway.build(self.submission)


__all__ = ["GatewaySettings", "SMTPGatewayFactory", "SMTPGatewayProtocol", "SubmissionListener"]
