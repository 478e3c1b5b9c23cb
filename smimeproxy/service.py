"""One MultiService from the configuration: the key store, a thread pool, every face.

Assembly only: each face builds its own service from the config and the collaborators
handed to it here (reactor, thread pool, key store, message processor, metrics).
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
    processor = MessageProcessor(store, config.smime)
    root.store = store  # type: ignore[attr-defined]
    root.processor = processor  # type: ignore[attr-defined]
    if config.metrics is not None:
        metrics_service(config, registry, reactor).setServiceParent(root)
    return root
