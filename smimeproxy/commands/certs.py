"""``smimeproxy certs import|list|show|remove``: partners' certificates.

These are certificates we encrypt to (our own users' certificates live with their keys:
see ``keys``). Import takes PEM (several per file), DER or a PKCS#7 bundle; every
certificate in the file is stored under the addresses in its subjectAltName. Import
does not validate the chain: that happens, with the store's trust, whenever one is
used (``message seal``, the gateway).
"""

from __future__ import annotations

import argparse
from typing import Any

from cryptography.hazmat.primitives import serialization

from smimeproxy.commands.common import IO, print_json, table
from smimeproxy.commands.store_ops import actor, certificates_in, configured_store, short, when
from smimeproxy.keystore import CertificateRecord


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("certs", help="partners' certificates: import, list, show, remove")
    s = p.add_subparsers(dest="action", required=True, metavar="import|list|show|remove")
    i = s.add_parser("import", help="import certificates (PEM, DER or PKCS#7)")
    i.add_argument("files", nargs="+", metavar="CERT")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=import_command)
    ls = s.add_parser("list", help="stored certificates, newest first")
    ls.add_argument("--address", default=None, help="only this address's certificates")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=list_command)
    sh = s.add_parser("show", help="one certificate, by fingerprint (SHA-256 hex)")
    sh.add_argument("fingerprint")
    sh.add_argument("--pem", action="store_true", help="print only the certificate as PEM")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=show_command)
    rm = s.add_parser("remove", help="forget a certificate, by fingerprint")
    rm.add_argument("fingerprint")
    rm.add_argument("--json", action="store_true")
    rm.set_defaults(func=remove_command)


def record_dict(r: CertificateRecord) -> dict[str, Any]:
    c = r.certificate
    return {
        "fingerprint": r.fingerprint,
        "addresses": list(r.addresses),
        "subject": c.subject.rfc4514_string(),
        "issuer": c.issuer.rfc4514_string(),
        "serial": format(c.serial_number, "x"),
        "not_before": c.not_valid_before_utc.isoformat(),
        "not_after": c.not_valid_after_utc.isoformat(),
        "source": str(r.source),
        "first_seen": r.first_seen.isoformat(),
        "last_seen": r.last_seen.isoformat(),
        "capabilities": list(r.capabilities),
        "revoked": r.revoked,
    }


def _full(store: Any, prefix: str) -> str:
    """A whole fingerprint from an unambiguous prefix (as the tables show)."""
    prefix = prefix.lower().replace(":", "")
    if len(prefix) == 64:
        return prefix
    matches = [r.fingerprint for r in store.certificates() if r.fingerprint.startswith(prefix)]
    if len(matches) == 1:
        return str(matches[0])
    from smimeproxy.errors import KeyNotFound

    raise KeyNotFound(
        f"no certificate {prefix}" if not matches else f"{prefix} matches several certificates"
    )


def import_command(args: argparse.Namespace, io: IO) -> int:
    found = [c for path in args.files for c in certificates_in(path)]
    with configured_store(args) as (_, store):
        records = [store.import_certificate(c, actor=actor()) for c in found]
    if args.json:
        print_json([record_dict(r) for r in records], io.stdout)
    else:
        for r in records:
            io.write(f"imported {short(r.fingerprint)} for {', '.join(r.addresses)}\n")
    return 0


def list_command(args: argparse.Namespace, io: IO) -> int:
    with configured_store(args) as (_, store):
        records = store.certificates(args.address)
    if args.json:
        print_json([record_dict(r) for r in records], io.stdout)
        return 0
    rows = [
        (
            short(r.fingerprint),
            ", ".join(r.addresses),
            str(r.source),
            when(r.certificate.not_valid_after_utc),
            "revoked" if r.revoked else "",
        )
        for r in records
    ]
    io.write(table(rows, ("fingerprint", "addresses", "source", "valid until", "")))
    return 0


def show_command(args: argparse.Namespace, io: IO) -> int:
    with configured_store(args) as (_, store):
        record = store.certificate(_full(store, args.fingerprint))
    pem = record.certificate.public_bytes(serialization.Encoding.PEM)
    if args.pem:
        io.stdout.write(pem)
        return 0
    d = record_dict(record)
    if args.json:
        d["pem"] = pem.decode("ascii")
        print_json(d, io.stdout)
        return 0
    for k, v in d.items():
        io.write(f"{k}: {', '.join(v) if isinstance(v, list) else v}\n")
    io.stdout.write(pem)
    return 0


def remove_command(args: argparse.Namespace, io: IO) -> int:
    with configured_store(args) as (_, store):
        fp = _full(store, args.fingerprint)
        store.remove_certificate(fp, actor=actor())
    if args.json:
        print_json({"removed": fp}, io.stdout)
    else:
        io.write(f"removed {fp}\n")
    return 0
