"""SMIMEA records (RFC 8162): owner names, RDATA, zone-file text, matching.

The record's fields have the TLSA semantics of RFC 6698 section 2.1 (RFC 8162 section 2):
a certificate usage, a selector (what part of the certificate), a matching type (how it
is compared) and the certificate association data. Pure encoding: publishing in DNS,
DNSSEC and the trust decision belong to the directory face and the validator.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass

import idna
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from smimeproxy.errors import ConfigError, MalformedMessage

# RFC 8162 section 8: the SMIMEA RRtype.
SMIMEA_RRTYPE = 53

# RFC 6698 section 2.1.1 certificate usages (acronyms from RFC 7218 section 2.1).
USAGE_PKIX_TA = 0
USAGE_PKIX_EE = 1
USAGE_DANE_TA = 2
USAGE_DANE_EE = 3

# RFC 6698 section 2.1.2 selectors.
SELECTOR_CERT = 0  # the full certificate, DER
SELECTOR_SPKI = 1  # its SubjectPublicKeyInfo, DER

# RFC 6698 section 2.1.3 matching types.
MATCHING_FULL = 0  # the selected content itself
MATCHING_SHA256 = 1  # SHA2-256 of it
MATCHING_SHA512 = 2  # SHA2-512 of it

_DIGEST_SIZES = {MATCHING_SHA256: 32, MATCHING_SHA512: 64}

# RFC 8162 section 3: the hashed local part is truncated to 28 octets.
_OWNER_HASH_OCTETS = 28
_SUBDOMAIN = "_smimecert"


def smimea_owner_name(address: str, *, trailing_dot: bool = False) -> str:
    """The owner name of ``address``'s SMIMEA records (RFC 8162 section 3).

    The local part is hashed with SHA2-256 as its UTF-8 octets *exactly as given*: RFC
    8162 prescribes no case folding or other canonicalisation, so ``Hugh@`` and
    ``hugh@`` have different owner names; a publisher that treats local parts as
    case-insensitive must publish under every spelling it wants found. The domain is
    lower-cased and IDNA-encoded (A-labels). ``trailing_dot`` makes the name absolute,
    as zone files want it.
    """
    if not isinstance(address, str) or "@" not in address:
        raise ConfigError(f"not an email address: {address!r}")
    local, _, domain = address.rpartition("@")
    domain = domain.rstrip(".")
    if not local or not domain:
        raise ConfigError(f"not an email address: {address!r}")
    try:
        ascii_domain = idna.encode(domain, uts46=True).decode("ascii").lower()
        local_octets = local.encode("utf-8")
    except (idna.IDNAError, UnicodeError, ValueError):
        raise ConfigError(f"not an email address (domain): {address!r}") from None
    digest = hashlib.sha256(local_octets).digest()[:_OWNER_HASH_OCTETS]
    name = f"{digest.hex()}.{_SUBDOMAIN}.{ascii_domain}"
    return name + "." if trailing_dot else name


@dataclass(frozen=True)
class SMIMEARecord:
    """One SMIMEA resource record's data (RFC 6698 section 2.1 fields).

    Values outside the registries (usage 255 PrivCert, say) are representable, as DNS
    may carry them; :func:`record_matches` treats a selector or matching type it does
    not know as "does not match" (RFC 6698 section 4.1: unusable records are skipped).
    """

    usage: int
    selector: int
    matching_type: int
    data: bytes

    def __post_init__(self) -> None:
        for name in ("usage", "selector", "matching_type"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 255:
                raise ConfigError(f"SMIMEA {name} must be an integer 0..255, not {value!r}")
        if not isinstance(self.data, bytes) or not self.data:
            raise ConfigError("SMIMEA certificate association data must be non-empty bytes")
        size = _DIGEST_SIZES.get(self.matching_type)
        if size is not None and len(self.data) != size:
            raise ConfigError(
                f"matching type {self.matching_type} needs {size} octets of data, "
                f"not {len(self.data)}"
            )

    def rdata(self) -> bytes:
        """The wire-format RDATA (RFC 6698 section 2.1)."""
        return bytes((self.usage, self.selector, self.matching_type)) + self.data

    def presentation(self) -> str:
        """Zone-file form on one line: ``"3 0 0 3082..."`` (hex upper-case, as BIND
        prints it; RFC 6698 section 2.2)."""
        return f"{self.usage} {self.selector} {self.matching_type} {self.data.hex().upper()}"


def _selected(cert: x509.Certificate, selector: int) -> bytes:
    if selector == SELECTOR_CERT:
        return cert.public_bytes(serialization.Encoding.DER)
    if selector == SELECTOR_SPKI:
        return cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    raise ConfigError(f"unknown SMIMEA selector {selector} (RFC 6698 2.1.2 knows 0 and 1)")


def _matched(content: bytes, matching_type: int) -> bytes:
    if matching_type == MATCHING_FULL:
        return content
    if matching_type == MATCHING_SHA256:
        return hashlib.sha256(content).digest()
    if matching_type == MATCHING_SHA512:
        return hashlib.sha512(content).digest()
    raise ConfigError(f"unknown SMIMEA matching type {matching_type} (RFC 6698 2.1.3: 0, 1, 2)")


def smimea_for_certificate(
    cert: x509.Certificate,
    *,
    usage: int = USAGE_DANE_EE,
    selector: int = SELECTOR_CERT,
    matching_type: int = MATCHING_FULL,
) -> SMIMEARecord:
    """The record publishing ``cert``; the default (3 0 0, DANE-EE with the full
    certificate) is the one that lets a partner encrypt without any other lookup,
    since a hash-only record gives them nothing to encrypt to."""
    return SMIMEARecord(
        usage, selector, matching_type, _matched(_selected(cert, selector), matching_type)
    )


def record_matches(record: SMIMEARecord, cert: x509.Certificate) -> bool:
    """Whether ``record``'s association data is that of ``cert``.

    Compares data only. It does not apply the usage's meaning (whether ``cert`` must be
    the end entity or a trust anchor in the chain, and whether PKIX validation is also
    required for usages 0 and 1): that is the validator's job. Unknown selectors or
    matching types give ``False``.
    """
    try:
        expected = _matched(_selected(cert, record.selector), record.matching_type)
    except ConfigError:
        return False
    return hmac.compare_digest(expected, record.data)


def parse_smimea_rdata(rdata: bytes) -> SMIMEARecord:
    """A record from wire-format RDATA; :class:`MalformedMessage` for anything short,
    empty or with a digest of the wrong length."""
    if not isinstance(rdata, (bytes, bytearray, memoryview)):
        raise MalformedMessage("SMIMEA RDATA must be bytes")
    raw = bytes(rdata)
    if len(raw) < 4:
        raise MalformedMessage(f"SMIMEA RDATA too short ({len(raw)} octets)")
    try:
        return SMIMEARecord(raw[0], raw[1], raw[2], raw[3:])
    except ConfigError as e:
        raise MalformedMessage(f"bad SMIMEA RDATA: {e}") from None


_HEX = re.compile(r"[0-9A-Fa-f]*")


def parse_smimea_presentation(text: str) -> SMIMEARecord:
    """A record from its presentation form: ``"3 0 0 30 82 ..."``, hex possibly split by
    whitespace or wrapped in parentheses over several lines, or the RFC 3597 generic
    form ``"\\# 5 0300003082"``. Owner, TTL, class and type must already be removed."""
    if not isinstance(text, str):
        raise MalformedMessage("SMIMEA presentation must be text")
    tokens = text.replace("(", " ").replace(")", " ").split()
    try:
        if tokens and tokens[0] == "\\#":
            length = int(tokens[1])
            hexdata = "".join(tokens[2:])
            if not _HEX.fullmatch(hexdata) or len(hexdata) != 2 * length:
                raise MalformedMessage("RFC 3597 data length does not match")
            return parse_smimea_rdata(bytes.fromhex(hexdata))
        if len(tokens) < 4 or not all(t.isdigit() for t in tokens[:3]):
            raise MalformedMessage("SMIMEA needs usage, selector, matching type and data")
        hexdata = "".join(tokens[3:])
        if not _HEX.fullmatch(hexdata) or len(hexdata) % 2:
            raise MalformedMessage("SMIMEA association data is not hex")
        return SMIMEARecord(int(tokens[0]), int(tokens[1]), int(tokens[2]), bytes.fromhex(hexdata))
    except (IndexError, ValueError) as e:
        raise MalformedMessage(f"bad SMIMEA presentation: {e}") from None
    except ConfigError as e:
        raise MalformedMessage(f"bad SMIMEA presentation: {e}") from None


# Hex characters per continuation line in zone_text, as `dig +multiline` wraps them.
_HEX_PER_LINE = 56


def zone_text(records: Iterable[tuple[str, SMIMEARecord]], ttl: int = 3600) -> str:
    """Master-file lines (RFC 1035 section 5) for ``(owner, record)`` pairs:
    ``owner TTL IN SMIMEA u s m ( HEX ... )`` with long data wrapped in parentheses.

    Owner names are made absolute (a trailing dot is added). Only the records: the SOA,
    NS and ``$ORIGIN`` of a zone are the caller's. Owners are emitted in the given order.
    """
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= 2**31 - 1:
        raise ConfigError(f"TTL must be 0..2147483647 (RFC 2181 section 8), not {ttl!r}")
    lines: list[str] = []
    for owner, record in records:
        if not owner or any(c.isspace() for c in owner) or ";" in owner:
            raise ConfigError(f"not a usable owner name: {owner!r}")
        absolute = owner if owner.endswith(".") else owner + "."
        head = f"{absolute} {ttl} IN SMIMEA {record.usage} {record.selector} {record.matching_type}"
        hexdata = record.data.hex().upper()
        if len(hexdata) <= _HEX_PER_LINE:
            lines.append(f"{head} {hexdata}")
            continue
        chunks = [hexdata[i : i + _HEX_PER_LINE] for i in range(0, len(hexdata), _HEX_PER_LINE)]
        lines.append(f"{head} (")
        lines.extend(f"\t{chunk}" for chunk in chunks[:-1])
        lines.append(f"\t{chunks[-1]} )")
    return "\n".join(lines) + ("\n" if lines else "")
