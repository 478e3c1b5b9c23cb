"""``smimeproxy message open|seal``: one message through the engine, keys from files.

Kept apart from :mod:`smimeproxy.cli` so that the argument parser loads fast and the
engine is only imported when a message is processed.
"""

from __future__ import annotations

import argparse
import socket
import sys
from typing import BinaryIO

from cryptography import x509

from smimeproxy.cli import _read_file, print_json
from smimeproxy.errors import CertificateError, ConfigError, SMIMEProxyError
from smimeproxy.pki.validation import PathValidator, RevocationPolicy
from smimeproxy.smime.keys import (
    KeyPair,
    SoftwareKey,
    load_certificates,
    load_pkcs12,
    load_private_key,
    pair_keys,
)
from smimeproxy.smime.opener import OpenOptions, open_message
from smimeproxy.smime.sealer import SealOptions, seal
from smimeproxy.smime.status import SMIMEResult


def _password(args: argparse.Namespace) -> bytes | None:
    if not getattr(args, "password_file", None):
        return None
    data = _read_file(args.password_file)
    return data.splitlines()[0] if data else b""


def _load_crl(data: bytes) -> x509.CertificateRevocationList:
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as e:
        raise CertificateError(f"not a CRL: {e}") from None


def _key_pairs(args: argparse.Namespace) -> list[KeyPair]:
    password = _password(args)
    pairs: list[KeyPair] = []
    for path in args.pkcs12:
        key, cert, _ = load_pkcs12(_read_file(path), password)
        if key is None or cert is None:
            raise CertificateError(f"{path}: PKCS#12 without a key and its certificate")
        pairs.append(KeyPair(cert, key))
    keys: list[SoftwareKey] = [load_private_key(_read_file(p), password) for p in args.key]
    certs = [c for p in args.cert for c in load_certificates(_read_file(p))]
    matched = pair_keys(keys, certs)
    if keys and len({id(p.key) for p in matched}) < len(keys):
        raise CertificateError("a --key has no matching --cert (give the certificate of every key)")
    return pairs + matched


def _validator(args: argparse.Namespace) -> PathValidator:
    anchors: list[x509.Certificate] = []
    intermediates: list[x509.Certificate] = []
    for path in args.trust:
        for cert in load_certificates(_read_file(path)):
            (anchors if cert.issuer == cert.subject else intermediates).append(cert)
    crls = [_load_crl(_read_file(p)) for p in args.crl]
    return PathValidator(anchors, intermediates, crls, revocation=RevocationPolicy(args.revocation))


def _summary(status_dict: dict) -> str:  # type: ignore[type-arg]
    parts = [f"smime={status_dict['smime']}"]
    if status_dict.get("identifier"):
        parts.append(f"signer={status_dict['identifier']}")
    if status_dict.get("encrypted"):
        dec = status_dict["decryption"] or {}
        parts.append("decrypted" if dec.get("decrypted") else "NOT decrypted")
    for err in status_dict.get("errors", []):
        parts.append(f"error: {err}")
    return "; ".join(parts)


def open_command(args: argparse.Namespace, stdin: BinaryIO, stdout: BinaryIO) -> int:
    if args.as_address:
        raise ConfigError(
            "--as needs the key store, which this build does not have yet", key="message open --as"
        )
    pairs = _key_pairs(args)
    options = OpenOptions(
        authserv_id=args.authserv_id or socket.getfqdn() or "localhost",
        footer=not args.no_footer,
    )
    opened = open_message(stdin.read(), keys=pairs, validator=_validator(args), options=options)
    status = opened.status
    if args.json:
        print_json(status.as_dict(), stdout)
    else:
        stdout.write(opened.data)
    stdout.flush()
    if sys.stderr.isatty():
        print(_summary(status.as_dict()), file=sys.stderr)
    if status.decryption is not None and not status.decryption.decrypted:
        return 3
    if status.malformed or status.errors:
        return 1
    return 0 if status.smime_result in (SMIMEResult.PASS, SMIMEResult.NONE) else 1


def seal_command(args: argparse.Namespace, stdin: BinaryIO, stdout: BinaryIO) -> int:
    if args.from_address or args.to:
        raise ConfigError(
            "--from/--to need the key store, which this build does not have yet",
            key="message seal --from/--to",
        )
    signer: KeyPair | None = None
    if not args.no_sign:
        password = _password(args)
        if args.pkcs12:
            key, cert, _ = load_pkcs12(_read_file(args.pkcs12), password)
            if key is None or cert is None:
                raise CertificateError(f"{args.pkcs12}: PKCS#12 without a key and certificate")
            signer = KeyPair(cert, key)
        elif args.sign_key and args.sign_cert:
            key = load_private_key(_read_file(args.sign_key), password)
            certs = load_certificates(_read_file(args.sign_cert))
            matched = pair_keys([key], certs)
            if not matched:
                raise CertificateError("--sign-key does not belong to --sign-cert")
            signer = matched[0]
        else:
            raise SMIMEProxyError("give --sign-key and --sign-cert (or --pkcs12), or --no-sign")
    recipients = [c for p in args.encrypt_to for c in load_certificates(_read_file(p))]
    if signer is None and not recipients:
        raise SMIMEProxyError("--no-sign without --encrypt-to leaves nothing to do")
    chain = [c for p in args.chain for c in load_certificates(_read_file(p))]
    options = SealOptions(
        detached=not args.opaque,
        digest=args.digest,
        pss=args.pss,
        cipher=args.cipher.replace("-", "_") if args.cipher else None,
        oaep=args.oaep,
        header_protection=args.header_protection,
    )
    stdout.write(
        seal(stdin.read(), signer=signer, chain=chain, recipients=recipients, options=options)
    )
    stdout.flush()
    return 0
