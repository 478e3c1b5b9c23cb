"""``smimeproxy keys generate|import|list|rotate|reseal|export-cert|export-key``.

Users' private keys with their whole history. Generating a key has the internal CA
certify it (``ca init`` first), or writes a CSR for an external CA (``--csr-out``) and
keeps the key pending until ``keys import --cert`` brings the certificate back.
Rotation makes a new key and certificate current and keeps the old key (state
``previous``) so that mail encrypted to it stays readable; ``keys rotate --all`` does
every user in one named run that can be interrupted and rerun: users the run already
rotated are skipped. Every private-key export and every bulk operation is audited.
"""

from __future__ import annotations

import argparse
import datetime
import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from smimeproxy.commands.common import IO, print_json, progress, read_file, table
from smimeproxy.commands.store_ops import (
    actor,
    certificates_in,
    configured_store,
    password_from,
    short,
    token_for,
    when,
    write_private,
)
from smimeproxy.commands.trust import is_ca
from smimeproxy.commands.users import key_dict
from smimeproxy.errors import CertificateError, KeyNotFound, SMIMEProxyError
from smimeproxy.keystore import KeyRecord, KeyState, MasterSecret, SyncStore, create_key_file
from smimeproxy.keystore import certificates as certs
from smimeproxy.keystore.ca_state import CAState, reseal
from smimeproxy.pki.ca import USER_KEY_KINDS, generate_user_key, key_kind_of, make_csr
from smimeproxy.smime.keys import load_pkcs12, load_private_key, pair_keys


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("keys", help="users' private keys: generate, import, rotate, export")
    s = p.add_subparsers(
        dest="action",
        required=True,
        metavar="generate|import|list|rotate|republish|reseal|export-cert|export-key",
    )

    g = s.add_parser("generate", help="a new key for a user, certified by the internal CA")
    g.add_argument("--user", required=True, metavar="ADDRESS")
    g.add_argument("--kind", choices=USER_KEY_KINDS, default="rsa2048")
    g.add_argument(
        "--csr-out",
        metavar="FILE",
        help="write a CSR for an external CA instead; the key waits for keys import --cert",
    )
    g.add_argument(
        "--token", action="store_true", help="generate inside the configured PKCS#11 token"
    )
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=generate_command)

    i = s.add_parser(
        "import", help="import a key: PKCS#12, PEM key + certificate, or a certificate alone"
    )
    i.add_argument("--pkcs12", metavar="P12", help="key and certificate as PKCS#12")
    i.add_argument("--password-file", metavar="FILE", help="password of the PKCS#12 / key")
    i.add_argument("--key", metavar="KEY", help="private key (PEM or DER) with --cert")
    i.add_argument(
        "--cert",
        metavar="CERT",
        help="its certificate; alone, the certificate an external CA returned for a "
        "key made by keys generate --csr-out",
    )
    i.add_argument(
        "--previous",
        action="store_true",
        help="keep it as an old key (decrypts only), never the current one",
    )
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=import_command)

    ls = s.add_parser("list", help="keys (all, or one user's), current first")
    ls.add_argument("--user", metavar="ADDRESS")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=list_command)

    r = s.add_parser("rotate", help="new key + certificate for one user or every user")
    who = r.add_mutually_exclusive_group(required=True)
    who.add_argument("--all", action="store_true", help="every user")
    who.add_argument("--user", metavar="ADDRESS")
    r.add_argument("--kind", choices=USER_KEY_KINDS, help="key type (default: as the old key)")
    r.add_argument(
        "--run",
        metavar="NAME",
        help="name of this run; rerunning with the same name skips users already done "
        "(default for --all: rotate-YYYY-MM-DD)",
    )
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=rotate_command)

    rp = s.add_parser(
        "republish",
        help="certificates made by rotation that directories must publish (and mark them done)",
    )
    rp.add_argument(
        "--done", action="append", default=[], metavar="ADDRESS", help="mark ADDRESS published"
    )
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(func=republish_command)

    rs = s.add_parser("reseal", help="re-seal every private key under a new master key")
    rs.add_argument(
        "--new-master-key-file",
        required=True,
        metavar="FILE",
        help="the new master key (created owner-only if it does not exist)",
    )
    rs.add_argument("--json", action="store_true")
    rs.set_defaults(func=reseal_command)

    ec = s.add_parser("export-cert", help="print a user's current certificate (PEM)")
    ec.add_argument("address")
    ec.add_argument("--chain", action="store_true", help="add the intermediates")
    ec.set_defaults(func=export_cert_command)

    ek = s.add_parser("export-key", help="write a private key to a file (audited)")
    ek.add_argument("key_id", nargs="?", help="key id (fingerprint; a unique prefix will do)")
    ek.add_argument("--user", metavar="ADDRESS", help="the user's current key")
    ek.add_argument("--reason", required=True, help="why (recorded in the audit log)")
    ek.add_argument("--out", required=True, metavar="FILE", help="new file, created 0600")
    ek.add_argument(
        "--password-file", metavar="FILE", help="encrypt the PKCS#8 PEM with this password"
    )
    ek.add_argument("--json", action="store_true")
    ek.set_defaults(func=export_key_command)


# -- generate ---------------------------------------------------------------------------


def _addresses_for(store: SyncStore, address: str) -> list[str]:
    user = store.find_user(address)
    return list(user.addresses) if user else [certs.normalise(address)]


def _make_current(
    store: SyncStore, address: str, key: Any, cert: x509.Certificate, hsm_reference: str | None
) -> KeyRecord:
    """Store ``key`` as the user's current key (a rotation if they had one)."""
    user = store.find_user(address)
    has_current = user is not None and any(
        k.state is KeyState.CURRENT for k in store.keys(user.address)
    )
    if has_current:
        return store.rotate(address, key, cert, hsm_reference=hsm_reference, actor=actor())
    return store.import_key(key, cert, current=True, hsm_reference=hsm_reference, actor=actor())


def generate_command(args: argparse.Namespace, io: IO) -> int:
    if args.token and args.csr_out:
        raise SMIMEProxyError("--token and --csr-out do not go together yet")
    with configured_store(args) as (config, store):
        ca = CAState(store)
        addresses = _addresses_for(store, args.user)
        if args.csr_out:
            key = generate_user_key(args.kind)
            csr = make_csr(key, addresses)
            pid = ca.add_pending(key, addresses[0], actor=actor())
            with open(args.csr_out, "wb") as f:
                f.write(csr.public_bytes(serialization.Encoding.PEM))
            out: dict[str, Any] = {"pending": pid, "address": addresses[0], "csr": args.csr_out}
            if args.json:
                print_json(out, io.stdout)
            else:
                io.write(
                    f"wrote {args.csr_out}; import the certificate the CA returns with"
                    " keys import --cert FILE\n"
                )
            return 0
        if args.token:
            token = token_for(config)
            if token is None:
                raise SMIMEProxyError("--token needs keystore.pkcs11_module in the config")
            try:
                reference, public = token.generate_key(addresses[0], args.kind)
            finally:
                token.close()
            cert = ca.issue(public, addresses, actor=actor())
            record = _make_current(store, addresses[0], None, cert, reference)
        else:
            key = generate_user_key(args.kind)
            cert = ca.issue(key.public_key(), addresses, actor=actor())  # type: ignore[arg-type]
            record = _make_current(store, addresses[0], key, cert, None)
    if args.json:
        print_json({"address": addresses[0], **key_dict(record)}, io.stdout)
    else:
        io.write(
            f"new {args.kind} key {short(record.id)} for {addresses[0]}, certificate serial"
            f" {cert.serial_number:x} valid until {when(cert.not_valid_after_utc)}\n"
        )
    return 0


# -- import -----------------------------------------------------------------------------


def import_command(args: argparse.Namespace, io: IO) -> int:
    password = password_from(args.password_file)
    extra: list[x509.Certificate] = []
    pending_cert: x509.Certificate | None = None
    if args.pkcs12:
        if args.key:
            raise SMIMEProxyError("give --pkcs12 or --key/--cert, not both")
        key, cert, extra = load_pkcs12(read_file(args.pkcs12), password)
        if key is None or cert is None:
            raise CertificateError(f"{args.pkcs12}: no private key with its certificate inside")
        material: Any = key.private_key
    elif args.key:
        if not args.cert:
            raise SMIMEProxyError("--key needs --cert (the key's certificate)")
        soft = load_private_key(read_file(args.key), password)
        found = certificates_in(args.cert)
        pairs = pair_keys([soft], found)
        if not pairs:
            raise CertificateError(f"{args.key} does not belong to any certificate in {args.cert}")
        cert = pairs[0].certificate
        extra = [c for c in found if c is not cert]
        material = soft.private_key
    elif args.cert:
        found = certificates_in(args.cert)
        pending_cert = found[0]
        extra = found[1:]
        cert = pending_cert
        material = None
    else:
        raise SMIMEProxyError("give --pkcs12 P12, --key K --cert C, or --cert C")
    current = False if args.previous else None
    with configured_store(args) as (_, store):
        ca = CAState(store)
        if pending_cert is not None:
            material = ca.pending_key_for(pending_cert)
            if material is None:
                raise KeyNotFound(
                    f"{args.cert}: no pending key matches this certificate (import a key with"
                    " --pkcs12 or --key, or make one with keys generate --csr-out)"
                )
            current = True if not args.previous else False
        record = store.import_key(material, cert, current=current, actor=actor())
        if pending_cert is not None:
            ca.drop_pending(pending_cert)
        intermediates = []
        for c in extra:
            # the file's CA certificates help path building; a root is never trusted
            # just because it came inside a PKCS#12: that takes trust add
            if c.issuer != c.subject and is_ca(c):
                store.add_trust(c, kind=None, actor=actor())
                intermediates.append(c.subject.rfc4514_string())
    out = {"address": certs.certificate_addresses(cert)[0], **key_dict(record)}
    out["intermediates_added"] = intermediates
    if args.json:
        print_json(out, io.stdout)
    else:
        io.write(f"imported key {short(record.id)} for {out['address']} ({record.state})\n")
        for name in intermediates:
            io.write(f"added intermediate: {name}\n")
    return 0


# -- list -------------------------------------------------------------------------------


def list_command(args: argparse.Namespace, io: IO) -> int:
    with configured_store(args) as (_, store):
        records = store.keys(args.user)
        owners = {u.id: u.address for u in store.users()}
    if args.json:
        print_json([{"address": owners.get(k.owner), **key_dict(k)} for k in records], io.stdout)
        return 0
    rows = [
        (
            owners.get(k.owner, k.owner),
            short(k.id),
            str(k.state),
            key_kind_of(k.certificate.public_key()),
            when(k.created),
            when(k.not_after),
            "token" if k.hsm_reference else "sealed",
        )
        for k in records
    ]
    io.write(table(rows, ("address", "key", "state", "kind", "created", "valid until", "held")))
    return 0


# -- rotate -----------------------------------------------------------------------------


def _rotate_one(
    store: SyncStore, ca: CAState, address: str, kind: str | None
) -> tuple[str | None, KeyRecord]:
    old = [k for k in store.keys(address) if k.state is KeyState.CURRENT]
    old_id = old[0].id if old else None
    if old and old[0].hsm_reference:
        raise SMIMEProxyError("key is held in a PKCS#11 token: use keys generate --token")
    use = kind or (key_kind_of(old[0].certificate.public_key()) if old else "rsa2048")
    if use not in USER_KEY_KINDS:
        use = "rsa2048"
    key = generate_user_key(use)
    cert = ca.issue(key.public_key(), _addresses_for(store, address), actor=actor())  # type: ignore[arg-type]
    record = _make_current(store, address, key, cert, None)
    return old_id, record


def rotate_command(args: argparse.Namespace, io: IO) -> int:
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    run = args.run or (f"rotate-{today}" if args.all else None)
    rows: list[dict[str, Any]] = []
    with configured_store(args) as (_, store):
        ca = CAState(store)
        if not ca.initialised():
            raise KeyNotFound("rotation needs the internal CA (run smimeproxy ca init)")
        if args.all:
            users = [u.address for u in store.users()]
        else:
            users = [store.user(args.user).address]
        if run is None:
            run = f"user-{datetime.datetime.now(datetime.UTC).strftime('%Y%m%dT%H%M%S.%fZ')}"
        started = ca.start_run(run)
        done = ca.rotated_in_run(run)
        if args.all:
            store.audit(actor(), "key.rotate.bulk.start", run, {"users": len(users)})
        for address in progress(users, len(users), f"rotating ({run})", io.stderr):
            current = [k for k in store.keys(address) if k.state is KeyState.CURRENT]
            if address in done or (current and current[0].created >= started and args.all):
                # done by this run already (or by a run interrupted before recording)
                new = done.get(address, current[0].id if current else None)
                rows.append(
                    {"address": address, "status": "skipped: already rotated", "old": None,
                     "new": new}
                )  # fmt: skip
                continue
            try:
                old_id, record = _rotate_one(store, ca, address, args.kind)
            except SMIMEProxyError as e:
                rows.append(
                    {"address": address, "status": f"failed: {e}", "old": None, "new": None}
                )
                continue
            ca.record_rotation(run, address, record.id)
            rows.append({"address": address, "status": "rotated", "old": old_id, "new": record.id})
        counts = {
            "rotated": sum(r["status"] == "rotated" for r in rows),
            "skipped": sum(r["status"].startswith("skipped") for r in rows),
            "failed": sum(r["status"].startswith("failed") for r in rows),
        }
        if args.all:
            store.audit(actor(), "key.rotate.bulk", run, counts)
        republish = len(ca.to_republish())
    if args.json:
        print_json({"run": run, **counts, "republish": republish, "users": rows}, io.stdout)
    else:
        io.write(
            table(
                [
                    (r["address"], short(r["old"] or "-"), short(r["new"] or "-"), r["status"])
                    for r in rows
                ],
                ("address", "old key", "new key", "status"),
            )
        )
        io.write(
            f"run {run}: {counts['rotated']} rotated, {counts['skipped']} skipped,"
            f" {counts['failed']} failed; {republish} certificate(s) to republish\n"
        )
    return 4 if counts["failed"] else 0


def republish_command(args: argparse.Namespace, io: IO) -> int:
    with configured_store(args) as (_, store):
        ca = CAState(store)
        for address in args.done:
            if not ca.mark_published(address):
                raise KeyNotFound(f"nothing waits to be republished for {address}")
        pending = ca.to_republish()
    if args.json:
        print_json([{"address": a, "key": k, "run": r} for a, k, r in pending], io.stdout)
    else:
        io.write(table([(a, short(k), r) for a, k, r in pending], ("address", "new key", "run")))
    return 0


# -- reseal, exports ----------------------------------------------------------------------


def reseal_command(args: argparse.Namespace, io: IO) -> int:
    try:
        new = MasterSecret.from_file(args.new_master_key_file)
    except SMIMEProxyError:
        new = create_key_file(args.new_master_key_file)
    with configured_store(args) as (config, store):
        count = reseal(store, new, actor=actor())
    if args.json:
        print_json({"resealed": count, "master": new.origin}, io.stdout)
        return 0
    io.write(
        f"resealed {count} private key(s) under {new.origin}; point keystore.master_key_file"
        f" in {config.path} at it and restart every node\n"
    )
    return 0


def export_cert_command(args: argparse.Namespace, io: IO) -> int:
    with configured_store(args) as (_, store):
        identity_chain: list[x509.Certificate] = []
        current = [k for k in store.keys(args.address) if k.state is KeyState.CURRENT]
        if not current:
            raise KeyNotFound(f"{args.address} has no current certificate")
        if args.chain:
            identity_chain = list(certs.chain_for(current[0].certificate, store.intermediates()))
    for cert in [current[0].certificate, *identity_chain]:
        io.stdout.write(cert.public_bytes(serialization.Encoding.PEM))
    return 0


def export_key_command(args: argparse.Namespace, io: IO) -> int:
    if bool(args.key_id) == bool(args.user):
        raise SMIMEProxyError("give a KEY_ID or --user ADDRESS")
    password = password_from(args.password_file)
    if os.path.lexists(args.out):  # before the export is audited, not after
        raise SMIMEProxyError(f"{args.out} already exists; not overwriting")
    with configured_store(args) as (_, store):
        if args.user:
            current = [k for k in store.keys(args.user) if k.state is KeyState.CURRENT]
            if not current:
                raise KeyNotFound(f"{args.user} has no current key")
            key_id = current[0].id
        else:
            prefix = args.key_id.lower()
            matches = [k.id for k in store.keys() if k.id.startswith(prefix)]
            if len(matches) != 1:
                raise KeyNotFound(
                    f"no key {prefix}" if not matches else f"{prefix} matches several keys"
                )
            key_id = matches[0]
        pem = store.export_key(key_id, reason=args.reason, password=password, actor=actor())
    write_private(args.out, pem)
    if args.json:
        print_json({"key": key_id, "out": args.out, "encrypted": bool(password)}, io.stdout)
        return 0
    io.write(f"exported key {short(key_id)} to {args.out} (audited)\n")
    return 0
