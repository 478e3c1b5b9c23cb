"""The engine alone, no servers (``python -m smimeproxy.demo --engine-only``).

A demo CA issues certificates to Alice (our organisation, ``acme.test``) and Bob (a
partner, ``partner.test``); Bob's mail client signs and encrypts a message to Alice;
the gateway engine opens it with Alice's key and shows what the reader would see and
what was verified; then it seals Alice's reply, which ``openssl cms`` decrypts and
verifies on the other side, to show the output is standard S/MIME.

Everything is written to ``var/demo/`` (certificates, keys, messages) so that the
files can be inspected and fed to other tools. The whole product (gateway, IMAP proxy,
archive, directory, metrics) is the package's main walkthrough, see
:mod:`smimeproxy.demo`.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import shutil
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from smimeproxy.pki.ca import create_root, generate_user_key, issue_user_certificate
from smimeproxy.pki.validation import PathValidator
from smimeproxy.smime.keys import KeyPair, SoftwareKey
from smimeproxy.smime.opener import OpenOptions, open_message
from smimeproxy.smime.sealer import SealOptions, seal

INBOUND = b"""\
From: Bob Babbage <bob@partner.test>\r
To: Alice <alice@acme.test>\r
Subject: Contract draft, version 3\r
Date: Sat, 28 Nov 2026 09:30:00 +0000\r
Message-ID: <draft3@partner.test>\r
Content-Type: text/plain; charset=utf-8\r
\r
Hello Alice,\r
\r
here is the third draft of the contract; clause 7 now caps liability at EUR 2m.\r
\r
Bob\r
"""

REPLY = b"""\
From: Alice <alice@acme.test>\r
To: Bob Babbage <bob@partner.test>\r
Subject: Re: Contract draft, version 3\r
Date: Sat, 28 Nov 2026 10:05:00 +0000\r
Content-Type: text/plain; charset=utf-8\r
\r
Thanks Bob, agreed. Alice\r
"""


def _pem_key(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _show(title: str, data: bytes, limit: int = 40) -> None:
    print(f"\n=== {title} " + "=" * max(0, 66 - len(title)))
    lines = data.decode("utf-8", "replace").splitlines()
    for line in lines[:limit]:
        print("  " + line)
    if len(lines) > limit:
        print(f"  ... ({len(lines) - limit} more lines)")


def _reader_view(data: bytes) -> bytes:
    """Headers a reader sees and the text parts, decoded, as a mail client shows them."""
    msg = email.message_from_bytes(data, policy=email.policy.default)
    lines = []
    for name in ("From", "To", "Subject", "Authentication-Results", "X-SMIMEProxy-Decryption"):
        if msg[name]:
            lines.append(f"{name}: {msg[name]}")
    lines.append("")
    for part in msg.walk():
        if part.get_content_type() == "text/plain":
            lines.append(part.get_content().rstrip())
            lines.append("")
    return "\n".join(lines).encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="var/demo", help="where to write the demo files")
    args = parser.parse_args(argv)
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)

    print("smimeproxy demo: a demo CA, Alice at acme.test and Bob at partner.test")
    ca_key, ca_cert = create_root("smimeproxy Demo CA", key_kind="p256")
    people = {}
    for name, address in (("alice", "alice@acme.test"), ("bob", "bob@partner.test")):
        key = generate_user_key("rsa2048")
        cert = issue_user_certificate(ca_key, ca_cert, key.public_key(), [address])  # type: ignore[arg-type]
        people[name] = KeyPair(cert, SoftwareKey(key))
        (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (out / f"{name}.key").write_bytes(_pem_key(key))
        (out / f"{name}.key").chmod(0o600)
    (out / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    alice, bob = people["alice"], people["bob"]
    inbound = seal(
        INBOUND,
        signer=bob,
        recipients=[alice.certificate, bob.certificate],
        options=SealOptions(cipher="aes256_gcm"),
    )
    (out / "inbound.eml").write_bytes(inbound)
    _show("1. what arrives from the internet (signed, then encrypted by Bob)", inbound, 18)

    opened = open_message(
        inbound,
        keys=[alice],
        validator=PathValidator([ca_cert]),
        options=OpenOptions(authserv_id="acme.test"),
    )
    (out / "inbound.opened.eml").write_bytes(opened.data)
    _show(
        "2. what Alice reads after the gateway (decrypted, verified, footer)",
        _reader_view(opened.data),
        60,
    )
    status = opened.status
    print("\n=== 3. the status the gateway found " + "=" * 32)
    print(f"  {'smime result':<22}{status.smime_result}")
    print(f"  {'signer':<22}{status.identifier}")
    print(f"  {'layers':<22}{' > '.join(status.layers)}")
    if status.decryption:
        print(f"  {'cipher':<22}{status.decryption.cipher} ({status.decryption.key_algorithm})")
    print(f"  {'integrity protected':<22}{status.integrity_protected}")

    reply = seal(REPLY, signer=alice, recipients=[bob.certificate, alice.certificate])
    (out / "reply.eml").write_bytes(reply)
    print("\n=== 4. Alice's reply, sealed by the gateway, opened by OpenSSL " + "=" * 5)
    openssl = shutil.which("openssl")
    if openssl is None:
        print("  (openssl is not installed; skipping the independent check)")
    else:
        dec = subprocess.run(
            [
                openssl,
                "cms",
                "-decrypt",
                "-in",
                str(out / "reply.eml"),
                "-recip",
                str(out / "bob.pem"),
                "-inkey",
                str(out / "bob.key"),
            ],
            capture_output=True,
            check=True,
        ).stdout
        ver = subprocess.run(
            [openssl, "cms", "-verify", "-CAfile", str(out / "ca.pem"), "-purpose", "smimesign"],
            input=dec,
            capture_output=True,
        )
        print("  openssl cms -decrypt | openssl cms -verify: " + ver.stderr.decode().strip())
        print("  plaintext: " + ver.stdout.decode().strip().splitlines()[-1])
    print(
        f"\nFiles are in {out}/ (try: smimeproxy message open --key {out}/alice.key "
        f"--cert {out}/alice.pem --trust {out}/ca.pem < {out}/inbound.eml)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
