"""``smimeproxy message open|seal``: one message through the engine.

Keys, certificates and trust come from files (``--key``, ``--cert``, ``--trust`` ...),
or from the key store with ``--config`` and ``--as`` / ``--from`` / ``--to``.
"""

from __future__ import annotations

import argparse
import dataclasses
import socket
import sys
from typing import Any

from cryptography import x509

from smimeproxy.commands.common import IO, load_crl, print_json, read_file
from smimeproxy.commands.store_ops import configured_store, password_from
from smimeproxy.errors import CertificateError, ConfigError, SMIMEProxyError
from smimeproxy.pki.validation import PathValidator, RevocationPolicy
from smimeproxy.processing import MessageProcessor
from smimeproxy.smime.keys import (
    KeyPair,
    SoftwareKey,
    load_certificates,
    load_pkcs12,
    load_private_key,
    pair_keys,
)
from smimeproxy.smime.opener import OpenedMessage, OpenOptions, open_message
from smimeproxy.smime.sealer import SealOptions, seal
from smimeproxy.smime.status import SMIMEResult

OPEN_EXIT_STATUS = """\
exit status:
  0  opened: decrypted where encrypted, and every signature verified (smime=pass),
     or the message was not signed (smime=none)
  1  written, but flagged: a signature that did not verify or is not trusted
     (fail, policy, neutral, temperror, permerror), or a refused or malformed part
  2  usage error (bad arguments)
  3  could not be decrypted with the keys given: the message was written unchanged
  4  a key, certificate or configuration file could not be used
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    message = sub.add_parser(
        "message",
        help="open (decrypt and verify) or seal (sign and encrypt) one message",
        description="Process one RFC 5322 message from standard input to standard output.",
    )
    msub = message.add_subparsers(dest="action", required=True, metavar="open|seal")

    op = msub.add_parser(
        "open",
        help="decrypt and verify a message as its recipient should see it",
        description=(
            "Read a message on standard input; write it decrypted, with an "
            "Authentication-Results header (RFC 8601/7281), a decryption header and a "
            "footer saying what was verified. A message that cannot be decrypted is "
            "written unchanged, with its status."
        ),
        epilog=OPEN_EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    op.add_argument(
        "--as",
        dest="as_address",
        metavar="ADDRESS",
        help="open with ADDRESS's keys from the key store (needs --config)",
    )
    op.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="KEY",
        help="private key file (PEM or DER; repeat for historical keys)",
    )
    op.add_argument(
        "--cert",
        action="append",
        default=[],
        metavar="CERT",
        help="certificate(s) matching --key (PEM, DER or PKCS#7)",
    )
    op.add_argument(
        "--pkcs12",
        action="append",
        default=[],
        metavar="P12",
        help="PKCS#12 file with key and certificate (password from --password-file)",
    )
    op.add_argument(
        "--password-file",
        metavar="FILE",
        help="file whose first line is the password of --pkcs12 / encrypted keys",
    )
    op.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="CA.pem",
        help="trust anchor(s); others in the file become intermediates",
    )
    op.add_argument(
        "--crl",
        action="append",
        default=[],
        metavar="FILE",
        help="certificate revocation list(s), PEM or DER",
    )
    op.add_argument(
        "--revocation",
        choices=("require", "soft-fail", "off"),
        default=None,
        help="what an unknown revocation status means (default: soft-fail, shown; with"
        " --as, the config's smime.revocation)",
    )
    op.add_argument(
        "--authserv-id",
        default=None,
        help="authserv-id for Authentication-Results (default: this host's name)",
    )
    op.add_argument("--no-footer", action="store_true", help="do not add the human footer")
    op.add_argument(
        "--json", action="store_true", help="print the status object as JSON instead of the message"
    )

    se = msub.add_parser(
        "seal",
        help="sign and/or encrypt a message",
        description=(
            "Read a message on standard input; write it signed (detached multipart/signed "
            "by default) and, with --encrypt-to, encrypted (AES-256-CBC, or AES-GCM when "
            "asked). Remember to encrypt to your own certificate too if you want to read "
            "your copy."
        ),
    )
    se.add_argument(
        "--from",
        dest="from_address",
        metavar="ADDRESS",
        help="sign with ADDRESS's current key from the key store (needs --config)",
    )
    se.add_argument(
        "--to",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="encrypt to ADDRESS's certificate from the key store (needs --config)",
    )
    se.add_argument("--sign-key", metavar="KEY", help="signing private key (PEM or DER)")
    se.add_argument("--sign-cert", metavar="CERT", help="the signer's certificate")
    se.add_argument("--pkcs12", metavar="P12", help="signing key and certificate as PKCS#12")
    se.add_argument("--password-file", metavar="FILE", help="password of --pkcs12 / the key")
    se.add_argument(
        "--chain",
        action="append",
        default=[],
        metavar="CERT",
        help="intermediate certificate(s) to include with the signature",
    )
    se.add_argument(
        "--encrypt-to",
        action="append",
        default=[],
        metavar="CERT",
        help="recipient certificate (repeat for several recipients)",
    )
    se.add_argument(
        "--opaque", action="store_true", help="opaque signed-data instead of multipart/signed"
    )
    se.add_argument(
        "--cipher",
        choices=("aes256-gcm", "aes256-cbc", "aes128-gcm", "aes128-cbc"),
        help="content encryption (default: aes256-cbc, RFC 8551 2.7)",
    )
    se.add_argument("--digest", choices=("sha256", "sha384", "sha512"), default="sha256")
    se.add_argument("--pss", action="store_true", help="RSASSA-PSS instead of PKCS#1 v1.5")
    se.add_argument("--oaep", action="store_true", help="RSAES-OAEP key transport")
    se.add_argument("--no-sign", action="store_true", help="encrypt only")
    se.add_argument(
        "--header-protection",
        action="store_true",
        help="protect Subject, From, To ... inside the envelope (RFC 9788)",
    )
    op.set_defaults(func=open_command)
    se.set_defaults(func=seal_command)


def _key_pairs(args: argparse.Namespace) -> list[KeyPair]:
    password = password_from(args.password_file)
    pairs: list[KeyPair] = []
    for path in args.pkcs12:
        key, cert, _ = load_pkcs12(read_file(path), password)
        if key is None or cert is None:
            raise CertificateError(f"{path}: PKCS#12 without a key and its certificate")
        pairs.append(KeyPair(cert, key))
    keys: list[SoftwareKey] = [load_private_key(read_file(p), password) for p in args.key]
    certs = [c for p in args.cert for c in load_certificates(read_file(p))]
    matched = pair_keys(keys, certs)
    if keys and len({id(p.key) for p in matched}) < len(keys):
        raise CertificateError("a --key has no matching --cert (give the certificate of every key)")
    return pairs + matched


def _validator(args: argparse.Namespace) -> PathValidator:
    anchors: list[x509.Certificate] = []
    intermediates: list[x509.Certificate] = []
    for path in args.trust:
        for cert in load_certificates(read_file(path)):
            (anchors if cert.issuer == cert.subject else intermediates).append(cert)
    crls = [load_crl(p) for p in args.crl]
    return PathValidator(
        anchors, intermediates, crls, revocation=RevocationPolicy(args.revocation or "soft-fail")
    )


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


def _open_from_store(args: argparse.Namespace, data: bytes) -> OpenedMessage:
    """Open with ``--as``'s whole key history, the store's trust and CRLs (harvesting
    verified signers' certificates), as the gateway would."""
    if args.key or args.cert or args.pkcs12 or args.trust or args.crl:
        raise ConfigError(
            "--as takes keys, trust and CRLs from the key store; drop --key/--cert/--pkcs12/"
            "--trust/--crl",
            key="message open --as",
        )
    with configured_store(args) as (config, store):
        store.user(args.as_address)  # KeyNotFound for an unknown user, not a silent no-key
        settings = config.smime
        overrides: dict[str, Any] = {}
        if args.revocation:
            overrides["revocation"] = args.revocation
        if args.authserv_id:
            overrides["authserv_id"] = args.authserv_id
        if args.no_footer:
            overrides["footer"] = False
        processor = MessageProcessor(store, dataclasses.replace(settings, **overrides))
        return processor.open_for(data, [args.as_address])


def open_command(args: argparse.Namespace, io: IO) -> int:
    stdin, stdout = io.stdin, io.stdout
    if args.as_address:
        opened = _open_from_store(args, stdin.read())
    else:
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


def _seal_from_store(args: argparse.Namespace, data: bytes) -> bytes:
    """Sign with ``--from``'s current key and encrypt to every ``--to`` (and to the
    sender, so their copy stays readable), certificates validated with the store's
    trust; a recipient without a usable certificate is an error naming them."""
    if not args.from_address:
        raise ConfigError("--to needs --from ADDRESS (the sender)", key="message seal --to")
    if args.sign_key or args.sign_cert or args.pkcs12 or args.encrypt_to:
        raise ConfigError(
            "--from/--to take keys and certificates from the key store; drop --sign-key/"
            "--sign-cert/--pkcs12/--encrypt-to",
            key="message seal --from",
        )
    with configured_store(args) as (config, store):
        overrides: dict[str, Any] = {"header_protection": args.header_protection}
        if args.cipher:
            overrides["cipher"] = args.cipher
        if args.digest != "sha256":
            overrides["signing_digest"] = args.digest
        processor = MessageProcessor(store, dataclasses.replace(config.smime, **overrides))
        result = processor.seal_for(
            data, args.from_address, args.to, sign=not args.no_sign, encrypt=bool(args.to)
        )
    return result.data


def seal_command(args: argparse.Namespace, io: IO) -> int:
    stdin, stdout = io.stdin, io.stdout
    if args.from_address or args.to:
        stdout.write(_seal_from_store(args, stdin.read()))
        stdout.flush()
        return 0
    signer: KeyPair | None = None
    if not args.no_sign:
        password = password_from(args.password_file)
        if args.pkcs12:
            key, cert, _ = load_pkcs12(read_file(args.pkcs12), password)
            if key is None or cert is None:
                raise CertificateError(f"{args.pkcs12}: PKCS#12 without a key and certificate")
            signer = KeyPair(cert, key)
        elif args.sign_key and args.sign_cert:
            key = load_private_key(read_file(args.sign_key), password)
            certs = load_certificates(read_file(args.sign_cert))
            matched = pair_keys([key], certs)
            if not matched:
                raise CertificateError("--sign-key does not belong to --sign-cert")
            signer = matched[0]
        else:
            raise SMIMEProxyError("give --sign-key and --sign-cert (or --pkcs12), or --no-sign")
    recipients = [c for p in args.encrypt_to for c in load_certificates(read_file(p))]
    if signer is None and not recipients:
        raise SMIMEProxyError("--no-sign without --encrypt-to leaves nothing to do")
    chain = [c for p in args.chain for c in load_certificates(read_file(p))]
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
