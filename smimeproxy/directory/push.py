"""Push mode: keep the organisation's own DNS in step with the key store by RFC 2136
dynamic updates, signed with TSIG (RFC 8945), sent to the primary server.

For organisations whose DNS (and DNSSEC signing) stays where it is: the primary
server signs what we send (BIND's ``inline-signing`` or ``dnssec-policy``), so the
records are DNSSEC-protected without this process holding any zone key.

:class:`DNSPusher.sync` is blocking (dnspython): it compares what is published now
(:class:`~smimeproxy.directory.publication.Publication`) with what it pushed last and
sends one replace per changed owner name, a delete per vanished one. The first sync
after a start replaces every owner it publishes and, when the primary allows a TSIG-
signed zone transfer, deletes SMIMEA owners under ``_smimecert`` that are no longer
ours (a user removed while we were down); without transfer rights such leftovers stay
until an operator removes them. :class:`PushService` runs ``sync`` in the thread pool
every ``interval`` seconds; a sync costs one store query when nothing changed, so an
issue, rotation or revocation reaches the primary within that interval, on whichever
node runs the service (run it on one node, or accept duplicate, idempotent updates).

Not guaranteed: ordering against changes made to the same names by other means, and
delivery while the primary is down (the next sync retries everything not yet sent).
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.tsig
import dns.update
import dns.zone
from twisted.application import service
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from smimeproxy.config import DirectoryConfig
from smimeproxy.directory.publication import Publication
from smimeproxy.directory.zone import smimea_records
from smimeproxy.errors import ConfigError, UpstreamError

__all__ = ["DNSPusher", "PushService", "TSIGKey", "load_tsig_key", "pusher_from_config"]

#: owner names per UPDATE message: 20 RSA-4096 records stay well inside 64 KiB (TCP)
_OWNERS_PER_UPDATE = 20
IN = dns.rdataclass.IN
_KEY_RE = re.compile(
    r'key\s+"?(?P<name>[^"\s{]+)"?\s*\{(?P<body>[^}]*)\}\s*;', re.IGNORECASE | re.DOTALL
)


@dataclass(frozen=True)
class TSIGKey:
    """A TSIG key: name, algorithm (RFC 8945 section 6 names) and secret."""

    name: str
    algorithm: str
    secret: bytes = field(repr=False)

    def dnspython(self) -> dns.tsig.Key:
        return dns.tsig.Key(self.name, self.secret, self.algorithm)


def load_tsig_key(path: Path, default_algorithm: str = "hmac-sha256") -> TSIGKey:
    """The first key of a BIND key file (``tsig-keygen`` output:
    ``key "name" { algorithm hmac-sha256; secret "base64"; };``). ConfigError names
    the file, never the secret."""
    try:
        text = Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the TSIG key file: {e}", path=str(path)) from None
    found = _KEY_RE.search(text)
    if found is None:
        raise ConfigError('no key "name" { ... }; clause in the TSIG key file', path=str(path))
    body = found.group("body")
    secret = re.search(r'secret\s+"([^"]+)"', body)
    algorithm = re.search(r"algorithm\s+([A-Za-z0-9.-]+)", body)
    if secret is None:
        raise ConfigError("the TSIG key has no secret", path=str(path))
    try:
        material = base64.b64decode(secret.group(1), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("the TSIG secret is not base64", path=str(path)) from None
    if not material:
        raise ConfigError("the TSIG secret is empty", path=str(path))
    return TSIGKey(
        found.group("name"), (algorithm.group(1) if algorithm else default_algorithm), material
    )


class DNSPusher:
    """Sends RFC 2136 updates for ``domains`` to ``server:port`` (blocking; see the
    module docstring). Thread-safe: one sync at a time."""

    _log = Logger()

    def __init__(
        self,
        publication: Publication,
        domains: Iterable[str],
        server: str,
        port: int,
        key: TSIGKey,
        *,
        ttl: int = 3600,
        parameters: tuple[int, int, int] = (3, 0, 0),
        timeout: float = 10.0,
    ) -> None:
        self.publication = publication
        self.domains = tuple(d.strip().lower().rstrip(".") for d in domains)
        self.server = server
        self.port = port
        self.key = key
        self.ttl = ttl
        self.parameters = parameters
        self.timeout = timeout
        self._lock = threading.Lock()
        self._serial: int | None = None
        self._pushed: dict[str, frozenset[str]] | None = None  # owner -> presentations
        self._apex: dict[str, dns.name.Name] = {}

    # -- DNS plumbing ----------------------------------------------------------------

    def _ask(self, message: dns.message.Message) -> dns.message.Message:
        try:
            response = dns.query.tcp(message, self.server, timeout=self.timeout, port=self.port)
        except (dns.exception.DNSException, OSError) as e:
            raise UpstreamError(f"DNS primary {self.server}:{self.port}: {e}") from None
        return response

    def zone_apex(self, domain: str) -> dns.name.Name:
        """The zone holding ``_smimecert.<domain>`` on the primary (from its SOA)."""
        if domain not in self._apex:
            name = dns.name.from_text(f"_smimecert.{domain}.")
            response = self._ask(dns.message.make_query(name, dns.rdatatype.SOA))
            for rrset in (*response.answer, *response.authority):
                if rrset.rdtype == dns.rdatatype.SOA:
                    self._apex[domain] = rrset.name
                    break
            else:
                raise UpstreamError(f"the DNS primary is not authoritative for {name}")
        return self._apex[domain]

    def _send(self, apex: dns.name.Name, changes: list[tuple[str, frozenset[str]]]) -> None:
        for start in range(0, len(changes), _OWNERS_PER_UPDATE):
            update = dns.update.UpdateMessage(apex, keyring=self.key.dnspython())
            for owner, records in changes[start : start + _OWNERS_PER_UPDATE]:
                name = dns.name.from_text(owner + ".")
                if records:
                    update.replace(name, self.ttl, dns.rdatatype.SMIMEA, *sorted(records))
                else:
                    update.delete(name, dns.rdatatype.SMIMEA)
            response = self._ask(update)
            if response.rcode() != dns.rcode.NOERROR:
                raise UpstreamError(
                    f"the DNS primary refused the update of {apex}: "
                    f"{dns.rcode.to_text(response.rcode())}"
                )

    def _existing_owners(self, apex: dns.name.Name, domain: str) -> set[str]:
        """SMIMEA owners under ``_smimecert.<domain>`` on the primary (best effort)."""
        try:
            transfer = dns.query.xfr(
                self.server,
                apex,
                keyring={dns.name.from_text(self.key.name): self.key.dnspython()},
                port=self.port,
                timeout=self.timeout,
                lifetime=self.timeout,
            )
            zone = dns.zone.from_xfr(transfer)
        except (dns.exception.DNSException, OSError, EOFError) as e:
            self._log.info("no zone transfer from the primary ({error})", error=str(e))
            return set()
        suffix = f"._smimecert.{domain}"
        owners = set()
        origin = zone.origin or dns.name.root
        for name, node in zone.nodes.items():
            absolute = name.derelativize(origin).to_text(omit_final_dot=True).lower()
            if absolute.endswith(suffix) and node.get_rdataset(IN, dns.rdatatype.SMIMEA):
                owners.add(absolute)
        return owners

    # -- the sync --------------------------------------------------------------------

    def desired(self) -> dict[str, dict[str, frozenset[str]]]:
        """Per domain, owner -> SMIMEA presentations published now."""
        out: dict[str, dict[str, frozenset[str]]] = {}
        for domain in self.domains:
            table: dict[str, set[str]] = {}
            for owner, record in smimea_records(
                self.publication.everything(domain), self.parameters
            ):
                table.setdefault(owner, set()).add(record.presentation())
            out[domain] = {o: frozenset(r) for o, r in table.items()}
        return out

    def sync(self) -> int:
        """Bring the primary up to date; the number of owner names changed. Raises
        UpstreamError when the primary is unreachable or refuses (nothing is marked
        as pushed then: the next sync sends it again)."""
        with self._lock:
            serial = self.publication.serial()
            if serial == self._serial and self._pushed is not None:
                return 0
            desired = self.desired()
            first = self._pushed is None
            pushed = dict(self._pushed or {})
            changed = 0
            for domain, table in desired.items():
                apex = self.zone_apex(domain)
                suffix = f"._smimecert.{domain}"
                previous = {o for o in pushed if o.endswith(suffix)}
                if first:
                    previous |= self._existing_owners(apex, domain)
                changes = [(o, r) for o, r in sorted(table.items()) if first or pushed.get(o) != r]
                changes += [(o, frozenset()) for o in sorted(previous - set(table))]
                self._send(apex, changes)
                for owner, records in changes:
                    if records:
                        pushed[owner] = records
                    else:
                        pushed.pop(owner, None)
                changed += len(changes)
            self._pushed = pushed
            self._serial = serial
            if changed:
                self._log.info(
                    "pushed {count} SMIMEA owner names to {server}",
                    count=changed,
                    server=f"{self.server}:{self.port}",
                )
            return changed


def pusher_from_config(settings: DirectoryConfig, publication: Publication) -> DNSPusher:
    push = settings.push
    if push is None:
        raise ConfigError("[directory.push] is absent")
    return DNSPusher(
        publication,
        settings.domains,
        push.server,
        push.port,
        load_tsig_key(push.tsig_key_file, push.tsig_algorithm),
        ttl=settings.ttl,
        parameters=(settings.smimea_usage, settings.smimea_selector, settings.smimea_matching_type),
    )


class PushService(service.Service):
    """Runs :meth:`DNSPusher.sync` in ``threadpool`` every ``interval`` seconds
    (never two at once); failures are logged and retried at the next tick."""

    _log = Logger()

    def __init__(
        self, pusher: DNSPusher, reactor: object, threadpool: ThreadPool, interval: float = 2.0
    ) -> None:
        self.pusher = pusher
        self.reactor = reactor
        self.threadpool = threadpool
        self.interval = interval
        self._loop: LoopingCall | None = None

    def _tick(self) -> object:
        d = deferToThreadPool(self.reactor, self.threadpool, self.pusher.sync)  # type: ignore[arg-type]

        def failed(failure: Failure) -> None:
            self._log.warn("SMIMEA push failed: {error}", error=failure.getErrorMessage())

        return d.addErrback(failed)

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.reactor  # type: ignore[assignment]
        self._loop.start(self.interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
