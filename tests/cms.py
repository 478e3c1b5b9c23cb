"""``openssl cms`` as the independent reader of mail the engine made (test helper)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any


def openssl_decrypt(openssl: str, tmp_path: Path, data: bytes, issued: Any) -> bytes:
    """What ``openssl cms -decrypt`` makes of the S/MIME message ``data`` with the key
    and certificate of ``issued``; fails the test when it cannot."""
    (tmp_path / "in.eml").write_bytes(data)
    (tmp_path / "key.pem").write_bytes(issued.key_pem)
    (tmp_path / "cert.pem").write_bytes(issued.cert_pem)
    out = subprocess.run(
        [openssl, "cms", "-decrypt", "-in", str(tmp_path / "in.eml"),
         "-inkey", str(tmp_path / "key.pem"), "-recip", str(tmp_path / "cert.pem")],
        capture_output=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout


def openssl_verify(openssl: str, tmp_path: Path, data: bytes, root_pem: bytes) -> Any:
    """``openssl cms -verify`` of the signed message ``data`` against ``root_pem``
    (the completed process: the caller asserts on its status and output)."""
    (tmp_path / "signed.eml").write_bytes(data)
    (tmp_path / "root.pem").write_bytes(root_pem)
    return subprocess.run(
        [openssl, "cms", "-verify", "-in", str(tmp_path / "signed.eml"),
         "-CAfile", str(tmp_path / "root.pem"), "-purpose", "any"],
        capture_output=True, check=False,
    )  # fmt: skip
