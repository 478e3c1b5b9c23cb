"""One client connection of the IMAP proxy: pass-through plumbing and command routing.

The session forwards the client's commands to the server and the server's responses to
the client, event by event from :class:`~smimeproxy.imap.wire.Splitter`, so literals of
any size stream through.  Commands are read whole (bounded) so the session can see what
they are; literals of those it answers ``+`` itself.  The only exception is APPEND to a
folder that is not Sent, which streams.

Three kinds of command are *intercepted* (see :mod:`smimeproxy.imap.intercept`): FETCH of
content, SEARCH with BODY/TEXT, and APPEND to Sent, and only for a login that is a user
with keys in the store.  An intercept waits until every earlier command has completed,
runs its own tagged commands on the same upstream connection (tags ``smpN``; their
untagged FETCH responses are consumed, every other untagged response is passed on), and
holds later client commands until it is done.  Pipelining of pass-through commands is
kept; intercepted commands are serialised.  A FETCH may be answered while its last
messages are still being opened: such a response is written once its message is open,
and everything after it (later commands' answers too) waits behind it in order
(:meth:`ProxySession.send_later`; bounded: the server is not read while more than
``max_held`` octets wait).

An APPEND whose mailbox is a literal is read up to the end of that literal before the
session decides (a Sent folder named by a literal is still encrypted).  A synchronising
literal the server answers with a tagged NO/BAD instead of ``+`` ends that command.

Latency: what one read event produces is written at its end as one write, sent on the
socket at once (:mod:`~smimeproxy.sockets`: no epoll registration round when
nothing is buffered; a read that passes through unchanged is written as it was read,
not joined again), so a pass-through command costs one reactor turn per direction;
both sockets have TCP_NODELAY.

Not guaranteed: a SASL mechanism other than PLAIN is not offered (the proxy must read the
login name).
"""

from __future__ import annotations

import base64
import re
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from smimeproxy.bugs import log_bug
from smimeproxy.errors import MalformedMessage
from smimeproxy.imap import fetch, intercept
from smimeproxy.imap.upstream import (
    UpstreamProtocol,
    capabilities_in,
    rewrite_capability_line,
)
from smimeproxy.imap.wire import (
    Assembler,
    Event,
    Fragment,
    LineTooLong,
    LiteralData,
    LiteralHeader,
    Message,
    Splitter,
    String,
    split_tag,
    tokenize,
)
from smimeproxy.sockets import UPSTREAM_READ, flush, no_delay, read_size, write_now

#: commands whose continuation lines from the client are not commands (RFC 3501 6.2.2,
#: RFC 2177)
RAW_CONTINUATION = frozenset({b"IDLE", b"AUTHENTICATE"})
_EXISTS = re.compile(rb"\* [0-9]+ EXISTS\r?$", re.IGNORECASE)
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY ([0-9]+)\]", re.IGNORECASE)


@dataclass
class Result:
    """A finished proxy-issued command: its status, text and captured untagged responses."""

    status: bytes
    text: bytes
    untagged: list[Message] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == b"OK"


@dataclass
class SessionContext:
    """What every session of one listener shares; all collaborators injected."""

    connect_upstream: Callable[[Protocol], Deferred[Any]]
    run_blocking: Callable[..., Deferred[Any]]
    processor: Any = None  # MessageProcessor | None
    cache: Any = None  # DecryptedCache | None
    tls: Any = None  # an IOpenSSLServerConnectionCreator for STARTTLS, or None
    implicit_tls: bool = False
    plaintext_login: bool = False
    sent_folders: tuple[str, ...] = ("Sent",)
    drafts_folders: tuple[str, ...] = ()
    delegation: Any = field(default_factory=dict)
    max_command: int = 1 << 20
    max_append: int = 64 << 20
    max_line: int = 65536
    upstream_starttls: Callable[[UpstreamProtocol], Deferred[Any]] | None = None
    #: (user, mailbox, UIDVALIDITY) -> which UIDs are S/MIME, most recently used last
    classifications: dict[tuple[str, str, int], Any] = field(default_factory=dict)
    max_classified_mailboxes: int = 10000
    metrics: Any = None  # smimeproxy.imap.metrics.ImapMetrics | None
    #: the open sessions of the service (shared by its listeners: shutdown says BYE)
    sessions: set[Any] = field(default_factory=set)
    #: seconds without a byte from either side before the session is closed with
    #: ``* BYE`` (RFC 9051 5.4 autologout); None: never
    idle_timeout: float | None = None
    #: the reactor's ``callLater`` for the idle timer (None: the global reactor's)
    call_later: Callable[..., Any] | None = None
    #: worker processes that open stored messages (:class:`smimeproxy.workers.
    #: ProcessEngine`); None: they are opened in the thread pool (``run_blocking``)
    engine: Any = None
    #: octets of the server's responses held behind a FETCH response whose message is
    #: still being opened, before the session stops reading the server (it reads
    #: again below half of it)
    max_held: int = 8 << 20


class ProxySession(Protocol, TimeoutMixin):
    """The client-facing protocol; see the module docstring."""

    _log = Logger()

    def __init__(self, context: SessionContext):
        self.ctx = context
        if context.call_later is not None:
            self.callLater = context.call_later  # TimeoutMixin's clock
        self.upstream: UpstreamProtocol | None = None
        self.secure = context.implicit_tls
        self.login: str | None = None
        self.user: Any = None  # keystore User with keys, or None: pass-through
        self.owners: list[str] = []
        self.sent: set[str] = {f.lower() for f in context.sent_folders}
        self.mailbox: str | None = None
        self.uidvalidity: int | None = None
        self.upstream_caps: set[bytes] = set()
        self._client = Splitter(context.max_line)
        self._queue: deque[Event] = deque()
        self._mode: str | None = None  # current client line: forward | collect | skip
        self._collector = Assembler(context.max_command)
        self._collect_tag = b""
        self._append_head = False
        self._busy = True  # until the upstream greeting
        self._outstanding: dict[bytes, tuple[bytes, Any]] = {}
        self._raw_tag: bytes | None = None
        self._barrier = False
        self._pending_intercept: Callable[[], Awaitable[Any]] | None = None
        self._serial = 0
        self._injected: dict[bytes, Deferred[Result]] = {}
        self._captured: list[Message] = []
        #: per proxy-issued command: called with each of its FETCH responses as it
        #: arrives, instead of keeping them for its Result
        self._on_fetch: dict[bytes, Callable[[Message], None]] = {}
        self._continuation: Deferred[bool] | None = None
        self._continuation_tag: bytes | None = None
        self._resp_mode: str | None = None  # forward | capture | rewrite | skip
        self._resp = Assembler(context.max_append + (1 << 20))
        self.rewrite: intercept.FetchRewrite | None = None
        self._greeted = False
        self._closed = False
        self._upstream_lost = False
        self.mailbox_changed = True  # new messages may have arrived since
        self.undecryptable: set[tuple[str, str, int, int]] = set()
        self._lost_waiters: list[Deferred[None]] = []
        self._batch: list[bytes] | None = None
        #: output waiting behind a FETCH response still being rendered (send_later):
        #: everything sent after it waits too, so the client sees the server's order
        self._held: deque[bytes | _Later] | None = None
        self._held_bytes = 0
        self._reading_paused = False
        self._close_when_released = False
        self._server_said_bye = False

    # -- connection lifecycle ----------------------------------------------------------
    def connectionMade(self) -> None:
        self.ctx.sessions.add(self)
        no_delay(self.transport)
        self.setTimeout(self.ctx.idle_timeout)
        if self.ctx.metrics is not None:
            self.ctx.metrics.sessions.inc()
        d = self.ctx.connect_upstream(UpstreamProtocol(self))
        d.addErrback(self._upstream_failed)

    def _upstream_failed(self, failure: Failure) -> None:
        self._log.warn("imap.upstream.connect_failed {error}", error=failure.getErrorMessage())
        self.send(b"* BYE upstream server unavailable\r\n")
        self.close()

    def upstream_connected(self, upstream: UpstreamProtocol) -> None:
        self.upstream = upstream
        no_delay(upstream.transport)
        read_size(upstream.transport, UPSTREAM_READ)
        if self._closed:
            upstream.transport.loseConnection()

    def upstream_lost(self, reason: Failure | None) -> None:
        self._upstream_lost = True
        if self._continuation is not None:
            waiting, self._continuation = self._continuation, None
            waiting.callback(False)
        for d in list(self._injected.values()):
            d.errback(MalformedMessage("upstream connection lost"))
        self._injected.clear()
        self._on_fetch.clear()
        if not self._closed:
            self._log.info("imap.upstream.lost")
            if not self._server_said_bye:  # e.g. after LOGOUT: nothing may follow its OK
                self.send(b"* BYE upstream connection lost\r\n")
            self.close()

    def timeoutConnection(self) -> None:
        """Nothing from the client or the server for ``idle_timeout`` seconds (a client
        in IDLE re-issues it within 29 minutes, RFC 2177; a server that stopped
        answering is caught here too)."""
        self._log.info("imap.session.idle_timeout")
        self.send(b"* BYE autologout; idle for too long\r\n")
        self.close()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.setTimeout(None)
        if self in self.ctx.sessions:
            self.ctx.sessions.discard(self)
            if self.ctx.metrics is not None:
                self.ctx.metrics.sessions.dec()
        waiting, self._lost_waiters = self._lost_waiters, []
        for d in waiting:
            d.callback(None)
        self._closed = True
        self._queue.clear()
        if self.upstream is not None and self.upstream.transport is not None:
            if self._client.in_literal or self._mode == "forward":
                # a half-sent literal must never complete upstream (e.g. APPEND)
                self.upstream.transport.abortConnection()
            else:
                self.upstream.transport.loseConnection()

    def when_lost(self) -> Deferred[None]:
        """Fires once the client connection is gone (at once if it already is)."""
        d: Deferred[None] = Deferred()
        if self not in self.ctx.sessions:
            d.callback(None)
        else:
            self._lost_waiters.append(d)
        return d

    def shut_down(self) -> Deferred[None]:
        """Say ``* BYE`` (RFC 3501 7.1.5) and close both connections; fires when closed."""
        d = self.when_lost()
        self._log.info("imap.session.shutdown")
        self.send(b"* BYE server shutting down\r\n")
        self.close()
        return d

    def close(self) -> None:
        if self._held is not None and not self._closed:
            # responses still being rendered go first (e.g. a FETCH answered while its
            # last message was being opened, then LOGOUT and the server's close)
            self._close_when_released = True
            return
        self._send_batch()
        self._closed = True
        if self.transport is not None:
            self.transport.loseConnection()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.loseConnection()

    def send(self, data: bytes) -> None:
        if not self._closed and self.transport is not None:
            if self._held is not None:
                self._held.append(data)
                self._held_bytes += len(data)
                if self._held_bytes > self.ctx.max_held:
                    # the server's responses wait in its socket, not in our memory
                    self._read_server(False)
            else:
                self._emit(data)

    def _read_server(self, reading: bool) -> None:
        """Stop (or resume) reading the server's responses, once per change."""
        paused = not reading
        if self._reading_paused == paused:
            return
        self._reading_paused = paused
        if self.upstream is not None and self.upstream.transport is not None:
            if reading:
                self.upstream.transport.resumeProducing()
            else:
                self.upstream.transport.pauseProducing()

    def _emit(self, data: bytes) -> None:
        if self._batch is not None:
            self._batch.append(data)
        else:
            write_now(self.transport, data)

    def send_later(self, rendered: Deferred[bytes]) -> None:
        """Send what ``rendered`` gives when it fires (a FETCH response whose decrypted
        message is still being opened); later output waits for it.  ``rendered`` must
        not fail."""
        later = _Later()
        if self._held is None:
            self._held = deque()
        self._held.append(later)

        def ready(data: bytes) -> None:
            later.data = data
            self._release()

        rendered.addCallback(ready)

    def _release(self) -> None:
        """Send the held output up to the first response still being rendered."""
        held = self._held
        out: list[bytes] = []
        while held:
            head = held[0]
            if isinstance(head, _Later):
                if head.data is None:
                    break
                out.append(head.data)
            else:
                out.append(head)
                self._held_bytes -= len(head)
            held.popleft()
        if not held:
            self._held = None
        if out and not self._closed and self.transport is not None:
            self._emit(b"".join(out))  # into the batch of the read in progress, or out now
        if self._held_bytes <= self.ctx.max_held // 2:
            self._read_server(True)
        if self._batch is None and not self._closed and self.transport is not None:
            flush(self.transport)
        if self._held is None and self._close_when_released:
            self._close_when_released = False
            self.close()

    def _send_batch(self) -> None:
        """Write what :meth:`upstream_data` gathered, as one write."""
        batch, self._batch = self._batch, None
        if batch and not self._closed and self.transport is not None:
            write_now(self.transport, batch[0] if len(batch) == 1 else b"".join(batch))

    def send_upstream(self, data: bytes) -> None:
        if self.upstream is not None and not self._upstream_lost:
            self.upstream.write(data)

    # -- client side -------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        self._queue.extend(self._client.feed(data))
        self._drain()
        if self.upstream is not None:
            flush(self.upstream.transport)

    def _drain(self) -> None:
        while self._queue and not self._busy and not self._closed:
            if self._barrier and self._mode is None and self._raw_tag not in self._outstanding:
                break  # wait for the login's outcome (a pipelined APPEND may need it)
            event = self._queue.popleft()
            if self._mode is None:
                self._start_line(event)
            else:
                self._continue_line(event)

    def _start_line(self, event: Event) -> None:
        if isinstance(event, LineTooLong):
            self.send(b"* BAD line too long\r\n")
            return
        if isinstance(event, LiteralData):  # stray (only after a refused literal)
            return
        if self._raw_tag is not None and self._raw_tag in self._outstanding:
            self._observe_raw(event.data)
            self._mode = "forward"
            self._continue_line(event)
            return
        tag, word, rest = split_tag(event.data)
        if not tag or not word or tag in (b"*", b"+"):
            self._mode = "skip"
            self._continue_line(event)
            self.send(b"* BAD command line not understood\r\n")
            return
        mailbox_literal = word == b"APPEND" and self.user is not None and _starts_literal(rest)
        if word == b"APPEND" and not mailbox_literal and not self._append_is_protected(rest):
            self._mode = "forward"
            self._outstanding[tag] = (b"APPEND", None)
            self._continue_line(event)
            return
        self._mode = "collect"
        self._collect_tag = tag
        # a mailbox sent as a literal: read it before deciding (it may be Sent)
        self._append_head = mailbox_literal
        limit = self.ctx.max_append if word == b"APPEND" else self.ctx.max_command
        self._collector = Assembler(limit)
        self._continue_line(event)

    def _continue_line(self, event: Event) -> None:
        mode = self._mode
        ends = (isinstance(event, Fragment) and event.literal is None) or isinstance(
            event, LineTooLong
        )
        if mode == "forward":
            if isinstance(event, (Fragment, LiteralData)):
                self.send_upstream(event.data)
        elif mode == "collect":
            header = event.literal if isinstance(event, Fragment) else None
            if header and not header.nonsync and header.size > self._collector.max_size:
                # refuse before the client sends it (RFC 7889 TOOBIG); no literal follows
                self.send(self._collect_tag + b" NO [TOOBIG] too large for this proxy\r\n")
                self._client.cancel_literal()
                self._collector = Assembler(self.ctx.max_command)
                self._mode = None
                return
            if self._append_head and isinstance(event, Fragment) and not event.first:
                self._append_head = False
                if self._append_decided(event):
                    return
            try:
                message = self._collector.add(event)
            except MalformedMessage:
                self.send(self._collect_tag + b" BAD command too long\r\n")
                self._mode = "skip" if not ends else None
                return
            if isinstance(event, Fragment) and event.literal and not event.literal.nonsync:
                self.send(b"+ Ready for literal data\r\n")
            if message is not None:
                self._mode = None
                self._command(message)
                return
        if ends:
            self._mode = None

    def _append_decided(self, event: Fragment) -> bool:
        """The mailbox literal of an APPEND has arrived: go on collecting (Sent) or
        stream the rest (any other mailbox); True when streaming took over ``event``."""
        head = self._collector.peek()
        if head is None or len(head.literals) != 1:
            return False
        mailbox = head.literals[0]
        if intercept.decode_mailbox(mailbox).lower() in self.sent:
            return False
        first = head.lines[0]
        prefix = first[: len(first) - len(_header_of(first).encode())]  # type: ignore[union-attr]
        if _QUOTABLE_NAME.match(mailbox):
            name = b'"' + mailbox.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        elif b"LITERAL+" in self.upstream_caps:
            name = LiteralHeader(len(mailbox), True).encode() + mailbox
        else:
            return False  # rare: collected whole, forwarded unchanged by the intercept
        self._collector = Assembler(self.ctx.max_command)
        self._mode = "forward"
        self._outstanding[self._collect_tag] = (b"APPEND", None)
        self.send_upstream(prefix + name + event.data)
        if event.literal is None:
            self._mode = None
        return True

    def _observe_raw(self, line: bytes) -> None:
        """SASL PLAIN response sent on its own line (no SASL-IR)."""
        kind, _ = self._outstanding.get(self._raw_tag or b"", (b"", None))
        if kind == b"AUTHENTICATE" and self.login is None:
            self.login = _plain_login(line.strip())

    def _append_is_protected(self, rest: bytes) -> bool:
        if self.user is None:
            return False
        try:
            tokens = tokenize(Message([rest.split(b"{")[0] + b"\r\n"]))
        except MalformedMessage:
            return False
        if not tokens or isinstance(tokens[0], list):
            return False
        return intercept.decode_mailbox(bytes(tokens[0])).lower() in self.sent

    def _command(self, message: Message) -> None:
        tag, word, rest = split_tag(message.lines[0])
        if word == b"UID":
            sub = rest.split(b" ", 1)[0].upper()
            word = b"UID " + sub
        if word == b"STARTTLS":
            self._starttls(tag)
            return
        if word == b"COMPRESS":
            self.send(tag + b" BAD COMPRESS is not available through this proxy\r\n")
            return
        if word in (b"LOGIN", b"AUTHENTICATE"):
            if not self.secure and not self.ctx.plaintext_login:
                self.send(tag + b" NO [PRIVACYREQUIRED] use TLS (STARTTLS) first\r\n")
                return
            self.login = _login_name(word, message)
            if word == b"AUTHENTICATE":
                self._raw_tag = tag
            self._barrier = self.ctx.processor is not None
        if word in RAW_CONTINUATION:
            self._raw_tag = tag
        if word in (b"SELECT", b"EXAMINE"):
            try:
                self.mailbox = intercept.decode_mailbox(bytes(tokenize(message)[2]))
            except (MalformedMessage, IndexError):
                self.mailbox = None
            self.uidvalidity = None
            self.mailbox_changed = True
        if self.user is not None:
            action = intercept.plan(self, tag, word, message)
            if action is intercept.HANDLED:
                return
            if action is not None:
                self._intercept(action)
                return
        self.forward(tag, word, message)

    def can_rewrite_now(self) -> bool:
        """Whether a FETCH rewrite may start in this turn: the session is past its
        greeting and nothing else is in flight (the responses to come are all its own)."""
        return (
            self._greeted
            and not self._outstanding
            and not self._injected
            and self._pending_intercept is None
            and self.rewrite is None
            and not self._busy
        )

    def forward_rewritten(
        self, tag: bytes, word: bytes, message: Message, rewrite: intercept.FetchRewrite
    ) -> None:
        """Forward a FETCH whose responses ``rewrite`` answers; later client commands
        wait until it has completed, as behind an intercept."""
        self._busy = True
        rewrite.done.addBoth(self._unbusy)
        self.rewrite = rewrite
        self.forward(tag, word, message, rewrite.done)

    def forward(self, tag: bytes, word: bytes, message: Message, state: Any = None) -> None:
        """Send a whole client command upstream under its own tag."""
        self._outstanding[tag] = (word, state)
        self._write_message(message)

    def _write_message(self, message: Message) -> None:
        if not message.literals:
            self.send_upstream(message.lines[0])
            return
        nonsync = b"LITERAL+" in self.upstream_caps
        if not nonsync:
            self._busy = True
            d = self._send_sync(message)
            d.addBoth(self._unbusy)
            return
        out = bytearray()
        for i, line in enumerate(message.lines):
            header = _header_of(line)
            if header is not None:
                line = (
                    line[: -len(header.encode())]
                    + LiteralHeader(header.size, True, header.binary).encode()
                )
            out += line
            if i < len(message.literals):
                out += message.literals[i]
        self.send_upstream(bytes(out))

    async def _send_sync_async(self, message: Message) -> None:
        self._continuation_tag = split_tag(message.lines[0])[0]
        try:
            for i, line in enumerate(message.lines):
                self.send_upstream(line)
                if i < len(message.literals):
                    self._continuation = Deferred()
                    if not await self._continuation:
                        return  # refused (tagged NO/BAD) or the server went away
                    self.send_upstream(message.literals[i])
        finally:
            self._continuation = None
            self._continuation_tag = None

    def _send_sync(self, message: Message) -> Deferred[None]:
        return Deferred.fromCoroutine(self._send_sync_async(message))

    def _unbusy(self, result: object = None) -> object:
        self._busy = False
        self._drain()
        return None if isinstance(result, Failure) else result

    def _intercept(self, action: Callable[[], Awaitable[Any]]) -> None:
        self._busy = True
        self._pending_intercept = action
        self._maybe_start_intercept()

    def _maybe_start_intercept(self) -> None:
        if self._pending_intercept is None or self._outstanding or not self._greeted:
            return
        action, self._pending_intercept = self._pending_intercept, None
        d: Deferred[Any] = ensureDeferred(action())  # type: ignore[arg-type]
        d.addErrback(self._intercept_failed)
        d.addBoth(self._unbusy)

    def _intercept_failed(self, failure: Failure) -> None:
        log_bug(self._log, "imap.intercept.failed", failure)
        if not self._closed:
            self.send(b"* BYE internal error in proxy\r\n")
            self.close()

    def _starttls(self, tag: bytes) -> None:
        if self.secure or self.ctx.tls is None:
            self.send(tag + b" BAD STARTTLS not available\r\n")
            return
        self.send(tag + b" OK Begin TLS negotiation now\r\n")
        self._queue.clear()
        self._client = Splitter(self.ctx.max_line)
        self.transport.startTLS(self.ctx.tls)
        self.secure = True

    # -- proxy-issued commands ---------------------------------------------------------
    def command(
        self,
        text: bytes,
        literals: tuple[bytes, ...] = (),
        on_fetch: Callable[[Message], None] | None = None,
    ) -> Deferred[Result]:
        """Run one command of the proxy's own upstream (``text`` without tag; literal
        headers in it must match ``literals``).  With ``on_fetch``, each FETCH response
        is handed over as it arrives (so work on the first can start while the server
        still sends the rest) and the :class:`Result` holds none; commands pipelined
        together must then share one ``on_fetch``, since the server may interleave
        their responses."""
        self._serial += 1
        tag = b"smp%d" % self._serial
        d: Deferred[Result] = Deferred()
        if self._upstream_lost:
            d.errback(MalformedMessage("upstream connection lost"))
            return d
        self._injected[tag] = d
        if on_fetch is not None:
            self._on_fetch[tag] = on_fetch
        parts = (tag + b" " + text).split(b"\r\n")
        self._write_message(Message([p + b"\r\n" for p in parts if p], list(literals)))
        return d

    # -- server side -------------------------------------------------------------------
    def restart_upstream_parser(self) -> None:
        """Start parsing the server afresh (after STARTTLS)."""
        self._server = Splitter(1 << 20)

    def upstream_data(self, data: bytes) -> None:
        self.resetTimeout()
        # what one read of the server produces for the client leaves as one write
        self._batch = batch = []
        splitter = self._upstream_split()
        whole = not splitter.line_pending  # the events will cover exactly ``data``
        events = splitter.feed(data)
        whole = whole and not splitter.line_pending
        try:
            for event in events:
                self._server_event(event)
        finally:
            if whole and _verbatim(batch, events):
                batch[:] = [data]  # all of it passed through unchanged: no join, no copy
            self._send_batch()
        flush(self.transport)

    def _upstream_split(self) -> Splitter:
        if not hasattr(self, "_server"):
            self._server = Splitter(1 << 20)
        return self._server

    def _server_event(self, event: Event) -> None:
        if isinstance(event, LineTooLong):
            self._resp_mode = None
            return
        if self._resp_mode is None:
            if isinstance(event, Fragment):
                self._server_line(event)
            return
        if self._resp_mode == "forward":
            self.send(event.data)
        elif self._resp_mode in ("capture", "rewrite"):
            try:
                message = self._resp.add(event)
            except MalformedMessage:
                self._resp_mode = "skip"
                message = None
            if message is not None:
                self._server_message(message)
        if isinstance(event, Fragment) and event.literal is None:
            self._resp_mode = None

    def _server_line(self, event: Fragment) -> None:
        line = event.data
        if line.startswith(b"+"):
            if self._continuation is not None:
                d, self._continuation = self._continuation, None
                d.callback(True)
                return
            self._resp_mode = "forward"
            self._server_event(event)
            return
        if not line.startswith(b"* "):
            self._tagged(line)
            return
        head = line[:64].upper()
        if head.startswith(b"* BYE"):
            self._server_said_bye = True  # the client has its reason for the close
        caps = None
        if b"CAPABILITY" in head and event.literal is None:
            caps = capabilities_in(line)
        if caps is not None:
            self.upstream_caps = set(caps)
        if not self._greeted:
            self._greeting(line)
            return
        if self._injected or (self.rewrite is not None and self.rewrite.wants(line)):
            self._resp_mode = "capture" if self._injected else "rewrite"
            self._server_event(event)
            return
        if b" FETCH " not in head:
            self._observe(line)
            if self.rewrite is not None:
                self.rewrite.observe(line)
        if caps is not None:
            event = Fragment(self._caps(line), True, None)
        if event.literal is None:  # the whole response in one line: no mode to carry
            self.send(event.data)
            return
        self._resp_mode = "forward"
        self._server_event(event)

    def _caps(self, line: bytes) -> bytes:
        return rewrite_capability_line(
            line,
            starttls=self.ctx.tls is not None and not self.secure,
            logindisabled=not self.secure and not self.ctx.plaintext_login,
        )

    def _greeting(self, line: bytes) -> None:
        self._greeted = True
        if self.ctx.upstream_starttls is not None and self.upstream is not None:
            d = self.ctx.upstream_starttls(self.upstream)
            d.addCallbacks(lambda _: self._greeted_ready(line), self._upstream_failed)
            return
        self._greeted_ready(line)

    def _greeted_ready(self, line: bytes) -> None:
        if self.ctx.upstream_starttls is not None and self.upstream_caps:
            caps = b" ".join(sorted(self.upstream_caps))
            line = b"* OK [CAPABILITY " + caps + b"] smimeproxy ready\r\n"
        self.send(self._caps(line))
        self._unbusy()

    def _server_message(self, message: Message) -> None:
        mode = self._resp_mode
        if mode == "rewrite" and self.rewrite is not None:
            rendered = self.rewrite.render(message)
            if isinstance(rendered, bytes):
                self.send(rendered)
            else:
                self.send_later(rendered)
            return
        head = message.lines[0]
        if re.match(rb"\* [0-9]+ FETCH ", head, re.IGNORECASE) and not _flags_update(message):
            # (a server may interleave the responses of pipelined commands: the hook
            # of the oldest one outstanding gets them, and sorts them out by UID)
            hook = self._on_fetch.get(next(iter(self._injected), b""))
            if hook is not None:
                hook(message)
            else:
                self._captured.append(message)
            return
        if self._injected and re.match(rb"\* (LIST|SEARCH|ESEARCH|CAPABILITY)\b", head, re.I):
            self._captured.append(message)
            return
        self._observe(head)
        self.send(message.encode())

    def _observe(self, line: bytes) -> None:
        """State the proxy keeps from untagged responses: UIDVALIDITY, new mail."""
        if _EXISTS.match(line):
            self.mailbox_changed = True
            return
        validity = _UIDVALIDITY.search(line)
        if validity:
            self.uidvalidity = int(validity.group(1))
            self.mailbox_changed = True

    def classification(self) -> intercept.Classification:
        """The shared S/MIME classification of the selected mailbox (bounded LRU)."""
        key = (self.user.address if self.user else "", self.mailbox or "", self.uidvalidity or 0)
        table = self.ctx.classifications
        found = table.pop(key, None) or intercept.Classification()
        table[key] = found
        while len(table) > self.ctx.max_classified_mailboxes:
            table.pop(next(iter(table)))
        return found

    def _tagged(self, line: bytes) -> None:
        tag, status, text = split_tag(line)
        if self._continuation is not None and tag == self._continuation_tag:
            # the server answered instead of asking for the literal: send no more of it
            waiting, self._continuation = self._continuation, None
            waiting.callback(False)
        if tag in self._injected:
            d = self._injected.pop(tag)
            self._on_fetch.pop(tag, None)
            captured, self._captured = self._captured, []
            d.callback(Result(status, text, captured))
            return
        word, state = self._outstanding.pop(tag, (b"", None))
        if word == b"APPEND" and self._mode == "forward" and self._client.literal_untouched:
            # the server refused a synchronising literal: the client will not send it
            self._client.cancel_literal()
            self._mode = None
        if tag == self._raw_tag:
            self._raw_tag = None
        caps = capabilities_in(line)
        if caps is not None:
            self.upstream_caps = set(caps)
        if word in (b"FETCH", b"UID FETCH") and self.rewrite is not None:
            if self.rewrite.failures and status == b"OK":
                line = tag + b" " + self.rewrite.failures[0] + b"\r\n"
            self.rewrite = None
        self.send(self._caps(line) if caps is not None else line)
        if isinstance(state, Deferred):
            state.callback(None)
        if word in (b"LOGIN", b"AUTHENTICATE"):
            self._barrier = False
            if status == b"OK" and self.login:
                self._intercept(lambda: intercept.after_login(self))
            else:
                self.login = None
                self._drain()
        self._maybe_start_intercept()


class _Later:
    """A place in the held output for a response being rendered (``data`` once done)."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data: bytes | None = None


def _flags_update(message: Message) -> bool:
    """Whether a FETCH response that arrives during the proxy's own commands carries
    FLAGS: none of them asks for FLAGS, so it is the server telling the client about a
    change (RFC 9051 7.5.2, e.g. another session's STORE), which goes to the client
    instead of being taken for an answer.  Such an update never carries a literal."""
    if message.literals:
        return False
    try:
        _seq, pairs = fetch.fetch_items(message.lines[0])
    except MalformedMessage:
        return False
    return any(name.upper() == b"FLAGS" for name, _value in pairs)


def _verbatim(out: list[bytes], events: list[Event]) -> bool:
    """Whether ``out`` is the events' own octets, each passed on unchanged, in order."""
    if len(out) != len(events) or len(out) < 2:
        return False
    pairs = zip(out, events, strict=True)
    return all(piece is getattr(event, "data", None) for piece, event in pairs)


_QUOTABLE_NAME = re.compile(rb"[\x20-\x7e]{0,1000}\Z")


def _starts_literal(rest: bytes) -> bool:
    """Whether the first argument of a command is a literal (``{n}`` or ``~{n}``)."""
    return rest[:1] == b"{" or rest[:2] == b"~{"


def _header_of(line: bytes) -> LiteralHeader | None:
    from smimeproxy.imap.wire import literal_header

    return literal_header(line)


def _plain_login(b64: bytes) -> str | None:
    """The login name in a SASL PLAIN response (RFC 4616): authzid, else authcid."""
    try:
        raw = base64.b64decode(b64, validate=True)
        authz, authc, _password = raw.split(b"\x00", 2)
        return (authz or authc).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None


def _login_name(word: bytes, message: Message) -> str | None:
    try:
        tokens = tokenize(message)
    except MalformedMessage:
        return None
    if word == b"LOGIN" and len(tokens) >= 3:
        try:
            return bytes(tokens[2]).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if word == b"AUTHENTICATE" and len(tokens) >= 4 and isinstance(tokens[3], bytes):
        if bytes(tokens[2]).upper() == b"PLAIN" and not isinstance(tokens[3], String):
            return _plain_login(bytes(tokens[3]))
    return None
