"""The original bytes of every indexed message, stored by their SHA-256.

An eDiscovery export must produce the message as it was stored, with a hash that
proves it, years after the mailbox was cleaned up or the IMAP server migrated. So
the archive keeps its own copy, content-addressed under ``<index_dir>/originals``
(owner-only directories, files written to a temporary name and renamed). The stored
form is what the mailbox held: encrypted messages stay encrypted here.

Not guaranteed: no compression or deduplication beyond identical bytes; no expiry
(retention is a policy decision this module does not make).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from smimeproxy.archive import ArchiveError
from smimeproxy.archive.index import private_directory

ORIGINALS_DIR = "originals"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Originals:
    """A content-addressed store of message bytes under ``directory``."""

    def __init__(self, index_dir: Path):
        self.root = private_directory(Path(index_dir) / ORIGINALS_DIR)

    def _path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ArchiveError(f"not a SHA-256 digest: {digest[:80]!r}")
        return self.root / digest[:2] / digest[2:]

    def put(self, data: bytes, digest: str | None = None) -> str:
        """Store ``data`` (once) and return its SHA-256 hex digest."""
        digest = digest or sha256_hex(data)
        path = self._path(digest)
        if path.exists():
            return digest
        private_directory(path.parent)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise ArchiveError(f"cannot store an original message: {e.strerror}") from None
        return digest

    def get(self, digest: str) -> bytes:
        """The bytes stored under ``digest``, checked against it (ArchiveError if the
        file is missing or was altered)."""
        path = self._path(digest)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ArchiveError(f"original {digest} is not readable: {e.strerror}") from None
        if sha256_hex(data) != digest:
            raise ArchiveError(f"original {digest} was altered on disk (hash mismatch)")
        return data
