"""``smimeproxy ca init|show|issue|list|revoke|crl``: the internal certificate authority.

``ca init`` makes a root (and with ``--issuing`` an issuing CA under it, which then
issues every user certificate), seals the CA keys in the key store like users' keys,
and trusts the root. ``keys generate`` has this CA certify new keys; ``ca issue --csr``
certifies an external key. ``ca revoke`` marks a certificate revoked (and its key, if
the store holds it); ``ca crl`` signs a fresh CRL, stores it so that validation on
every node uses it at once, and writes it out for publication.

Serial numbers are hexadecimal, as ``openssl x509 -serial`` prints them.
"""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from cryptography.hazmat.primitives import serialization

from smimeproxy.commands.common import IO, print_json, read_file, table
from smimeproxy.commands.store_ops import actor, configured_store, short, when, write_public
from smimeproxy.errors import KeyNotFound, SMIMEProxyError
from smimeproxy.keystore import KeyState
from smimeproxy.keystore.ca_state import CAState, IssuedRecord, parse_serial, serial_text
from smimeproxy.pki.ca import CA_KEY_KINDS, REASONS, load_csr
from smimeproxy.smime.status import fingerprint


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("ca", help="the internal certificate authority")
    s = p.add_subparsers(dest="action", required=True, metavar="init|show|issue|list|revoke|crl")

    i = s.add_parser("init", help="create the internal root (and an issuing CA)")
    i.add_argument("--name", default="smimeproxy root CA", help="the root's common name")
    i.add_argument(
        "--issuing",
        nargs="?",
        const="smimeproxy issuing CA",
        default=None,
        metavar="NAME",
        help="also create an issuing CA under the root (it then issues user certificates)",
    )
    i.add_argument("--kind", choices=CA_KEY_KINDS, default="p256", help="CA key type")
    i.add_argument("--days", type=int, default=3650, help="root validity (days)")
    i.add_argument(
        "--crl-url",
        default=None,
        metavar="TEMPLATE",
        help="CRL distribution point for issued certificates, e.g. "
        "http://pki.acme.test/crl/{ca_key_id}.crl",
    )
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=init_command)

    sh = s.add_parser("show", help="the CA certificates")
    sh.add_argument("--pem", action="store_true", help="print the CA certificates as PEM")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=show_command)

    iss = s.add_parser("issue", help="certify an external key from its PKCS#10 request")
    iss.add_argument("--csr", required=True, metavar="FILE", help="the request (PEM or DER)")
    iss.add_argument("--out", metavar="FILE", help="write the certificate here (else stdout)")
    iss.set_defaults(func=issue_command)

    ls = s.add_parser("list", help="certificates the CA issued")
    ls.add_argument("--address", default=None)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=list_command)

    r = s.add_parser("revoke", help="revoke a certificate by serial, or a user's current one")
    r.add_argument("serial", nargs="?", help="serial number (hex)")
    r.add_argument("--user", metavar="ADDRESS", help="revoke this user's current certificate")
    r.add_argument(
        "--reason", default=None, help=f"RFC 5280 reason: {', '.join(REASONS)} (default none)"
    )
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=revoke_command)

    c = s.add_parser("crl", help="sign a fresh CRL, store it, and write it out")
    c.add_argument("--out", metavar="FILE", help="write the CRL here (else stdout)")
    c.add_argument("--der", action="store_true", help="DER instead of PEM")
    c.add_argument("--days", type=int, default=7, help="days until nextUpdate (default 7)")
    c.set_defaults(func=crl_command)


def issued_dict(r: IssuedRecord) -> dict[str, Any]:
    return {
        "serial": serial_text(r.serial),
        "issuer": r.issuer,
        "fingerprint": r.fingerprint,
        "subject": r.subject,
        "issued": r.issued.isoformat(),
        "not_after": r.not_after.isoformat(),
        "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
        "reason": r.reason,
    }


def init_command(args: argparse.Namespace, io: IO) -> int:
    with configured_store(args) as (_, store):
        made = CAState(store).init(
            args.name,
            key_kind=args.kind,
            valid_days=args.days,
            issuing_name=args.issuing,
            crl_url_template=args.crl_url,
            actor=actor(),
        )
    out = {
        name: {"subject": c.subject.rfc4514_string(), "fingerprint": fingerprint(c)}
        for name, c in made.items()
    }
    if args.json:
        print_json(out, io.stdout)
    else:
        for name, d in out.items():
            io.write(f"created {name} CA: {d['subject']} ({short(d['fingerprint'])})\n")
        io.write("the root is now a trust anchor of this store\n")
    return 0


def show_command(args: argparse.Namespace, io: IO) -> int:
    with configured_store(args) as (_, store):
        certs = CAState(store).certificates()
    if not certs:
        raise KeyNotFound("this key store has no internal CA yet (run smimeproxy ca init)")
    if args.pem:
        for name in ("issuing", "root"):
            if name in certs:
                io.stdout.write(certs[name].public_bytes(serialization.Encoding.PEM))
        return 0
    out = {
        name: {
            "subject": c.subject.rfc4514_string(),
            "fingerprint": fingerprint(c),
            "not_after": c.not_valid_after_utc.isoformat(),
        }
        for name, c in certs.items()
    }
    if args.json:
        print_json(out, io.stdout)
    else:
        rows = [(n, d["subject"], short(d["fingerprint"]), d["not_after"]) for n, d in out.items()]
        io.write(table(rows, ("ca", "subject", "fingerprint", "valid until")))
    return 0


def issue_command(args: argparse.Namespace, io: IO) -> int:
    csr = load_csr(read_file(args.csr))
    with configured_store(args) as (_, store):
        cert = CAState(store).issue_for_csr(csr, actor=actor())
    pem = cert.public_bytes(serialization.Encoding.PEM)
    if args.out:
        write_public(args.out, pem)
        io.error(f"issued serial {serial_text(cert.serial_number)}, written to {args.out}")
    else:
        io.stdout.write(pem)
    return 0


def list_command(args: argparse.Namespace, io: IO) -> int:
    with configured_store(args) as (_, store):
        records = CAState(store).issued(args.address)
    if args.json:
        print_json([issued_dict(r) for r in records], io.stdout)
        return 0
    rows = [
        (
            serial_text(r.serial),
            r.subject,
            r.issuer,
            when(r.issued),
            when(r.not_after),
            f"revoked ({r.reason})" if r.revoked else "",
        )
        for r in records
    ]
    io.write(table(rows, ("serial", "subject", "issuer", "issued", "valid until", "status")))
    return 0


def revoke_command(args: argparse.Namespace, io: IO) -> int:
    if bool(args.serial) == bool(args.user):
        raise SMIMEProxyError("give either a SERIAL or --user ADDRESS")
    with configured_store(args) as (_, store):
        ca = CAState(store)
        if args.user:
            current = [k for k in store.keys(args.user) if k.state is KeyState.CURRENT]
            if not current:
                raise KeyNotFound(f"{args.user} has no current key to revoke")
            serial = current[0].certificate.serial_number
            try:
                ca.issued_by_serial(serial)
            except KeyNotFound:
                # not ours: the key is withdrawn here, the external CA must revoke it
                store.revoke_key(current[0].id, args.reason or "unspecified", actor=actor())
                io.write(
                    f"revoked key {short(current[0].id)} of {args.user}; its certificate was"
                    " not issued by the internal CA: ask its issuer to revoke it\n"
                )
                return 0
        else:
            serial = parse_serial(args.serial)
        record, key_id = ca.revoke(serial, args.reason, actor=actor())
    if args.json:
        d = issued_dict(record)
        d["key"] = key_id
        print_json(d, io.stdout)
    else:
        io.write(
            f"revoked serial {serial_text(record.serial)} ({record.subject}): {record.reason}\n"
        )
        if key_id:
            io.write(f"key {short(key_id)} is now revoked (it still decrypts old mail)\n")
        io.write("run smimeproxy ca crl to publish a new CRL\n")
    return 0


def crl_command(args: argparse.Namespace, io: IO) -> int:
    if args.days < 1:
        raise SMIMEProxyError("--days must be at least 1")
    with configured_store(args) as (_, store):
        crl = CAState(store).make_crl(next_update=datetime.timedelta(days=args.days), actor=actor())
    data = crl.public_bytes(serialization.Encoding.DER if args.der else serialization.Encoding.PEM)
    if args.out:
        write_public(args.out, data)
        io.error(f"CRL with {len(crl)} revoked certificate(s) written to {args.out}")
    else:
        io.stdout.write(data)
    return 0
