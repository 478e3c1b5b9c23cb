"""The IMAP proxy face (issue 5): transparent pass-through, decryption on FETCH, Sent
encryption on APPEND.  :func:`make_service` builds it from the ``[imap]`` config section.

Modules: ``wire`` (sans-I/O codec), ``upstream`` (server link, capabilities), ``session``
(the client connection and routing), ``intercept``/``fetch``/``search`` (where content is
touched), the pure content layer ``views``/``cache``, and ``metrics``.

The service (:class:`ImapService`) says ``* BYE`` to every open session when it stops,
and its ``reload(config)`` gives sessions opened afterwards the new TLS certificate
(STARTTLS ``tls_certificate``/``tls_key``, and the files an ``ssl:`` listener names, read
again), Sent/Drafts folders, delegation, plaintext-login setting and idle timeout.  Not
reloaded: listen endpoints themselves (an ``ssl:`` listener keeps its file names as it
was started with), the upstream address and its TLS, the cache size (a restart is
needed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import clientFromString, connectProtocol, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from smimeproxy.imap.metrics import ImapMetrics
from smimeproxy.imap.session import ProxySession, SessionContext
from smimeproxy.imap.tls import (
    ReloadableServerTLS,
    client_tls_options,
    implicit_tls_listener,
    server_tls_options,
    upstream_starttls,
)

__all__ = [
    "ImapService",
    "ProxyFactory",
    "ProxySession",
    "SessionContext",
    "make_context",
    "make_service",
]

#: how long stopping waits for clients to go after ``* BYE`` before cutting them off
SHUTDOWN_GRACE = 5.0


def _new_cache(max_bytes: int) -> Any:
    try:
        from smimeproxy.imap.cache import DecryptedCache
    except ImportError:  # the content layer's cache is not there: decrypt every time
        return None
    return DecryptedCache(max_bytes)


class ProxyFactory(Factory):
    """One :class:`ProxySession` per client connection, all sharing ``context``."""

    def __init__(self, context: SessionContext):
        self.context = context

    def buildProtocol(self, addr: Any) -> ProxySession:
        return ProxySession(self.context)


def make_context(
    imap: Any,
    *,
    processor: Any = None,
    cache: Any = None,
    reactor: Any = None,
    threadpool: Any = None,
    connect_upstream: Callable[[Protocol], Deferred[Any]] | None = None,
    implicit_tls: bool = False,
    metrics: ImapMetrics | None = None,
    sessions: set[Any] | None = None,
    engine: Any = None,
) -> SessionContext:
    """The shared session context for one listener of the ``[imap]`` config ``imap``."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    if cache is None and processor is not None:
        cache = _new_cache(imap.cache_bytes)
    upstream_ssl = imap.upstream.split(":", 1)[0] in ("ssl", "tls")
    if connect_upstream is None:
        endpoint = clientFromString(reactor, imap.upstream)

        def connect_upstream(protocol: Protocol) -> Deferred[Any]:
            return connectProtocol(endpoint, protocol)

    starttls = None
    if not upstream_ssl and imap.upstream_tls in ("starttls", "opportunistic"):
        options = client_tls_options(imap)
        starttls = upstream_starttls(options, required=imap.upstream_tls == "starttls")

    def run_blocking(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        pool = threadpool if threadpool is not None else reactor.getThreadPool()
        return deferToThreadPool(reactor, pool, f, *args, **kwargs)

    return SessionContext(
        connect_upstream=connect_upstream,
        run_blocking=run_blocking,
        processor=processor,
        cache=cache,
        tls=server_tls_options(imap),
        implicit_tls=implicit_tls,
        plaintext_login=imap.plaintext_login,
        sent_folders=tuple(imap.sent_folders),
        drafts_folders=tuple(imap.drafts_folders) if imap.encrypt_drafts else (),
        delegation=dict(imap.delegation),
        upstream_starttls=starttls,
        metrics=metrics,
        sessions=sessions if sessions is not None else set(),
        idle_timeout=imap.idle_timeout,
        call_later=getattr(reactor, "callLater", None),
        engine=engine,
    )


def reloaded_context(context: SessionContext, imap: Any) -> SessionContext:
    """``context`` with what a reload may change taken from the ``[imap]`` config
    ``imap``; sessions, cache, classifications and upstream stay shared."""
    return dataclasses.replace(
        context,
        tls=server_tls_options(imap),
        plaintext_login=imap.plaintext_login,
        sent_folders=tuple(imap.sent_folders),
        drafts_folders=tuple(imap.drafts_folders) if imap.encrypt_drafts else (),
        delegation=dict(imap.delegation),
        idle_timeout=imap.idle_timeout,
    )


class ImapService(MultiService):
    """The listeners of the ``[imap]`` section; see the package docstring for stop and
    reload."""

    _log = Logger()

    def __init__(self, reactor: Any, metrics: ImapMetrics, sessions: set[Any], engine: Any = None):
        super().__init__()
        self.reactor = reactor
        self.metrics = metrics
        self.sessions = sessions
        #: the worker processes opening stored messages (``[imap] workers``), or None
        self.engine = engine
        self.factories: list[ProxyFactory] = []
        #: per listener: its listen string and, for ``ssl:``, its replaceable TLS
        self.listeners: list[tuple[str, ReloadableServerTLS | None]] = []

    def stopService(self) -> Deferred[Any]:
        """Stop listening, then ``* BYE`` every open session; fires once all are closed
        (those still open after :data:`SHUTDOWN_GRACE` seconds are aborted)."""
        stopped = maybeDeferred(super().stopService)
        closing = [session.shut_down() for session in list(self.sessions)]
        self._log.info("imap.service.stopping {sessions}", sessions=len(closing))
        timer = None
        if closing:

            def abort() -> None:
                for session in list(self.sessions):
                    if session.transport is not None:
                        session.transport.abortConnection()

            timer = self.reactor.callLater(SHUTDOWN_GRACE, abort)
        done = DeferredList([stopped, *closing], consumeErrors=True)

        def finished(result: Any) -> None:
            if timer is not None and timer.active():
                timer.cancel()

        done.addCallback(finished)
        if self.engine is not None:
            done.addCallback(lambda _: self.engine.close())
        return done

    def startService(self) -> None:
        super().startService()
        if self.engine is not None:
            self.engine.start()

    def reload(self, config: Any) -> None:
        """New sessions get the TLS contexts and folder settings of ``config.imap``."""
        if config.imap is None:
            return
        # all or nothing: a TLS file that does not load leaves every listener as it was
        contexts = [reloaded_context(f.context, config.imap) for f in self.factories]
        implicit = [
            (tls, implicit_tls_listener(listen)[1])
            for listen, tls in self.listeners
            if tls is not None
        ]
        for factory, context in zip(self.factories, contexts, strict=True):
            factory.context = context
        for tls, options in implicit:
            tls.options = options
        if self.engine is not None:
            self.engine.reload(config)  # worker processes build this configuration
        self._log.info("imap.service.reloaded")


def make_service(
    config: Any,
    processor: Any = None,
    *,
    cache: Any = None,
    reactor: Any = None,
    threadpool: Any = None,
    connect_upstream: Callable[[Protocol], Deferred[Any]] | None = None,
    registry: Any = None,
    engine: Any = None,
) -> ImapService:
    """An :class:`ImapService` with one StreamServerEndpointService per ``[imap] listen``
    entry.

    ``processor`` is a :class:`~smimeproxy.processing.MessageProcessor`; without one every
    session is a plain pass-through.  One cache (bounded by ``cache_bytes``) serves all
    listeners.  ``registry`` (a :class:`smimeproxy.metrics.Registry`, default a private
    one) receives the ``smimeproxy_imap_*`` metrics.  ``engine`` opens stored messages
    in worker processes; by default ``[imap] workers`` of them (none when 0).
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    imap = config.imap
    if cache is None and processor is not None:
        cache = _new_cache(imap.cache_bytes)
    metrics = ImapMetrics(registry)
    sessions: set[Any] = set()
    if engine is None and processor is not None and imap.workers > 0:
        from smimeproxy.processing import master_secret
        from smimeproxy.workers import ProcessEngine, WorkerSpec

        spec = WorkerSpec(str(config.path), master_secret(config.keystore), config.document)
        engine = ProcessEngine(spec, imap.workers, reactor, registry, face="imap")
    service = ImapService(reactor, metrics, sessions, engine)
    service.setName("imap")
    for listen in imap.listen:
        original = listen
        implicit = listen.split(":", 1)[0] in ("ssl", "tls")
        tls = None
        if listen.split(":", 1)[0] == "ssl":
            # TCP wrapped in TLS here (not Twisted's ssl: endpoint) so reload can swap it
            listen, options = implicit_tls_listener(listen)
            tls = ReloadableServerTLS(options)
        context = make_context(
            imap,
            processor=processor,
            cache=cache,
            reactor=reactor,
            threadpool=threadpool,
            connect_upstream=connect_upstream,
            implicit_tls=implicit,
            metrics=metrics,
            sessions=sessions,
            engine=engine,
        )
        endpoint = serverFromString(reactor, listen)
        factory = ProxyFactory(context)
        service.factories.append(factory)
        service.listeners.append((original, tls))
        served: Factory = factory
        if tls is not None:
            served = TLSMemoryBIOFactory(tls, False, factory)
        child = StreamServerEndpointService(endpoint, served)
        child.setServiceParent(service)
    return service
