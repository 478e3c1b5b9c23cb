"""Putting a key into a throwaway gpgsm home, reliably.

gpgsm 2.2 reads only PBES1/3DES PKCS#12, and now and then fails to decrypt one it was
given ("error parsing or decrypting the PKCS#12 file"; seen for about 1 salt in 12
here). That is setup, not what the tests check, so each attempt uses a fresh salt.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import PrivateFormat, pkcs12

PASSWORD = b"pw"


def import_pkcs12(
    gpgsm: str,
    env: dict[str, str],
    key: PrivateKeyTypes,
    certificate: x509.Certificate,
    chain: Sequence[x509.Certificate] = (),
    *,
    attempts: int = 8,
) -> None:
    """Import ``key`` and ``certificate`` (and ``chain``) into the gpgsm home of ``env``."""
    last = b""
    for _ in range(attempts):
        encryption = (
            PrivateFormat.PKCS12.encryption_builder()
            .kdf_rounds(2048)
            .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
            .hmac_hash(hashes.SHA1())
            .build(PASSWORD)
        )
        blob = pkcs12.serialize_key_and_certificates(
            b"key",
            key,
            certificate,
            list(chain) or None,
            encryption,  # type: ignore[arg-type]
        )
        with tempfile.TemporaryDirectory() as tmp:
            p12 = Path(tmp) / "key.p12"
            p12.write_bytes(blob)
            done = subprocess.run(
                [gpgsm, "--batch", "--pinentry-mode", "loopback", "--passphrase-fd", "0",
                 "--import", str(p12)],
                input=PASSWORD + b"\n",
                capture_output=True,
                env=env,
                check=False,
                timeout=60,
            )  # fmt: skip
        if done.returncode == 0:
            return
        last = done.stderr
    raise AssertionError(f"gpgsm could not import the key: {last.decode(errors='replace')}")
