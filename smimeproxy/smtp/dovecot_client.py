"""A thin Twisted client for Dovecot's auth service, over :mod:`.dovecot_auth`.

One connection to the ``auth-client`` socket is shared by every SMTP session: requests
are told apart by number. The connection is made when the first request comes and made
again by the first request after it dropped (Dovecot restarted, say); requests waiting
on a connection that drops, a connection that cannot be made, and a request Dovecot does
not answer within ``timeout`` seconds all end in a *temporary* :class:`Refusal`
(``code="unavailable"``): the SMTP session answers 454 and the client may try later.
Nothing here raises to the caller.

Not guaranteed: that a request cancelled with :meth:`DovecotAuthClient.cancel` was not
already granted by Dovecot (the answer is then ignored); ordering between requests.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from smimeproxy.smtp.dovecot_auth import (
    AuthClientCodec,
    AuthProtocolError,
    Challenge,
    Ready,
    Refusal,
    Success,
)

Step = Challenge | Success | Refusal

#: seconds Dovecot has to answer one step (it delays failures by 2 s itself)
DEFAULT_TIMEOUT = 30.0


def unavailable(request: int) -> Refusal:
    """The answer when Dovecot cannot be asked (454 4.7.0 for the SMTP client)."""
    return Refusal(request, None, True, None, "unavailable")


class _AuthProtocol(Protocol):
    def __init__(self, client: DovecotAuthClient):
        self.client = client
        self.codec = AuthClientCodec(client.pid)

    def connectionMade(self) -> None:
        self.client._made(self)
        self.transport.write(self.codec.hello())

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.codec.receive(data)
        except AuthProtocolError as e:
            self.client._log.error("smtp.auth_protocol_error error={error}", error=str(e))
            self.transport.abortConnection()
            return
        for event in events:
            if isinstance(event, Ready):
                self.client._ready(self, event)
            else:
                self.client._answer(self, event)

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.client._lost(self)


@dataclass
class _Request:
    id: int
    waiting: defer.Deferred[Step] | None = None
    timer: Any = None
    protocol: _AuthProtocol | None = None  # the connection that carries it
    queued: list[bytes] = field(default_factory=list)


class DovecotAuthClient:
    """Authenticates SASL exchanges with Dovecot; see the module docstring."""

    _log = Logger()

    def __init__(
        self,
        endpoint: Callable[[], IStreamClientEndpoint],
        reactor: Any,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        pid: int | None = None,
    ):
        self.endpoint = endpoint
        self.reactor = reactor
        self.timeout = timeout
        self.pid = pid if pid is not None else os.getpid()
        self._protocol: _AuthProtocol | None = None  # connected and handshake done
        self._connecting: _AuthProtocol | None = None
        self._pending_connect = False
        self._requests: dict[int, _Request] = {}
        self._last_id = 0
        self.mechanisms: tuple[str, ...] = ()
        self.closed = False

    # -- the API ------------------------------------------------------------------------------
    def start(
        self,
        mechanism: str,
        *,
        secured: bool,
        initial: str | None = None,
        fields: Mapping[str, str] | None = None,
        service: str = "smtp",
    ) -> tuple[int, defer.Deferred[Step]]:
        """Begin an exchange; returns its request number and the first answer."""
        request = self._new_id()
        line = AuthClientCodec(self.pid).start(
            request, mechanism, service=service, secured=secured, initial=initial, fields=fields
        )
        return request, self._send(_Request(request), line)

    def respond(self, request: int, data: str) -> defer.Deferred[Step]:
        """Send the client's answer to a :class:`Challenge` of ``request``."""
        pending = self._requests.get(request)
        if pending is None or pending.waiting is not None or pending.protocol is None:
            # the connection that knew this request is gone: start again later
            self._requests.pop(request, None)
            return defer.succeed(unavailable(request))
        return self._send(pending, pending.protocol.codec.respond(request, data))

    def cancel(self, request: int) -> None:
        """Forget ``request`` (the SMTP client aborted or went away); tells Dovecot."""
        pending = self._requests.pop(request, None)
        if pending is None:
            return
        self._stop_timer(pending)
        protocol = pending.protocol
        if protocol is not None and protocol is self._protocol:
            protocol.transport.write(protocol.codec.cancel(request))
        if pending.waiting is not None:
            d, pending.waiting = pending.waiting, None
            d.callback(unavailable(request))

    def close(self) -> None:
        """Drop the connection (the gateway stops); open requests end as unavailable."""
        self.closed = True
        for protocol in (self._protocol, self._connecting):
            if protocol is not None and protocol.transport is not None:
                protocol.transport.loseConnection()
        self._fail_all(lambda r: True)

    # -- the connection -----------------------------------------------------------------------
    def _new_id(self) -> int:
        self._last_id = self._last_id % (2**32 - 1) + 1
        while self._last_id in self._requests:
            self._last_id = self._last_id % (2**32 - 1) + 1
        return self._last_id

    def _send(self, pending: _Request, line: bytes) -> defer.Deferred[Step]:
        d: defer.Deferred[Step] = defer.Deferred()
        pending.waiting = d
        self._requests[pending.id] = pending
        pending.timer = self.reactor.callLater(self.timeout, self._expire, pending.id)
        if self._protocol is not None:
            pending.protocol = self._protocol
            self._protocol.transport.write(line)
        else:
            pending.queued.append(line)
            self._connect()
        return d

    def _connect(self) -> None:
        if self._pending_connect or self._connecting is not None or self.closed:
            return
        self._pending_connect = True
        try:
            d = self.endpoint().connect(Factory.forProtocol(lambda: _AuthProtocol(self)))
        except Exception:
            d = defer.fail()

        def failed(f: Failure) -> None:
            self._pending_connect = False
            self._log.warn("smtp.auth_unavailable error={error}", error=f.getErrorMessage())
            self._fail_all(lambda r: r.protocol is None)

        d.addErrback(failed)

    def _made(self, protocol: _AuthProtocol) -> None:
        # registered here, not when connect()'s Deferred fires: the server's handshake
        # may come at once, in the same call
        self._pending_connect = False
        self._connecting = protocol

    def _ready(self, protocol: _AuthProtocol, event: Ready) -> None:
        if protocol is not self._connecting:
            return
        self._connecting = None
        self._protocol = protocol
        self.mechanisms = event.mechanisms
        for pending in list(self._requests.values()):
            if pending.protocol is None and pending.queued:
                pending.protocol = protocol
                protocol.transport.write(b"".join(pending.queued))
                pending.queued.clear()

    def _answer(self, protocol: _AuthProtocol, step: Step) -> None:
        pending = self._requests.get(step.request)
        if pending is None or pending.protocol is not protocol or pending.waiting is None:
            return  # cancelled or timed out meanwhile
        self._stop_timer(pending)
        if not isinstance(step, Challenge):
            del self._requests[step.request]
        d, pending.waiting = pending.waiting, None
        d.callback(step)

    def _lost(self, protocol: _AuthProtocol) -> None:
        if protocol is self._protocol:
            self._protocol = None
            self._log.warn("smtp.auth_connection_lost")
        handshaking = protocol is self._connecting
        if handshaking:
            self._connecting = None
        self._fail_all(lambda r: r.protocol is protocol or (handshaking and r.protocol is None))

    def _fail_all(self, which: Callable[[_Request], bool]) -> None:
        for pending in [r for r in self._requests.values() if which(r)]:
            self._requests.pop(pending.id, None)
            self._stop_timer(pending)
            if pending.waiting is not None:
                d, pending.waiting = pending.waiting, None
                d.callback(unavailable(pending.id))

    def _expire(self, request: int) -> None:
        pending = self._requests.get(request)
        if pending is None:
            return
        pending.timer = None
        self._log.warn("smtp.auth_timeout request={request}", request=request)
        if pending.protocol is None and self._connecting is not None:
            # connected but no handshake: drop it, so the next request connects afresh
            self._connecting.transport.abortConnection()
        self.cancel(request)

    @staticmethod
    def _stop_timer(pending: _Request) -> None:
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        pending.timer = None


__all__ = ["DEFAULT_TIMEOUT", "DovecotAuthClient", "Step", "unavailable"]
