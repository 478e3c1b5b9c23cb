"""``smimeproxy crl add|list``: certificate revocation lists for validation.

A CRL is accepted only when its signature verifies with a CA certificate the store
trusts (anchor or intermediate) whose subject is the CRL's issuer; an unsigned or
foreign list could otherwise "unrevoke" a certificate. The store keeps the newest CRL
per issuer. Not checked here: the CRL's scope (distribution point); validation does.
"""

from __future__ import annotations

import argparse

from smimeproxy.commands.common import IO, load_crl, print_json, table
from smimeproxy.commands.store_ops import actor, configured_store, when
from smimeproxy.errors import CertificateError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("crl", help="add and list certificate revocation lists")
    s = p.add_subparsers(dest="action", required=True, metavar="add|list")
    a = s.add_parser("add", help="add a CRL (PEM or DER) signed by a trusted CA")
    a.add_argument("files", nargs="+", metavar="CRL")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=add_command)
    ls = s.add_parser("list", help="the newest CRL of each issuer")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=list_command)


def add_command(args: argparse.Namespace, io: IO) -> int:
    crls = [(path, load_crl(path)) for path in args.files]
    results = []
    with configured_store(args) as (_, store):
        issuers = [r.certificate for r in store.trust_records()]
        for path, crl in crls:
            signer = None
            for cert in issuers:
                if cert.subject != crl.issuer:
                    continue
                try:
                    if crl.is_signature_valid(cert.public_key()):  # type: ignore[arg-type]
                        signer = cert
                        break
                except (TypeError, ValueError):
                    continue
            if signer is None:
                raise CertificateError(
                    f"{path}: not signed by a trusted CA named {crl.issuer.rfc4514_string()}"
                    " (add the CA with trust add first)"
                )
            kept = store.add_crl(crl, actor=actor())
            results.append(
                {
                    "file": path,
                    "issuer": crl.issuer.rfc4514_string(),
                    "kept": kept,
                    "revoked": len(crl),
                }
            )
    for r in results if not args.json else ():
        state = "added" if r["kept"] else "not newer than the stored one, kept the stored"
        io.write(f"{state}: CRL of {r['issuer']} ({r['revoked']} revoked)\n")
    if args.json:
        print_json(results, io.stdout)
    return 0


def list_command(args: argparse.Namespace, io: IO) -> int:
    with configured_store(args) as (_, store):
        records = store.crl_records()
    if args.json:
        print_json(
            [
                {
                    "issuer": r.issuer,
                    "this_update": r.this_update.isoformat(),
                    "next_update": r.next_update.isoformat() if r.next_update else None,
                    "revoked": [format(e.serial_number, "x") for e in r.crl],
                }
                for r in records
            ],
            io.stdout,
        )
        return 0
    rows = [(r.issuer, when(r.this_update), when(r.next_update), len(r.crl)) for r in records]
    io.write(table(rows, ("issuer", "this update", "next update", "revoked")))
    return 0
