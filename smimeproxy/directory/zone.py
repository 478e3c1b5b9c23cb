"""Zone-file text (RFC 1035 section 5) of a ``_smimecert`` zone, for operators who load
the records into their own DNS by hand or by script (``smimeproxy directory zone``).

The text is a complete zone by default (``$ORIGIN``, SOA, NS, then one SMIMEA RRset per
published address) that BIND's ``named-checkzone`` accepts as it stands; with
``records_only`` just the SMIMEA lines, to include into an existing zone. It is a
snapshot: unlike the built-in server it does not follow later rotations.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

from smimeproxy.directory.publication import Published
from smimeproxy.pki.smimea import SMIMEARecord, smimea_for_certificate, zone_text

__all__ = ["smimea_records", "zone_file"]


def smimea_records(
    published: Iterable[Published], parameters: tuple[int, int, int] = (3, 0, 0)
) -> list[tuple[str, SMIMEARecord]]:
    """``(owner, record)`` for every certificate of every published address, with the
    configured usage, selector and matching type (RFC 6698 section 2.1)."""
    usage, selector, matching = parameters
    return [
        (p.owner, smimea_for_certificate(c, usage=usage, selector=selector, matching_type=matching))
        for p in published
        for c in p.certificates
    ]


def zone_file(
    domain: str,
    published: Iterable[Published],
    *,
    serial: int,
    ttl: int = 3600,
    parameters: tuple[int, int, int] = (3, 0, 0),
    nameserver: str | None = None,
    hostmaster: str | None = None,
    records_only: bool = False,
) -> str:
    """The zone ``_smimecert.<domain>`` as master-file text (see the module docstring).

    ``serial`` is the SOA serial (the key store's audit sequence, as the built-in
    server uses); ``nameserver`` defaults to this host's FQDN.
    """
    domain = domain.strip().lower().rstrip(".")
    origin = f"_smimecert.{domain}."
    records = zone_text(smimea_records(published, parameters), ttl=ttl)
    if records_only:
        return records
    ns = (nameserver or socket.getfqdn()).rstrip(".") + "."
    rname = (hostmaster or f"hostmaster.{domain}").rstrip(".") + "."
    negative = min(ttl, 300)
    head = [
        f"; SMIMEA records (RFC 8162) of {domain}, written by smimeproxy",
        f"$ORIGIN {origin}",
        f"$TTL {ttl}",
        f"{origin} {negative} IN SOA {ns} {rname} {serial & 0xFFFFFFFF}"
        f" 3600 600 1209600 {negative}",
        f"{origin} {ttl} IN NS {ns}",
    ]
    return "\n".join(head) + "\n" + records
