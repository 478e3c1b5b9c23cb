"""One MultiService from the configuration: the key store, a thread pool, every face.

Assembly only: each face builds its own service from the config and the collaborators
handed to it here (reactor, thread pool, key store, message processor, metrics). A face
is imported only when its section is present, so a node that runs only the gateway
never loads the IMAP proxy.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.server import Site

from smimeproxy.config import Config
from smimeproxy.keystore import SyncStore
from smimeproxy.metrics import MetricsResource, Registry
from smimeproxy.processing import MessageProcessor, open_configured_store


class ThreadPoolService(Service):
    """Starts the pool with the application and joins it on shutdown, so blocking work
    (CMS, database) never runs on the reactor."""

    _log = Logger()

    def __init__(self, pool: ThreadPool):
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


def metrics_service(config: Config, registry: Registry, reactor: Any) -> MultiService:
    service = MultiService()
    service.setName("metrics")
    assert config.metrics is not None
    site = Site(MetricsResource(registry))
    for description in config.metrics.listen:
        StreamServerEndpointService(serverFromString(reactor, description), site).setServiceParent(
            service
        )
    return service


def make_service(
    config: Config,
    *,
    reactor: Any = None,
    store: SyncStore | None = None,
    registry: Registry | None = None,
) -> IService:
    """Everything ``config`` enables, in one MultiService."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    root = MultiService()
    store = store or open_configured_store(config)
    registry = registry or Registry()
    pool = ThreadPool(minthreads=2, maxthreads=16, name="smimeproxy")
    ThreadPoolService(pool).setServiceParent(root)
    lookup = None
    if config.directory is not None and config.directory.lookup is not None:
        from smimeproxy.directory.lookup import lookup_from_config

        lookup = lookup_from_config(config.directory.lookup, store)
    processor = MessageProcessor(store, config.smime, lookup=lookup)
    root.store = store  # type: ignore[attr-defined]
    root.processor = processor  # type: ignore[attr-defined]
    if config.smtp is not None:
        from smimeproxy.smtp.service import make_service as smtp_service

        _named(smtp_service(config, processor, reactor, pool), "smtp").setServiceParent(root)
    if config.imap is not None:
        from smimeproxy.imap import make_service as imap_service

        face = imap_service(config, processor, reactor=reactor, threadpool=pool)
        _named(face, "imap").setServiceParent(root)
    if config.directory is not None:
        from smimeproxy.directory.service import make_service as directory_service

        face = directory_service(config, store, reactor, pool)
        _named(face, "directory").setServiceParent(root)
    if config.archive is not None:
        from smimeproxy.archive.job import make_service as archive_service

        face = archive_service(config, processor, reactor, threadpool=pool)
        _named(face, "archive").setServiceParent(root)
    if config.metrics is not None:
        metrics_service(config, registry, reactor).setServiceParent(root)
    return root


def _named(service: IService, name: str) -> IService:
    if not service.name:
        service.setName(name)
    return service
