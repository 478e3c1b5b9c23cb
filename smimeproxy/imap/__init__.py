"""The IMAP proxy face (issue 5): transparent pass-through, decryption on FETCH, Sent
encryption on APPEND.  :func:`make_service` builds it from the ``[imap]`` config section.

Modules: ``wire`` (sans-I/O codec), ``upstream`` (server link, capabilities), ``session``
(the client connection and routing), ``intercept``/``fetch``/``search`` (where content is
touched), and the pure content layer ``views``/``cache``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, connectProtocol, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThreadPool

from smimeproxy.imap.session import ProxySession, SessionContext
from smimeproxy.imap.tls import client_tls_options, server_tls_options, upstream_starttls

__all__ = ["ProxyFactory", "ProxySession", "SessionContext", "make_context", "make_service"]


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
    )


def make_service(
    config: Any,
    processor: Any = None,
    *,
    cache: Any = None,
    reactor: Any = None,
    threadpool: Any = None,
    connect_upstream: Callable[[Protocol], Deferred[Any]] | None = None,
) -> IService:
    """A MultiService with one StreamServerEndpointService per ``[imap] listen`` entry.

    ``processor`` is a :class:`~smimeproxy.processing.MessageProcessor`; without one every
    session is a plain pass-through.  One cache (bounded by ``cache_bytes``) serves all
    listeners.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    imap = config.imap
    if cache is None and processor is not None:
        cache = _new_cache(imap.cache_bytes)
    service = MultiService()
    service.setName("imap")
    for listen in imap.listen:
        implicit = listen.split(":", 1)[0] in ("ssl", "tls")
        context = make_context(
            imap,
            processor=processor,
            cache=cache,
            reactor=reactor,
            threadpool=threadpool,
            connect_upstream=connect_upstream,
            implicit_tls=implicit,
        )
        endpoint = serverFromString(reactor, listen)
        child = StreamServerEndpointService(endpoint, ProxyFactory(context))
        child.setServiceParent(service)
    return service
