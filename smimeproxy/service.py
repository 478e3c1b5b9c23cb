"""One MultiService from the configuration: the key store, a thread pool, every face.

Assembly only: each face builds its own service from the config and the collaborators
handed to it here (reactor, thread pool, key store, message processor, metrics). A face
is imported only when its section is present, so a node that runs only the gateway
never loads the IMAP proxy.

Operations: the faces share one metrics :class:`~smimeproxy.metrics.Registry`;
stopping (SIGTERM/SIGINT to twistd) stops the faces one after the other, newest first,
each waiting for its own work in flight (the SMTP gateway drains its transactions), and
the thread pool last, so no face is left waiting on a stopped pool; SIGHUP re-reads the
config file and hands it to every face that has a ``reload(config)`` hook and to the
message processor (trust files). A config that does not load or apply is logged and
the running one kept. Not reloaded: listen endpoints, the key store, the next hop and
upstream addresses (a restart is needed).
"""

from __future__ import annotations

import inspect
import signal
import threading
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.server import Site

from smimeproxy.config import Config, load_config
from smimeproxy.errors import SMIMEProxyError
from smimeproxy.keystore import SyncStore
from smimeproxy.metrics import MetricsResource, Registry
from smimeproxy.processing import MessageProcessor, open_configured_store
from smimeproxy.threads import ThreadPoolService


class OrderedServices(MultiService):
    """A MultiService that stops its children one at a time, last added first, each
    after the previous one's Deferred fired (MultiService stops them all at once)."""

    @defer.inlineCallbacks
    def stopService(self):  # type: ignore[no-untyped-def, override]
        Service.stopService(self)
        for child in reversed(list(self)):
            try:
                yield defer.maybeDeferred(child.stopService)
            except Exception:
                Logger().failure("service.stop_failed name={name}", name=child.name)


class Reloader(Service):
    """Re-reads the config file and applies it to the running faces (SIGHUP).

    ``reload()`` runs on the reactor thread; the signal handler only schedules it
    (``callFromThread``), so it never runs inside another callback. The handler is
    installed when the service starts in the main thread, and the previous one put
    back when it stops.
    """

    _log = Logger()

    def __init__(
        self, config: Config, root: MultiService, processor: MessageProcessor, reactor: Any
    ):
        self.config = config
        self.root = root
        self.processor = processor
        self.reactor = reactor
        self._previous: Any = None
        self.reloads = 0

    def startService(self) -> None:
        super().startService()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGHUP, self._signalled)
            self._log.info("service.reload_on_sighup path={path}", path=str(self.config.path))

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _signalled(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """Apply the config file as it is now; False (and the old config kept) if it
        does not load or a face refuses it."""
        path = self.config.path
        try:
            new = load_config(path)
        except SMIMEProxyError as e:
            self._log.error(
                "service.reload_refused path={path} error={error}", path=str(path), error=str(e)
            )
            return False
        old = self.config
        try:
            self.processor.reload(new.smime)
        except SMIMEProxyError as e:
            self._log.error(
                "service.reload_refused path={path} error={error}", path=str(path), error=str(e)
            )
            return False
        applied: list[Any] = []
        for face in self.root:
            hook = getattr(face, "reload", None)
            if hook is None or face is self:
                continue
            try:
                hook(new)
            except Exception as e:
                self._log.error(
                    "service.reload_refused path={path} face={face} error={error}",
                    path=str(path),
                    face=face.name,
                    error=str(e),
                )
                # put back what was already applied
                self.processor.reload(old.smime)
                for done in applied:
                    done.reload(old)
                return False
            applied.append(face)
        self.config = new
        self.reloads += 1
        self._log.info(
            "service.reloaded path={path} faces={faces}",
            path=str(path),
            faces=",".join(f.name for f in applied),
        )
        return True


def metrics_service(config: Config, registry: Registry, reactor: Any) -> MultiService:
    service = MultiService()
    service.setName("metrics")
    assert config.metrics is not None
    site = Site(MetricsResource(registry), timeout=60)  # Twisted keeps idle ones 12 h
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
    shutdown_timeout: float | None = None,
) -> IService:
    """Everything ``config`` enables, in one MultiService (stopped in order: see the
    module docstring). ``shutdown_timeout`` bounds the SMTP drain (default 30 s)."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    root = OrderedServices()
    store = store or open_configured_store(config)
    registry = registry or Registry()
    pool = ThreadPool(minthreads=2, maxthreads=16, name="smimeproxy")
    ThreadPoolService(pool).setServiceParent(root)
    lookup = None
    if config.directory is not None and config.directory.lookup is not None:
        from smimeproxy.directory.lookup import lookup_from_config

        lookup = lookup_from_config(config.directory.lookup, store)
    processor = MessageProcessor(store, config.smime, lookup=lookup, registry=registry)
    root.store = store  # type: ignore[attr-defined]
    root.processor = processor  # type: ignore[attr-defined]
    root.registry = registry  # type: ignore[attr-defined]
    if config.smtp is not None:
        from smimeproxy.smtp.service import SHUTDOWN_TIMEOUT
        from smimeproxy.smtp.service import make_service as smtp_service

        face = smtp_service(
            config,
            processor,
            reactor,
            pool,
            registry=registry,
            shutdown_timeout=SHUTDOWN_TIMEOUT if shutdown_timeout is None else shutdown_timeout,
        )
        _named(face, "smtp").setServiceParent(root)
    if config.imap is not None:
        from smimeproxy.imap import make_service as imap_service

        extra = _if_accepted(imap_service, registry=registry)
        face = imap_service(config, processor, reactor=reactor, threadpool=pool, **extra)
        _named(face, "imap").setServiceParent(root)
    if config.directory is not None:
        from smimeproxy.directory.service import make_service as directory_service

        face = directory_service(config, store, reactor, pool, registry=registry)
        _named(face, "directory").setServiceParent(root)
    if config.archive is not None:
        from smimeproxy.archive.job import make_service as archive_service

        face = archive_service(config, processor, reactor, threadpool=pool)
        _named(face, "archive").setServiceParent(root)
    if config.metrics is not None:
        metrics_service(config, registry, reactor).setServiceParent(root)
    reloader = Reloader(config, root, processor, reactor)
    reloader.setName("reloader")
    reloader.setServiceParent(root)
    root.reloader = reloader  # type: ignore[attr-defined]
    return root


def _if_accepted(function: Any, **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments ``function`` takes (a face that does not know metrics
    yet is built without them)."""
    parameters = inspect.signature(function).parameters
    return {k: v for k, v in kwargs.items() if k in parameters}


def _named(service: IService, name: str) -> IService:
    if not service.name:
        service.setName(name)
    return service
