"""``smimeproxy trust add|list``: trust anchors and intermediates.

``trust add BUNDLE`` sorts each certificate by itself: a self-signed one becomes a
trust anchor, any other an intermediate (offered to path building, never trusted on
its own). Certificates that are not CAs are refused: trusting a user certificate
directly would bypass path validation.
"""

from __future__ import annotations

import argparse

from cryptography import x509

from smimeproxy.commands.common import IO, print_json, table
from smimeproxy.commands.store_ops import actor, certificates_in, configured_store, short, when
from smimeproxy.errors import CertificateError
from smimeproxy.keystore import TrustKind


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("trust", help="trust anchors and intermediates")
    s = p.add_subparsers(dest="action", required=True, metavar="add|list")
    a = s.add_parser("add", help="add CA certificates (self-signed -> anchor, else intermediate)")
    a.add_argument("files", nargs="+", metavar="BUNDLE")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=add_command)
    ls = s.add_parser("list", help="trust anchors and intermediates")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=list_command)


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return cert.issuer == cert.subject  # an old v1 root
    except ValueError as e:
        raise CertificateError(f"unreadable extensions: {e}") from None


def add_command(args: argparse.Namespace, io: IO) -> int:
    found = [c for path in args.files for c in certificates_in(path)]
    for cert in found:
        if not is_ca(cert):
            raise CertificateError(
                f"{cert.subject.rfc4514_string()} is not a CA certificate; import partners'"
                " certificates with certs import"
            )
    with configured_store(args) as (_, store):
        records = [store.add_trust(c, actor=actor()) for c in found]
    out = [
        {
            "fingerprint": r.fingerprint,
            "kind": str(r.kind),
            "subject": r.certificate.subject.rfc4514_string(),
        }
        for r in records
    ]
    if args.json:
        print_json(out, io.stdout)
    else:
        for d in out:
            io.write(f"added {d['kind']}: {d['subject']} ({short(d['fingerprint'])})\n")
    return 0


def list_command(args: argparse.Namespace, io: IO) -> int:
    with configured_store(args) as (_, store):
        records = store.trust_records()
    if args.json:
        print_json(
            [
                {
                    "fingerprint": r.fingerprint,
                    "kind": str(r.kind),
                    "subject": r.certificate.subject.rfc4514_string(),
                    "not_after": r.certificate.not_valid_after_utc.isoformat(),
                    "added": r.added.isoformat(),
                }
                for r in records
            ],
            io.stdout,
        )
        return 0
    anchors_first = sorted(records, key=lambda r: r.kind is not TrustKind.ANCHOR)
    rows = [
        (
            str(r.kind),
            r.certificate.subject.rfc4514_string(),
            short(r.fingerprint),
            when(r.certificate.not_valid_after_utc),
        )
        for r in anchors_first
    ]
    io.write(table(rows, ("kind", "subject", "fingerprint", "valid until")))
    return 0
