"""The ``smimeproxy`` command: administration and message processing.

Every command takes ``--config FILE`` before the subcommand (DESIGN.md, "The contract");
``message open`` and ``message seal`` also work from files without a config.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from smimeproxy import __version__
from smimeproxy.errors import SMIMEProxyError

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


def _read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SMIMEProxyError(f"{path}: {e.strerror}") from None


def _message_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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
        default="soft-fail",
        help="what an unknown revocation status means (default: soft-fail, shown)",
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smimeproxy",
        description="Gateway-level S/MIME: key store, message processing and administration.",
    )
    parser.add_argument("--version", action="version", version=f"smimeproxy {__version__}")
    parser.add_argument("--config", metavar="FILE", help="the smimeproxy TOML configuration")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _message_parser(sub)
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    try:
        if args.command == "message":
            from smimeproxy import message_cli

            if args.action == "open":
                return message_cli.open_command(args, stdin, stdout)
            return message_cli.seal_command(args, stdin, stdout)
    except SMIMEProxyError as e:
        print(f"smimeproxy: {e}", file=sys.stderr)
        return 4
    parser.error(f"unknown command {args.command}")
    return 2


def print_json(data: object, out: BinaryIO) -> None:
    out.write(json.dumps(data, indent=2, sort_keys=True, default=str).encode() + b"\n")


if __name__ == "__main__":
    sys.exit(main())
