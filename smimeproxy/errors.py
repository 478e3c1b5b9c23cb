"""One exception tree for the whole product.

Every error smimeproxy raises on purpose derives from :class:`SMIMEProxyError`, so a
protocol layer can turn *any* of them into a protocol reply (4xx, NO, a status header)
with one ``except`` clause, and anything else is a bug.
"""

from __future__ import annotations

from collections.abc import Sequence


class SMIMEProxyError(Exception):
    """Base of every error smimeproxy raises deliberately."""


class ConfigError(SMIMEProxyError):
    """A configuration value is missing or wrong; names the key and the file."""

    def __init__(self, message: str, *, key: str | None = None, path: str | None = None):
        self.key = key
        self.path = path
        where = []
        if path:
            where.append(str(path))
        if key:
            where.append(f"key {key!r}")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class CMSError(SMIMEProxyError):
    """A CMS / S/MIME structure could not be processed."""


class MalformedMessage(CMSError):
    """The input is not well-formed MIME or CMS (truncated, corrupt, too deep, too large)."""


class UnsupportedAlgorithm(CMSError):
    """The message uses an algorithm we do not implement or refuse to use."""


class DecryptionFailed(CMSError):
    """No key we hold opens the message, or the ciphertext is damaged."""


class VerificationFailed(CMSError):
    """A signature or certificate check failed; carries *every* reason, not only the first."""

    def __init__(self, reasons: Sequence[str]):
        self.reasons = tuple(reasons)
        super().__init__("; ".join(self.reasons) or "verification failed")


class KeyNotFound(SMIMEProxyError):
    """No private key or certificate is known for the requested identity."""


class CertificateError(SMIMEProxyError):
    """A certificate, key or bundle could not be loaded or does not fit its purpose."""


class KeystoreError(SMIMEProxyError):
    """The key store failed (database, schema, sealing)."""


class MasterKeyError(KeystoreError):
    """The master secret is missing or is not the one the store was sealed with."""


class SealError(KeystoreError):
    """A sealed private key did not open: wrong master key, or the row was moved or altered."""


class UpstreamError(SMIMEProxyError):
    """A peer server (IMAP upstream, SMTP next hop, DNS) failed or refused."""


class ArchiveError(SMIMEProxyError):
    """The archive could not do what was asked: an unreadable index, a bad query, a
    source that cannot be reached, an export that could not be written completely."""


class WorkerError(SMIMEProxyError):
    """A worker process running the engine died or could not start; the message it
    held is answered with a temporary failure and the pool is started again."""
