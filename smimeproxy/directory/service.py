"""The directory face as one Twisted service: DNS (UDP and TCP), HTTP, LDAP and push.

``make_service(config, store)`` wires the listeners of ``[directory]`` to one
:class:`~smimeproxy.directory.publication.LivePublication`; the thread pool that runs
the store's blocking calls is injected or, when absent, created and started/stopped
with the service. Lookup (outbound) is not a server: see
:func:`smimeproxy.directory.lookup.lookup_from_config`.
"""

from __future__ import annotations

from typing import Any

from twisted.application import internet, service
from twisted.internet.endpoints import serverFromString
from twisted.python.threadpool import ThreadPool

from smimeproxy.config import Config, parse_endpoint
from smimeproxy.directory.dns import (
    DNSDatagramServer,
    DNSStreamServerFactory,
    SMIMEAAuthority,
    SMIMEAResponder,
)
from smimeproxy.directory.http import make_site
from smimeproxy.directory.publication import LivePublication, Publication
from smimeproxy.errors import ConfigError
from smimeproxy.keystore import SyncStore
from smimeproxy.metrics import Registry
from smimeproxy.threads import ThreadPoolService

__all__ = ["ThreadPoolService", "make_service"]


def make_service(
    config: Config,
    store: SyncStore,
    reactor: Any = None,
    threadpool: ThreadPool | None = None,
    *,
    nameserver: str | None = None,
    registry: Registry | None = None,
) -> service.IService:
    """Every directory listener of ``config`` as one MultiService (empty lists: off).

    ``udp:PORT[:interface=ADDR]`` listens for DNS over UDP; ``tcp:`` DNS endpoints
    carry DNS over TCP. ``[directory.push]`` adds the RFC 2136 pusher.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    settings = config.directory
    if settings is None:
        raise ConfigError("the [directory] section is absent", path=str(config.path))
    top = service.MultiService()
    if threadpool is None:
        threadpool = ThreadPool(minthreads=1, maxthreads=4, name="smimeproxy-directory")
        ThreadPoolService(threadpool).setServiceParent(top)
    publication = Publication(store, settings.domains)
    live = LivePublication(publication, reactor, threadpool)
    authority = SMIMEAAuthority(
        live,
        settings.domains,
        ttl=settings.ttl,
        usage=settings.smimea_usage,
        selector=settings.smimea_selector,
        matching_type=settings.smimea_matching_type,
        nameserver=nameserver,
    )
    responder = SMIMEAResponder(authority, registry)
    for description in settings.dns_listen:
        endpoint = parse_endpoint(description, "dns")
        if endpoint.type == "udp":
            udp = internet.UDPServer(
                int(endpoint.params["port"]),
                DNSDatagramServer(responder),
                interface=endpoint.params.get("interface", ""),
                maxPacketSize=65535,
                reactor=reactor,
            )
            udp.setServiceParent(top)
        else:
            internet.StreamServerEndpointService(
                serverFromString(reactor, description), DNSStreamServerFactory(responder, reactor)
            ).setServiceParent(top)
    if settings.http_listen:
        site = make_site(live)
        for description in settings.http_listen:
            internet.StreamServerEndpointService(
                serverFromString(reactor, description), site
            ).setServiceParent(top)
    if settings.ldap_listen:
        from smimeproxy.directory.ldap import CertificateLDAPFactory

        ldap = CertificateLDAPFactory(live)
        for description in settings.ldap_listen:
            internet.StreamServerEndpointService(
                serverFromString(reactor, description), ldap
            ).setServiceParent(top)
    if settings.push is not None:
        from smimeproxy.directory.push import PushService, pusher_from_config

        PushService(
            pusher_from_config(settings, publication), reactor, threadpool
        ).setServiceParent(top)
    return top  # type: ignore[return-value]  # MultiService implements IService
