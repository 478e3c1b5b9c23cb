"""Outbound lookup: a partner's certificate from their SMIMEA records (RFC 8162).

:class:`SMIMEALookup` is the blocking callable ``lookup(address) -> list[Certificate]``
that :class:`smimeproxy.processing.MessageProcessor` takes as ``lookup=``. It asks the
configured resolver (dnspython; UDP, TCP when truncated) for the SMIMEA RRset at the
address's owner name, with the DO bit and the AD bit set (RFC 6840 section 5.7: ask a
validating resolver to say whether it validated).

Trust, by policy:

- ``require_dnssec=True``: only an answer with the AD bit counts. The resolver must be
  a validating one (unbound) reached over a path the operator trusts (loopback): the
  AD bit is the resolver's word, not a proof. An answer without it is refused: no
  certificate, logged as ``smimea.unvalidated``.
- ``require_dnssec=False``: any answer counts (still validated as a certificate by the
  caller before use).

What is used: records carrying the full certificate (selector 0, matching type 0)
with an end-entity usage (PKIX-EE 1 or DANE-EE 3, RFC 6698 section 2.1.1). Digest-only
and trust-anchor records give nothing to encrypt to and are skipped. The certificates
are *not* validated here: ``MessageProcessor.certificate_for`` validates them like any
other (chain, validity, key usage, address); DANE-EE's "trust this key because DNSSEC
says so" is not applied, so a self-signed DANE-EE certificate does not validate.

Trusted answers are recorded in the store (``CertificateSource.SMIMEA``) when a store
is given, and cached in memory for the RRset's TTL (negative answers for the SOA
minimum, at most an hour). A resolver that does not answer (timeout, unreachable)
raises ``UpstreamError``, so the caller can answer "try later" instead of "no
certificate"; an error answer (SERVFAIL, which is also what a validating resolver
says for a bogus signature) gives an empty list and is not cached.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
from cryptography import x509
from twisted.logger import Logger

from smimeproxy.config import DNSLookupConfig
from smimeproxy.errors import ConfigError, UpstreamError
from smimeproxy.keystore import CertificateSource, SyncStore
from smimeproxy.pki.smimea import (
    MATCHING_FULL,
    SELECTOR_CERT,
    USAGE_DANE_EE,
    USAGE_PKIX_EE,
    parse_smimea_rdata,
    smimea_owner_name,
)

__all__ = ["LookupResult", "SMIMEALookup", "lookup_from_config"]

#: negative answers are cached at most this long, whatever the SOA says (seconds)
MAX_NEGATIVE_TTL = 3600
#: and positive ones at most a day
MAX_TTL = 86400
_END_ENTITY = (USAGE_PKIX_EE, USAGE_DANE_EE)


@dataclass(frozen=True)
class LookupResult:
    """One answer: the certificates, whether the resolver validated it, and why not."""

    certificates: tuple[x509.Certificate, ...]
    authenticated: bool
    ttl: int
    refused: str | None = None  # a reason when the policy refused the answer


class SMIMEALookup:
    """``lookup(address)``: see the module docstring. Thread-safe."""

    _log = Logger()

    def __init__(
        self,
        resolver: str,
        port: int = 53,
        *,
        require_dnssec: bool = True,
        timeout: float = 5.0,
        store: SyncStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.resolver = resolver
        self.port = port
        self.require_dnssec = require_dnssec
        self.timeout = timeout
        self.store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, tuple[x509.Certificate, ...]]] = {}

    def __call__(self, address: str) -> list[x509.Certificate]:
        address = address.strip()
        key = address.lower()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > self._clock():
                return list(hit[1])
        result = self.query(address)
        if result.refused is not None:
            return []
        with self._lock:
            self._cache[key] = (self._clock() + result.ttl, result.certificates)
        if self.store is not None:
            for cert in result.certificates:
                self.store.import_certificate(cert, source=CertificateSource.SMIMEA)
        return list(result.certificates)

    def query(self, address: str) -> LookupResult:
        """Ask the resolver (no cache, no store); ``refused`` says why an answer is
        not to be used."""
        try:
            owner = dns.name.from_text(smimea_owner_name(address, trailing_dot=True))
        except (ConfigError, dns.exception.DNSException):
            return LookupResult((), False, 0, "not an address DNS can name")
        request = dns.message.make_query(owner, dns.rdatatype.SMIMEA, want_dnssec=True)
        request.flags |= dns.flags.AD | dns.flags.RD
        try:
            response, _ = dns.query.udp_with_fallback(
                request, self.resolver, timeout=self.timeout, port=self.port
            )
        except (dns.exception.DNSException, OSError) as e:
            raise UpstreamError(f"resolver {self.resolver}:{self.port}: {e}") from None
        authenticated = bool(response.flags & dns.flags.AD)
        rcode = response.rcode()
        if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            self._log.warn(
                "smimea.error {rcode} for {owner}", rcode=dns.rcode.to_text(rcode), owner=str(owner)
            )
            return LookupResult((), authenticated, 0, f"resolver said {dns.rcode.to_text(rcode)}")
        if self.require_dnssec and not authenticated:
            self._log.warn("smimea.unvalidated answer for {address} refused", address=address)
            return LookupResult((), False, 0, "the answer is not DNSSEC-validated (no AD bit)")
        certs: list[x509.Certificate] = []
        ttl: int | None = None
        for rrset in response.answer:
            if rrset.rdtype != dns.rdatatype.SMIMEA:
                continue
            ttl = rrset.ttl if ttl is None else min(ttl, rrset.ttl)
            for rdata in rrset:
                cert = _certificate(rdata.to_wire())
                if cert is not None:
                    certs.append(cert)
        if ttl is None:  # NXDOMAIN or NODATA: RFC 2308 section 5
            ttl = min(
                (min(r.ttl, r[0].minimum) for r in response.authority if r.rdtype == 6),
                default=300,
            )
            ttl = min(ttl, MAX_NEGATIVE_TTL)
        return LookupResult(tuple(certs), authenticated, max(0, min(ttl, MAX_TTL)))


def _certificate(rdata: bytes) -> x509.Certificate | None:
    try:
        record = parse_smimea_rdata(rdata)
    except Exception:  # MalformedMessage: a broken record is skipped like an unknown one
        return None
    if record.usage not in _END_ENTITY or record.selector != SELECTOR_CERT:
        return None
    if record.matching_type != MATCHING_FULL:
        return None
    try:
        return x509.load_der_x509_certificate(record.data)
    except ValueError:
        return None


def lookup_from_config(settings: DNSLookupConfig, store: SyncStore | None = None) -> SMIMEALookup:
    """The lookup ``[directory.lookup]`` describes (pass to ``MessageProcessor``)."""
    return SMIMEALookup(
        settings.resolver,
        settings.port,
        require_dnssec=settings.require_dnssec,
        timeout=settings.timeout,
        store=store,
    )
