"""Private keys sealed at rest: master secret -> key-encryption key -> AES-256-GCM.

A store holds one random salt and a description of how its key-encryption key (KEK) is
derived (``kdf``) in its meta table. The master secret comes from a key file (32 random
bytes, created owner-only), an environment variable (the same 32 bytes, hex or base64),
or a passphrase stretched with scrypt (RFC 7914). The KEK is then
HKDF-SHA256 (RFC 5869) of that secret with the store's salt.

Every private key is sealed with AES-256-GCM (NIST SP 800-38D, a 96-bit random nonce)
and associated data binding it to its owner's id and its key id, so a sealed blob copied
into another user's row, or under another certificate, does not open. A known string
sealed the same way (the *check value*) tells a wrong master secret apart from a damaged
row when the store is opened.

Not guaranteed: the KEK lives in process memory while the store is open, and nothing
here protects against a process that can read that memory. A PKCS#11 token is the answer
for that (keys never sealed here at all).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from smimeproxy.errors import MasterKeyError, SealError

#: Length of a master key file and of the KEK: AES-256 (FIPS 197).
SECRET_LENGTH = 32
#: GCM nonce length recommended by NIST SP 800-38D section 8.2 (96 bits).
NONCE_LENGTH = 12
#: Version byte in front of every sealed blob, also bound into the associated data.
SEAL_VERSION = 1
#: scrypt cost (RFC 7914 section 2): N=2**15, r=8, p=1 is 32 MiB and ~0.1 s; stored
#: per store so that a later default can change without breaking old stores.
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
#: HKDF "info" labels (RFC 5869 section 3.2): one purpose, one label.
_KEK_INFO = b"smimeproxy keystore KEK v1"
_CHECK_PLAINTEXT = b"smimeproxy keystore check value v1"
_CHECK_AAD = b"smimeproxy-kek-check\x00v1"
#: Default environment variable holding the master secret.
DEFAULT_ENV = "SMIMEPROXY_MASTER_KEY"


@dataclass(frozen=True)
class MasterSecret:
    """The operator's master secret and where it came from (named in error messages).

    ``material`` is never shown by ``repr``. ``passphrase`` tells whether it must be
    stretched with scrypt before use.
    """

    material: bytes = field(repr=False)
    origin: str
    passphrase: bool = False

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> MasterSecret:
        """Read a key file written by :func:`create_key_file`."""
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise MasterKeyError(f"cannot read the master key file {p}: {e.strerror}") from None
        if len(data) != SECRET_LENGTH:
            raise MasterKeyError(
                f"the master key file {p} must hold exactly {SECRET_LENGTH} bytes"
                f" (it holds {len(data)})"
            )
        return cls(data, f"master key file {p}")

    @classmethod
    def from_env(
        cls, name: str = DEFAULT_ENV, environ: dict[str, str] | None = None
    ) -> MasterSecret:
        """The 32-byte secret, hex or base64, from environment variable ``name``."""
        env = os.environ if environ is None else environ
        value = env.get(name)
        if not value:
            raise MasterKeyError(f"environment variable {name} is not set")
        raw = _decode_secret(value.strip())
        if raw is None:
            raise MasterKeyError(
                f"environment variable {name} must hold {SECRET_LENGTH} bytes as hex or base64"
            )
        return cls(raw, f"environment variable {name}")

    @classmethod
    def from_passphrase(cls, passphrase: str | bytes, origin: str = "passphrase") -> MasterSecret:
        """A passphrase; stretched with scrypt and the store's salt when used."""
        data = passphrase.encode("utf-8") if isinstance(passphrase, str) else passphrase
        if not data:
            raise MasterKeyError("the passphrase is empty")
        return cls(data, origin, passphrase=True)


def _decode_secret(value: str) -> bytes | None:
    for decode in (bytes.fromhex, base64.b64decode):
        try:
            raw = decode(value)
        except (ValueError, binascii.Error):
            continue
        if len(raw) == SECRET_LENGTH:
            return raw
    return None


def create_key_file(path: str | os.PathLike[str]) -> MasterSecret:
    """Create a new master key file with 32 random bytes, owner-only (0600).

    Refuses to overwrite an existing file (that would orphan every sealed key). The file
    is created with mode 0600 in the ``open`` call itself, so it is never readable by
    others, not even for a moment.
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise MasterKeyError(f"the master key file {p} already exists; not overwriting") from None
    except OSError as e:
        raise MasterKeyError(f"cannot create the master key file {p}: {e.strerror}") from None
    secret = secrets.token_bytes(SECRET_LENGTH)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secret)
        os.fsync(fd)
    finally:
        os.close(fd)
    return MasterSecret(secret, f"master key file {p}")


def new_kdf_parameters(master: MasterSecret) -> dict[str, Any]:
    """Fresh parameters (random salt) for deriving a KEK from ``master``."""
    params: dict[str, Any] = {"salt": secrets.token_bytes(16).hex(), "kdf": "hkdf-sha256"}
    if master.passphrase:
        params.update(kdf="scrypt+hkdf-sha256", n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return params


class Sealer:
    """Seals and opens private keys under one KEK.

    Built by :meth:`derive`; holds the KEK in memory (never in ``repr``).
    """

    def __init__(self, kek: bytes, origin: str):
        if len(kek) != SECRET_LENGTH:
            raise MasterKeyError("a key-encryption key must be 32 bytes")
        self._aead = AESGCM(kek)
        self.origin = origin

    def __repr__(self) -> str:
        return f"<Sealer from {self.origin}>"

    @classmethod
    def derive(cls, master: MasterSecret, params: dict[str, Any]) -> Sealer:
        """The KEK for ``master`` under the store's stored ``params`` (salt, kdf)."""
        try:
            salt = bytes.fromhex(params["salt"])
            kdf = params["kdf"]
        except (KeyError, TypeError, ValueError):
            raise MasterKeyError("the store's key derivation parameters are damaged") from None
        secret = master.material
        if kdf == "scrypt+hkdf-sha256":
            if not master.passphrase:
                raise MasterKeyError(
                    f"this store is sealed with a passphrase, but {master.origin} was given"
                )
            try:
                secret = Scrypt(
                    salt=salt, length=SECRET_LENGTH, n=params["n"], r=params["r"], p=params["p"]
                ).derive(secret)
            except (KeyError, TypeError, ValueError):
                raise MasterKeyError("the store's scrypt parameters are damaged") from None
        elif kdf == "hkdf-sha256":
            if master.passphrase:
                raise MasterKeyError(
                    "this store is sealed with a master key (file or environment variable),"
                    " not a passphrase"
                )
        else:
            raise MasterKeyError(f"unknown key derivation {kdf!r} in this store")
        kek = HKDF(algorithm=hashes.SHA256(), length=SECRET_LENGTH, salt=salt, info=_KEK_INFO)
        return cls(kek.derive(secret), master.origin)

    # -- the check value ----------------------------------------------------------

    def check_value(self) -> bytes:
        """A known string sealed under this KEK, stored once per store."""
        return self._seal_raw(_CHECK_PLAINTEXT, _CHECK_AAD)

    def verify_check_value(self, blob: bytes) -> None:
        """Raise :class:`MasterKeyError` naming the secret's origin unless it matches."""
        try:
            ok = self._open_raw(blob, _CHECK_AAD) == _CHECK_PLAINTEXT
        except SealError:
            ok = False
        if not ok:
            raise MasterKeyError(
                f"the master key does not match this store ({self.origin} is not the secret"
                " the store was sealed with); check the key file or environment variable"
            )

    # -- private keys ----------------------------------------------------------------

    @staticmethod
    def associated_data(owner_id: str, key_id: str) -> bytes:
        """AAD binding a sealed key to its owner and key id (and the blob version)."""
        return json.dumps(
            ["smimeproxy-private-key", SEAL_VERSION, owner_id, key_id], separators=(",", ":")
        ).encode("utf-8")

    def seal(self, plaintext: bytes, *, owner_id: str, key_id: str) -> bytes:
        """Seal private key bytes for ``owner_id``/``key_id``."""
        return self._seal_raw(plaintext, self.associated_data(owner_id, key_id))

    def open(self, blob: bytes, *, owner_id: str, key_id: str) -> bytes:
        """Open a sealed key; :class:`SealError` if it was moved, altered or sealed
        under another master secret. The error names the key id, never any bytes."""
        try:
            return self._open_raw(blob, self.associated_data(owner_id, key_id))
        except SealError:
            raise SealError(
                f"sealed private key {key_id} does not open: it was moved to another owner,"
                " altered, or sealed under another master secret"
            ) from None

    def _seal_raw(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_LENGTH)
        return bytes([SEAL_VERSION]) + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def _open_raw(self, blob: bytes, aad: bytes) -> bytes:
        blob = bytes(blob)
        if len(blob) < 1 + NONCE_LENGTH + 16 or blob[0] != SEAL_VERSION:
            raise SealError("not a sealed blob of a known version")
        nonce = blob[1 : 1 + NONCE_LENGTH]
        try:
            return self._aead.decrypt(nonce, blob[1 + NONCE_LENGTH :], aad)
        except InvalidTag:
            raise SealError("authentication failed") from None
