"""Private keys held in a PKCS#11 token (an HSM, a smart card, SoftHSM2 in tests).

:class:`PKCS11Token` generates key pairs inside the token (sensitive, never
extractable) and hands out :class:`TokenKey` objects that implement the engine's
:class:`smimeproxy.smime.keys.PrivateKey` interface by asking the token to sign,
unwrap or agree. The key store keeps only the certificate and an RFC 7512
``pkcs11:`` URI naming the key; :meth:`PKCS11Token.resolver` turns that reference back
into a key for :meth:`SyncStore.open(hsm=...) <smimeproxy.keystore.SyncStore.open>`.

How each operation reaches the token (the token only ever sees digests or wrapped
keys, never the message):

- RSA PKCS#1 v1.5 signature: the digest is hashed here and wrapped in its DER
  DigestInfo (RFC 8017 section 9.2), then signed with ``CKM_RSA_PKCS`` (works on tokens
  that lack the ``CKM_SHAxxx_RSA_PKCS`` combined mechanisms).
- RSASSA-PSS: ``CKM_RSA_PKCS_PSS`` over the digest, MGF1 with the same hash and a salt
  as long as the hash (RFC 4056, as the engine's software keys do).
- ECDSA: ``CKM_ECDSA`` over the digest; the token's raw ``r || s`` is re-encoded as the
  DER ``ECDSA-Sig-Value`` CMS needs (RFC 5753 section 7.2).
- RSA key transport: ``CKM_RSA_PKCS`` or ``CKM_RSA_PKCS_OAEP``. Whether the token can
  do OAEP with a given hash is probed once with a ciphertext made here (SoftHSM 2.6
  only does SHA-1 and answers a bad ciphertext with the same error as an unsupported
  hash); an unsupported hash is :class:`UnsupportedAlgorithm`, any other failure
  :class:`DecryptionFailed`.
- ECDH: ``CKM_ECDH1_DERIVE`` with the null KDF derives a session-only generic secret
  whose value is read back: the raw shared secret the engine's KDF (RFC 5753) needs.

Threads: python-pkcs11 calls ``C_Initialize(NULL)``, which by PKCS#11 v2.40 section
5.4 tells the module that the application will not call it from several threads at
once (SoftHSM2 then runs without its own locks). So every call into one module is
serialised by one process-wide lock per module path, and each :class:`PKCS11Token`
uses a single logged-in session. Reactor pool threads may call concurrently; they
queue on that lock. An RSA-2048 signature in SoftHSM2 takes about a millisecond.

Not guaranteed: the ECDH shared secret of one message leaves the token (the
engine's interface asks for it; the private key does not leave). A lost session
(token reset, network HSM restart) is reopened once per call with the PIN kept in
this object's memory; the PIN is never logged nor put into an error. The token's own
access control (who may log in) is the operator's; this module does not ``C_Logout``
other applications. Several processes may use one SoftHSM2 token directory; key
generation from two processes at once with the same label is not prevented.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote, unquote_to_bytes

from asn1crypto import core as asn1core  # type: ignore[import-untyped]
from asn1crypto import keys as asn1keys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from twisted.logger import Logger

from smimeproxy.errors import (
    DecryptionFailed,
    KeyNotFound,
    KeystoreError,
    UnsupportedAlgorithm,
)
from smimeproxy.smime.keys import hash_algorithm

try:
    import pkcs11
    from pkcs11 import KDF, MGF, Attribute, KeyType, Mechanism, ObjectClass
    from pkcs11 import exceptions as p11errors
    from pkcs11.util.ec import encode_named_curve_parameters

    HAVE_PKCS11 = True
except ImportError:  # pragma: no cover - exercised only without the extra installed
    HAVE_PKCS11 = False

__all__ = [
    "KEY_KINDS",
    "KeyProtection",
    "PKCS11Token",
    "Reference",
    "TokenKey",
    "parse_reference",
]

#: Key kinds generate_key accepts: RSA size in bits, or a named curve (RFC 8551 2.2/2.4).
KEY_KINDS: dict[str, tuple[str, int | str]] = {
    "rsa2048": ("rsa", 2048),
    "rsa3072": ("rsa", 3072),
    "p256": ("ec", "secp256r1"),
}

#: DER DigestInfo prefixes for EMSA-PKCS1-v1_5 (RFC 8017 section 9.2, note 1): the
#: token's CKM_RSA_PKCS pads and signs DigestInfo = prefix || digest.
DIGEST_INFO_PREFIXES: dict[str, bytes] = {
    "sha1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "sha224": bytes.fromhex("302d300d06096086480165030402040500041c"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}

#: Curves a token EC key may be on, by asn1crypto name (RFC 5480 section 2.1.1.1).
_CURVES: dict[str, ec.EllipticCurve] = {
    "secp256r1": ec.SECP256R1(),
    "secp384r1": ec.SECP384R1(),
    "secp521r1": ec.SECP521R1(),
}

_ID_LENGTH = 16
_T = TypeVar("_T")

_module_locks: dict[str, threading.RLock] = {}
_module_locks_guard = threading.Lock()


def _module_lock(path: str) -> threading.RLock:
    with _module_locks_guard:
        return _module_locks.setdefault(path, threading.RLock())


def _p11_hashes() -> dict[str, tuple[Any, Any]]:
    # PKCS#11 v2.40 section 2.1.8 (CK_RSA_PKCS_OAEP_PARAMS / PSS): hash and MGF1 ids
    return {
        "sha1": (Mechanism.SHA_1, MGF.SHA1),
        "sha224": (Mechanism.SHA224, MGF.SHA224),
        "sha256": (Mechanism.SHA256, MGF.SHA256),
        "sha384": (Mechanism.SHA384, MGF.SHA384),
        "sha512": (Mechanism.SHA512, MGF.SHA512),
    }


@dataclass(frozen=True)
class Reference:
    """The parts of an RFC 7512 ``pkcs11:`` URI this module writes and reads."""

    token: str | None
    label: str | None
    key_id: bytes | None

    def uri(self) -> str:
        parts = []
        if self.token is not None:
            parts.append("token=" + quote(self.token, safe=""))
        if self.label is not None:
            parts.append("object=" + quote(self.label, safe=""))
        if self.key_id is not None:
            parts.append("id=" + "".join(f"%{b:02x}" for b in self.key_id))
        return "pkcs11:" + ";".join(parts)


def parse_reference(reference: str) -> Reference:
    """Token label, object label and CKA_ID from a ``pkcs11:`` URI (RFC 7512 section 2.3).

    Query attributes (``?pin-value=...``) are ignored, never used: the PIN comes from
    the configuration. A reference naming neither an object nor an id is refused.
    """
    if not reference.startswith("pkcs11:"):
        raise KeyNotFound("not a pkcs11: key reference")
    path = reference[len("pkcs11:") :].split("?", 1)[0]
    fields: dict[str, str] = {}
    for part in path.split(";"):
        if not part:
            continue
        name, sep, value = part.partition("=")
        if not sep:
            raise KeyNotFound(f"malformed pkcs11: reference attribute {name!r}")
        fields[name.strip().lower()] = value
    token = unquote(fields["token"]) if "token" in fields else None
    label = unquote(fields["object"]) if "object" in fields else None
    key_id = unquote_to_bytes(fields["id"]) if "id" in fields else None
    if label is None and not key_id:
        raise KeyNotFound("the pkcs11: reference names neither an object nor an id")
    return Reference(token, label, key_id)


@dataclass(frozen=True)
class KeyProtection:
    """What the token says about a private key's protection (PKCS#11 section 4.9)."""

    sensitive: bool
    extractable: bool
    always_sensitive: bool
    never_extractable: bool

    @property
    def protected(self) -> bool:
        """True when the key cannot leave the token and never could."""
        return (
            self.sensitive
            and not self.extractable
            and self.always_sensitive
            and self.never_extractable
        )


def _public_from_token(obj: Any) -> PublicKeyTypes:
    """A ``cryptography`` public key from a token public-key object."""
    key_type = obj[Attribute.KEY_TYPE]
    if key_type == KeyType.RSA:
        n = int.from_bytes(obj[Attribute.MODULUS], "big")
        e = int.from_bytes(obj[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    if key_type == KeyType.EC:
        params = asn1keys.ECDomainParameters.load(obj[Attribute.EC_PARAMS])
        curve = _CURVES.get(str(params.chosen.native)) if params.name == "named" else None
        if curve is None:
            raise UnsupportedAlgorithm("the token key is on a curve we do not support")
        raw = bytes(obj[Attribute.EC_POINT])
        try:  # PKCS#11 v2.40 says DER OCTET STRING; some tokens give the bare point
            point = asn1core.OctetString.load(raw, strict=True).native
        except ValueError:
            point = raw
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
    raise UnsupportedAlgorithm(f"unsupported token key type {key_type!r}")


def _spki(public: PublicKeyTypes) -> bytes:
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class PKCS11Token:
    """One logged-in session on one token of a PKCS#11 module.

    ``module_path`` is the module's shared library (``libsofthsm2.so`` ...),
    ``token_label`` the token's label, ``pin`` the user PIN. Raises
    :class:`KeystoreError` when python-pkcs11 is missing, the module does not load,
    the token is absent or the PIN is rejected (the PIN is never in the message).

    PKCS#11 login state belongs to the application, not to a session: when another
    :class:`PKCS11Token` of this process is already logged in to the same token, a
    second one joins that login and its ``pin`` is not checked again.
    """

    _log = Logger()

    def __init__(self, module_path: str | Path, token_label: str, pin: str):
        if not HAVE_PKCS11:
            raise KeystoreError("PKCS#11 support needs python-pkcs11 (pip install python-pkcs11)")
        self.module_path = str(Path(module_path).resolve())
        self.token_label = token_label
        self.__pin = pin
        self._lock = _module_lock(self.module_path)
        self._session: Any = None
        self._keys: dict[str, TokenKey] = {}
        self._oaep_support: dict[str, bool] = {}
        if not Path(self.module_path).is_file():
            raise KeystoreError(f"PKCS#11 module {self.module_path} does not exist")
        try:
            with self._lock:
                self._lib = pkcs11.lib(self.module_path)
                self._token = self._lib.get_token(token_label=token_label)
                self._login()
        except p11errors.NoSuchToken:
            raise KeystoreError(
                f"no token labelled {token_label!r} in PKCS#11 module {self.module_path}"
            ) from None
        except (p11errors.PKCS11Error, RuntimeError, OSError) as e:
            raise KeystoreError(self._describe(e, "opening the token")) from None
        self._log.info(
            "pkcs11.open: token {token} in {module}", token=token_label, module=self.module_path
        )

    def __repr__(self) -> str:  # never the PIN
        return f"<PKCS11Token {self.token_label!r} in {self.module_path}>"

    def _describe(self, error: BaseException, doing: str) -> str:
        if HAVE_PKCS11 and isinstance(error, p11errors.PinIncorrect | p11errors.PinInvalid):
            return f"token {self.token_label!r} rejected the PIN while {doing}"
        if HAVE_PKCS11 and isinstance(error, p11errors.PinLocked):
            return f"token {self.token_label!r}: the user PIN is locked"
        # python-pkcs11 errors carry no secrets: a class name and at most a message
        return f"token {self.token_label!r} failed while {doing}: {type(error).__name__} {error}"

    def _login(self) -> None:
        try:
            self._session = self._token.open(rw=True, user_pin=self.__pin)
        except p11errors.UserAlreadyLoggedIn:
            # another PKCS11Token of this process holds the login: sessions share it
            self._session = self._token.open(rw=True)

    def _call(self, doing: str, fn: Callable[[Any], _T]) -> _T:
        """Run ``fn(session)`` under the module lock, reopening a lost session once.

        Errors of ``fn`` pass through unchanged (the caller knows what they mean).
        """
        with self._lock:
            if self._session is None:
                raise KeystoreError(f"token {self.token_label!r} is closed")
            try:
                return fn(self._session)
            except (
                p11errors.SessionHandleInvalid,
                p11errors.SessionClosed,
                p11errors.UserNotLoggedIn,
                p11errors.DeviceRemoved,
                p11errors.TokenNotPresent,
            ):
                self._log.warn(
                    "pkcs11.reopen: token {token} lost its session while {doing}",
                    token=self.token_label,
                    doing=doing,
                )
            self._session = None
            try:
                self._token = self._lib.get_token(token_label=self.token_label)
                self._login()
            except (p11errors.PKCS11Error, RuntimeError) as e:
                raise KeystoreError(self._describe(e, doing)) from None
            return fn(self._session)

    def close(self) -> None:
        """Close the session (the login ends with the process's last session)."""
        with self._lock:
            if self._session is not None:
                try:
                    self._session.close()
                except p11errors.PKCS11Error:
                    pass
                self._session = None
                self._keys.clear()

    def __enter__(self) -> PKCS11Token:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- keys -------------------------------------------------------------------------

    def generate_key(self, label: str, kind: str = "rsa2048") -> tuple[str, PublicKeyTypes]:
        """A new key pair inside the token, stored there under ``label`` with a random
        CKA_ID; returns its ``pkcs11:`` reference and public key.

        The private key is CKA_SENSITIVE, not CKA_EXTRACTABLE, private (needs login),
        and may sign, decrypt (RSA) or derive (EC) only. Raises UnsupportedAlgorithm for
        a kind not in :data:`KEY_KINDS`, KeystoreError when ``label`` is taken.
        """
        if kind not in KEY_KINDS:
            raise UnsupportedAlgorithm(f"token key kind must be one of {sorted(KEY_KINDS)}")
        family, size = KEY_KINDS[kind]
        key_id = os.urandom(_ID_LENGTH)
        private_template = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True,
            Attribute.DECRYPT: family == "rsa",
            Attribute.UNWRAP: False,
            Attribute.DERIVE: family == "ec",
        }
        public_template = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: False,
            Attribute.VERIFY: True,
            Attribute.ENCRYPT: family == "rsa",
            Attribute.WRAP: False,
        }

        def generate(session: Any) -> PublicKeyTypes:
            if list(session.get_objects({Attribute.LABEL: label})):
                raise KeystoreError(f"token {self.token_label!r} already has a key {label!r}")
            common = {
                "store": True,
                "label": label,
                "id": key_id,
                "private_template": private_template,
                "public_template": public_template,
            }
            if family == "rsa":
                pub, _ = session.generate_keypair(KeyType.RSA, size, **common)
            else:
                params = session.create_domain_parameters(
                    KeyType.EC,
                    {Attribute.EC_PARAMS: encode_named_curve_parameters(str(size))},
                    local=True,
                )
                pub, _ = params.generate_keypair(**common)
            return _public_from_token(pub)

        try:
            public = self._call("generating a key", generate)
        except (KeystoreError, UnsupportedAlgorithm):
            raise
        except (p11errors.PKCS11Error, RuntimeError) as e:
            raise KeystoreError(self._describe(e, "generating a key")) from None
        reference = Reference(self.token_label, label, key_id).uri()
        self._log.info(
            "pkcs11.generate: {kind} key {label} in token {token}",
            kind=kind,
            label=label,
            token=self.token_label,
        )
        return reference, public

    def _find(self, session: Any, ref: Reference, object_class: Any) -> Any:
        attrs: dict[Any, Any] = {Attribute.CLASS: object_class}
        if ref.label is not None:
            attrs[Attribute.LABEL] = ref.label
        if ref.key_id:
            attrs[Attribute.ID] = ref.key_id
        found = list(session.get_objects(attrs))
        if not found:
            return None
        if len(found) > 1:
            raise KeystoreError(f"the reference names {len(found)} objects in the token")
        return found[0]

    def _check_token(self, ref: Reference) -> None:
        if ref.token is not None and ref.token != self.token_label:
            raise KeyNotFound(
                f"the key is in token {ref.token!r}, but token {self.token_label!r} is open"
            )

    def private_key(self, reference: str) -> TokenKey:
        """The :class:`TokenKey` a ``pkcs11:`` reference names (KeyNotFound if absent).

        Its public key comes from the token's public-key object with the same id and
        label; a token without one needs :meth:`resolver` (which takes it from the
        certificate).
        """
        return self._key(reference, None)

    def _key(self, reference: str, certificate: x509.Certificate | None) -> TokenKey:
        cache_key = reference
        cached = self._keys.get(cache_key)
        if cached is not None and (
            certificate is None or _spki(cached.public_key()) == _spki(certificate.public_key())
        ):
            return cached
        ref = parse_reference(reference)
        self._check_token(ref)

        def look(session: Any) -> TokenKey:
            priv = self._find(session, ref, ObjectClass.PRIVATE_KEY)
            if priv is None:
                raise KeyNotFound(f"token {self.token_label!r} holds no key {ref.uri()}")
            pub = self._find(session, ref, ObjectClass.PUBLIC_KEY)
            public: PublicKeyTypes
            if pub is not None:
                public = _public_from_token(pub)
                if certificate is not None and _spki(public) != _spki(certificate.public_key()):
                    raise KeystoreError(
                        f"token key {ref.uri()} does not belong to the stored certificate"
                    )
            elif certificate is not None:
                public = certificate.public_key()
            else:
                raise KeyNotFound(f"token {self.token_label!r} has no public key for {ref.uri()}")
            return TokenKey(self, ref.uri(), priv[Attribute.KEY_TYPE], public)

        try:
            key = self._call("looking up a key", look)
        except (KeyNotFound, KeystoreError, UnsupportedAlgorithm):
            raise
        except (p11errors.PKCS11Error, RuntimeError) as e:
            raise KeystoreError(self._describe(e, "looking up a key")) from None
        with self._lock:
            self._keys[cache_key] = key
        return key

    def resolver(self) -> Callable[[str, x509.Certificate], TokenKey]:
        """``(reference, certificate) -> TokenKey`` for ``SyncStore.open(hsm=...)``.

        The token's public key must match the certificate's (KeystoreError otherwise),
        so a reference row pointed at another key does not sign under this certificate.
        """
        return self._key

    def protection(self, reference: str) -> KeyProtection:
        """The token's protection attributes of the private key ``reference`` names."""
        ref = parse_reference(reference)
        self._check_token(ref)

        def read(session: Any) -> KeyProtection:
            priv = self._find(session, ref, ObjectClass.PRIVATE_KEY)
            if priv is None:
                raise KeyNotFound(f"token {self.token_label!r} holds no key {ref.uri()}")
            return KeyProtection(
                sensitive=bool(priv[Attribute.SENSITIVE]),
                extractable=bool(priv[Attribute.EXTRACTABLE]),
                always_sensitive=bool(priv[Attribute.ALWAYS_SENSITIVE]),
                never_extractable=bool(priv[Attribute.NEVER_EXTRACTABLE]),
            )

        try:
            return self._call("reading key attributes", read)
        except (KeyNotFound, KeystoreError):
            raise
        except (p11errors.PKCS11Error, RuntimeError) as e:
            raise KeystoreError(self._describe(e, "reading key attributes")) from None

    # -- operations (called by TokenKey) ---------------------------------------------

    def _operate(self, key: TokenKey, doing: str, fn: Callable[[Any], _T]) -> _T:
        ref = parse_reference(key.reference)

        def run(session: Any) -> _T:
            priv = self._find(session, ref, ObjectClass.PRIVATE_KEY)
            if priv is None:
                raise KeyNotFound(f"token {self.token_label!r} no longer holds {ref.uri()}")
            return fn(priv)

        return self._call(doing, run)

    def _oaep_supported(self, key: TokenKey, hash_name: str) -> bool:
        """Whether the token does RSAES-OAEP with ``hash_name`` (probed once)."""
        known = self._oaep_support.get(hash_name)
        if known is not None:
            return known
        public = key.public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        h = hash_algorithm(hash_name)
        probe = os.urandom(16)
        ciphertext = public.encrypt(
            probe, padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None)
        )
        mech, mgf = _p11_hashes()[hash_name]
        try:
            plain = self._operate(
                key,
                "probing RSA-OAEP",
                lambda priv: priv.decrypt(
                    ciphertext, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=(mech, mgf, None)
                ),
            )
            supported = bytes(plain) == probe
        except (p11errors.PKCS11Error, RuntimeError):
            supported = False
        self._oaep_support[hash_name] = supported
        return supported


class TokenKey:
    """A :class:`smimeproxy.smime.keys.PrivateKey` whose private half stays in a token."""

    def __init__(self, token: PKCS11Token, reference: str, key_type: Any, public: PublicKeyTypes):
        self.token = token
        self.reference = reference
        self._key_type = key_type
        self._public = public

    def __repr__(self) -> str:
        return f"<TokenKey {self.reference}>"

    def public_key(self) -> PublicKeyTypes:
        return self._public

    def _run(self, doing: str, fn: Callable[[Any], _T]) -> _T:
        try:
            return self.token._operate(self, doing, fn)
        except (KeyNotFound, KeystoreError, DecryptionFailed, UnsupportedAlgorithm):
            raise
        except (p11errors.PKCS11Error, RuntimeError) as e:
            raise KeystoreError(self.token._describe(e, doing)) from None

    def sign(self, data: bytes, hash_name: str | None, *, pss: bool = False) -> bytes:
        name = hash_name or "sha256"
        h = hash_algorithm(name)
        hasher = hashes.Hash(h)
        hasher.update(data)
        digest = hasher.finalize()
        public = self._public
        if isinstance(public, rsa.RSAPublicKey):
            if pss:
                mech, mgf = _p11_hashes()[name]
                return self._run(
                    "signing (RSA-PSS)",
                    lambda priv: bytes(
                        priv.sign(
                            digest,
                            mechanism=Mechanism.RSA_PKCS_PSS,
                            mechanism_param=(mech, mgf, h.digest_size),
                        )
                    ),
                )
            digest_info = DIGEST_INFO_PREFIXES[name] + digest
            return self._run(
                "signing (RSA PKCS#1 v1.5)",
                lambda priv: bytes(priv.sign(digest_info, mechanism=Mechanism.RSA_PKCS)),
            )
        if isinstance(public, ec.EllipticCurvePublicKey):
            raw = self._run(
                "signing (ECDSA)",
                lambda priv: bytes(priv.sign(digest, mechanism=Mechanism.ECDSA)),
            )
            half = len(raw) // 2
            if len(raw) % 2 or not half:
                raise KeystoreError("the token returned a malformed ECDSA signature")
            r = int.from_bytes(raw[:half], "big")
            s = int.from_bytes(raw[half:], "big")
            return encode_dss_signature(r, s)
        raise UnsupportedAlgorithm(f"cannot sign with a token {type(public).__name__}")

    def decrypt(self, ciphertext: bytes, *, oaep_hash: str | None = None) -> bytes:
        if not isinstance(self._public, rsa.RSAPublicKey):
            raise UnsupportedAlgorithm("key transport needs an RSA token key")
        if oaep_hash is None:
            mechanism, param = Mechanism.RSA_PKCS, None
        else:
            hash_algorithm(oaep_hash)  # UnsupportedAlgorithm for an unknown name
            if not self.token._oaep_supported(self, oaep_hash):
                raise UnsupportedAlgorithm(
                    f"token {self.token.token_label!r} does not do RSA-OAEP with {oaep_hash}"
                )
            mech, mgf = _p11_hashes()[oaep_hash]
            mechanism, param = Mechanism.RSA_PKCS_OAEP, (mech, mgf, None)
        try:
            return self.token._operate(
                self,
                "decrypting",
                lambda priv: bytes(
                    priv.decrypt(ciphertext, mechanism=mechanism, mechanism_param=param)
                ),
            )
        except (KeyNotFound, KeystoreError):
            raise
        except (p11errors.PKCS11Error, RuntimeError):
            raise DecryptionFailed("decryption failed") from None

    def exchange(self, peer_public_key: PublicKeyTypes) -> bytes:
        public = self._public
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise UnsupportedAlgorithm("key agreement needs an EC token key")
        if not isinstance(peer_public_key, ec.EllipticCurvePublicKey):
            raise UnsupportedAlgorithm(f"cannot agree with a {type(peer_public_key).__name__}")
        if peer_public_key.curve.name != public.curve.name:
            raise DecryptionFailed("decryption failed")  # not our curve: not for us
        point = peer_public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        size = (public.curve.key_size + 7) // 8

        def derive(priv: Any) -> bytes:
            secret = priv.derive_key(
                KeyType.GENERIC_SECRET,
                size * 8,
                mechanism=Mechanism.ECDH1_DERIVE,
                mechanism_param=(KDF.NULL, None, point),
                template={
                    Attribute.TOKEN: False,
                    Attribute.SENSITIVE: False,
                    Attribute.EXTRACTABLE: True,
                },
            )
            try:
                return bytes(secret[Attribute.VALUE])
            finally:
                secret.destroy()

        try:
            return self.token._operate(self, "agreeing a key (ECDH)", derive)
        except (KeyNotFound, KeystoreError):
            raise
        except (p11errors.PKCS11Error, RuntimeError):
            raise DecryptionFailed("decryption failed") from None
