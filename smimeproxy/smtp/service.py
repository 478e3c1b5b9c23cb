"""Assembly: the SMTP gateway as a Twisted service, built from the configuration.

Only wiring: each ``listen`` endpoint string becomes a ``StreamServerEndpointService``
(as ``twisted.mail.tap`` does) in one ``MultiService``, all sharing one
:class:`~smimeproxy.smtp.server.GatewaySettings`; each ``submission_listen`` one too,
with sessions that authenticate against Dovecot's ``auth_dovecot`` socket (one
connection for all of them, see :mod:`.dovecot_client`). Every collaborator can be injected
(reactor, thread pool, the next hop's endpoint factory) so tests need no patching.

Stopping waits (bounded by ``shutdown_timeout``) for the transactions in flight: their
clients get the final reply, idle sessions get 421, the listeners stop accepting.
:meth:`GatewayService.reload` swaps the policy and the STARTTLS certificate without
dropping a connection (worker processes, if any, are started again from the new file);
listen endpoints, the next hop and the number of workers are read at start only.

Not done here: opening the key store (the caller passes a ready
:class:`~smimeproxy.processing.MessageProcessor`), and checking that the TLS files are
readable before the first STARTTLS (they are read at start, so a missing file stops
the start with a :class:`~smimeproxy.errors.ConfigError`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger

from smimeproxy.config import Config, SMTPConfig, parse_endpoint
from smimeproxy.errors import ConfigError
from smimeproxy.metrics import Registry
from smimeproxy.processing import MessageProcessor, master_secret
from smimeproxy.smtp.dovecot_client import DovecotAuthClient
from smimeproxy.smtp.engine import Engine, ProcessEngine, WorkerSpec
from smimeproxy.smtp.relay import NextHop, TLSPolicy
from smimeproxy.smtp.server import (
    GatewayMetrics,
    GatewaySettings,
    SMTPGatewayFactory,
    SubmissionListener,
)
from smimeproxy.smtp.submission import Submission, store_senders
from smimeproxy.smtp.transform import MessageTransform


def server_tls_options(config: SMTPConfig) -> Callable[[], object] | None:
    """STARTTLS options from ``tls_certificate``/``tls_key`` (PEM); None when unset."""
    if config.tls_certificate is None or config.tls_key is None:
        return None
    from twisted.internet import ssl

    try:
        pem = config.tls_certificate.read_bytes() + b"\n" + config.tls_key.read_bytes()
        options = ssl.PrivateCertificate.loadPEM(pem).options()
    except OSError as e:
        raise ConfigError(
            f"cannot read {e.filename}: {e.strerror}", key="smtp.tls_certificate"
        ) from None
    except Exception as e:  # pyOpenSSL raises its own errors for bad PEM
        raise ConfigError(f"not a usable certificate and key: {e}", key="smtp.tls_key") from None
    return lambda: options


def next_hop_tls(config: SMTPConfig) -> TLSPolicy:
    """Verified options for ``require`` (service-identity checks the name), and
    unverified ones for ``opportunistic`` (RFC 7435: better than clear text)."""
    from twisted.internet import ssl

    endpoint = parse_endpoint(config.next_hop, "client")
    hostname = config.next_hop_tls_hostname or endpoint.params.get("host", "localhost")

    def verified() -> object:
        if config.next_hop_ca_file is not None:
            try:
                root = ssl.Certificate.loadPEM(config.next_hop_ca_file.read_bytes())
            except OSError as e:
                raise ConfigError(
                    f"cannot read: {e.strerror}", key="smtp.next_hop_ca_file"
                ) from None
            return ssl.optionsForClientTLS(hostname, trustRoot=root)
        return ssl.optionsForClientTLS(hostname)

    def unverified() -> object:
        return ssl.CertificateOptions(verify=False)

    return TLSPolicy(str(config.next_hop_starttls), verified, unverified)


#: how long stopping waits for SMTP transactions in flight (seconds)
SHUTDOWN_TIMEOUT = 30.0


class GatewayService(MultiService):
    """The listeners of one gateway; stopping drains, :meth:`reload` swaps policy."""

    _log = Logger()

    def __init__(
        self,
        factory: SMTPGatewayFactory,
        processor: MessageProcessor,
        shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    ):
        super().__init__()
        self.factory = factory
        self.processor = processor
        self.shutdown_timeout = shutdown_timeout

    @property
    def engine(self) -> Engine:
        engine = self.factory.settings.engine
        assert engine is not None
        return engine

    def startService(self) -> None:
        super().startService()
        self.engine.start()

    def stopService(self) -> defer.Deferred[None]:
        # the listeners stop accepting at once; the sessions in a transaction finish,
        # then the engine's workers (if any) stop
        stopped = super().stopService()
        drained = self.factory.drain(self.shutdown_timeout)
        drained.addCallback(lambda _: self.engine.close())
        return defer.gatherResults([stopped, drained]).addCallback(lambda _: None)

    def reload(self, config: Config) -> None:
        """Take the new ``[smtp]`` policy and STARTTLS certificate for the next command
        of every session (connections are kept). Everything is built before anything
        is swapped: a bad certificate raises ConfigError and changes nothing. Not
        reloaded: ``listen`` and the next hop (a restart is needed)."""
        smtp = config.smtp
        if smtp is None:
            raise ConfigError("the [smtp] section cannot be removed by a reload", key="smtp")
        settings = self.factory.settings
        tls_options = server_tls_options(smtp)
        transform = MessageTransform(self.processor, smtp)
        if smtp.listen != settings.config.listen or smtp.next_hop != settings.config.next_hop:
            self._log.warn("smtp.reload_needs_restart fields=listen,next_hop")
        if smtp.workers != settings.config.workers:
            self._log.warn("smtp.reload_needs_restart fields=workers")
        submission = ("submission_listen", "auth_dovecot", "submission_plaintext")
        if any(getattr(smtp, f) != getattr(settings.config, f) for f in submission):
            self._log.warn("smtp.reload_needs_restart fields={fields}", fields=",".join(submission))
        settings.config = smtp
        settings.transform = transform
        settings.tls_options = tls_options
        self.engine.reload(config)  # worker processes build this configuration
        self._log.info("smtp.reloaded")


class _CloseOnStop(Service):
    """Calls ``close`` when the gateway stops (the next hop's idle connections, the
    connection to Dovecot's auth service)."""

    def __init__(self, close: Callable[[], object]):
        self.close = close

    def stopService(self) -> None:
        super().stopService()
        self.close()


def make_service(
    config: Config,
    processor: MessageProcessor,
    reactor: Any = None,
    threadpool: Any = None,
    *,
    next_hop_endpoint: Callable[[], IStreamClientEndpoint] | None = None,
    hostname: str | None = None,
    registry: Registry | None = None,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    engine: Engine | None = None,
) -> GatewayService:
    """The gateway's listeners as one service (``config.smtp`` must be present).

    ``engine``: where messages are transformed; by default ``[smtp] workers``
    processes, or the thread pool when it is 0."""
    if config.smtp is None:
        raise ConfigError("the [smtp] section is missing", key="smtp")
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    if threadpool is None:
        threadpool = reactor.getThreadPool()
    smtp = config.smtp
    if next_hop_endpoint is None:

        def next_hop_endpoint() -> IStreamClientEndpoint:
            return clientFromString(reactor, smtp.next_hop)

    if engine is None and smtp.workers > 0:
        spec = WorkerSpec(str(config.path), master_secret(config.keystore), config.document)
        engine = ProcessEngine(spec, smtp.workers, reactor, registry)
    name = hostname or smtp.authserv_id or processor.settings.authserv_id or "localhost"
    settings = GatewaySettings(
        config=smtp,
        transform=MessageTransform(processor, smtp),
        next_hop=NextHop(
            next_hop_endpoint,
            reactor,
            helo=name,
            timeout=smtp.next_hop_timeout,
            tls=next_hop_tls(smtp),
        ),
        reactor=reactor,
        threadpool=threadpool,
        hostname=name,
        tls_options=server_tls_options(smtp),
        metrics=GatewayMetrics(registry),
        engine=engine,
    )
    factory = SMTPGatewayFactory(settings)
    service = GatewayService(factory, processor, shutdown_timeout)
    service.setName("smtp")
    _CloseOnStop(settings.next_hop.close_idle).setServiceParent(service)
    for description in smtp.listen:
        StreamServerEndpointService(
            serverFromString(reactor, description), factory
        ).setServiceParent(service)
    if smtp.submission_listen and smtp.auth_dovecot:
        auth_endpoint = smtp.auth_dovecot
        authenticator = DovecotAuthClient(lambda: clientFromString(reactor, auth_endpoint), reactor)
        _CloseOnStop(authenticator.close).setServiceParent(service)
        submission = Submission(
            authenticator, store_senders(processor.store), plaintext=smtp.submission_plaintext
        )
        listener = SubmissionListener(factory, submission)
        for description in smtp.submission_listen:
            StreamServerEndpointService(
                serverFromString(reactor, description), listener
            ).setServiceParent(service)
    return service
