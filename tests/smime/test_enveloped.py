"""CMS EnvelopedData / AuthEnvelopedData: our output against OpenSSL and gpgsm, their
output and the public vectors against us, and hostile input.

OpenSSL 3.0 has no X25519 key agreement in CMS ("operation not supported for this
keytype"), and gpgsm 2.2 reads neither AES-GCM AuthEnvelopedData nor RSA-OAEP; those
directions are covered by our own round trips and the RFC 8418 vectors instead.
"""

from __future__ import annotations

import base64
import email
import os
import subprocess
from pathlib import Path

import pytest
from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smimeproxy.errors import (
    DecryptionFailed,
    KeyNotFound,
    MalformedMessage,
    SMIMEProxyError,
    UnsupportedAlgorithm,
)
from smimeproxy.smime.enveloped import (
    CIPHERS,
    Recipient,
    choose_cipher,
    decrypt_data,
    encrypt_data,
    recipient_identifiers,
)
from smimeproxy.smime.keys import KeyPair, load_certificates, load_pkcs12, load_private_key
from smimeproxy.testing import CertificateFactory, Issued
from tests.gpgsm import import_pkcs12

CONTENT = b"Content-Type: text/plain\r\n\r\nMeet me at noon. \xc3\xa9\r\n"


class Users:
    """Throwaway recipients shared by the module (RSA key generation is slow)."""

    def __init__(self) -> None:
        self.factory = CertificateFactory()
        self.rsa = self.factory.user("alice@example.test")
        self.rsa_old = self.factory.user("alice@example.test")  # a historical key
        self.other = self.factory.user("mallory@example.test")
        self.p256 = self.factory.user("bob@example.test", key_kind="p256")
        self.p384 = self.factory.user("carol@example.test", key_kind="p384")
        self.x25519 = self.factory.user("dave@example.test", key_kind="x25519")


@pytest.fixture(scope="module")
def users() -> Users:
    return Users()


def _recipient(users: Users, kind: str) -> tuple[Recipient, Issued]:
    return {
        "rsa": (Recipient(users.rsa.certificate), users.rsa),
        "rsa-oaep": (Recipient(users.rsa.certificate, oaep=True), users.rsa),
        "rsa-ski": (
            Recipient(users.rsa.certificate, use_subject_key_identifier=True),
            users.rsa,
        ),
        "p256": (Recipient(users.p256.certificate), users.p256),
        "p384": (Recipient(users.p384.certificate), users.p384),
        "p256-ski": (
            Recipient(users.p256.certificate, use_subject_key_identifier=True),
            users.p256,
        ),
        "x25519": (Recipient(users.x25519.certificate), users.x25519),
        "x25519-hkdf": (Recipient(users.x25519.certificate, hkdf=True), users.x25519),
    }[kind]


def _pem_file(tmp_path: Path, issued: Issued) -> Path:
    path = tmp_path / f"{issued.certificate.serial_number:x}.pem"
    path.write_bytes(issued.key_pem + issued.cert_pem)
    return path


def _openssl_decrypt(openssl: str, tmp_path: Path, blob: bytes, issued: Issued) -> bytes:
    src = tmp_path / "in.der"
    src.write_bytes(blob)
    pem = _pem_file(tmp_path, issued)
    out = subprocess.run(
        [
            openssl,
            "cms",
            "-decrypt",
            "-binary",
            "-inform",
            "DER",
            "-in",
            str(src),
            "-recip",
            str(pem),
            "-inkey",
            str(pem),
        ],
        capture_output=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout


def _openssl_encrypt(
    openssl: str, tmp_path: Path, args: list[str], *recips: Issued, keyopt: list[str] = ()
) -> bytes:
    """``openssl cms -encrypt``; ``keyopt`` values apply to every ``-recip``."""
    src = tmp_path / "plain.txt"
    src.write_bytes(CONTENT)
    dst = tmp_path / "out.der"
    recipient_args = []
    for issued in recips:
        path = tmp_path / f"{issued.certificate.serial_number:x}.crt"
        path.write_bytes(issued.cert_pem)
        recipient_args += ["-recip", str(path)]
        for option in keyopt:
            recipient_args += ["-keyopt", option]
    out = subprocess.run(
        [
            openssl,
            "cms",
            "-encrypt",
            "-binary",
            "-outform",
            "DER",
            "-in",
            str(src),
            "-out",
            str(dst),
            *args,
            *recipient_args,
        ],
        check=False,
        capture_output=True,
    )
    assert out.returncode == 0, out.stderr.decode()
    return dst.read_bytes()


AES128_WRAP = "2.16.840.1.101.3.4.1.5"  # RFC 3565
AES256_WRAP = "2.16.840.1.101.3.4.1.45"


class GCMParameters(core.Sequence):
    """RFC 5084 section 3.2 (asn1crypto does not define it)."""

    _fields = [("nonce", core.OctetString), ("icv_len", core.Integer, {"default": 12})]


def _wrap_oid(kari: cms.KeyAgreeRecipientInfo) -> str:
    params = kari["key_encryption_algorithm"]["parameters"]
    return str(params.parse(algos.AlgorithmIdentifier)["algorithm"].dotted)


def _content_info(blob: bytes) -> cms.ContentInfo:
    return cms.ContentInfo.load(blob)


# --------------------------------------------------------------------------- round trip

KINDS = ["rsa", "rsa-oaep", "rsa-ski", "p256", "p384", "p256-ski", "x25519", "x25519-hkdf"]


@pytest.mark.parametrize("cipher", CIPHERS)
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(users: Users, cipher: str, kind: str) -> None:
    recipient, issued = _recipient(users, kind)
    blob = encrypt_data(CONTENT, [recipient], cipher=cipher)
    result = decrypt_data(blob, [users.other.pair, issued.pair])
    assert result.content == CONTENT
    assert result.cipher == cipher
    assert result.recipient.certificate == issued.certificate
    assert result.inner_content_type == "data"
    gcm = cipher.endswith("gcm")
    assert result.integrity_protected is gcm
    assert result.content_type == ("authenticated_enveloped_data" if gcm else "enveloped_data")
    status = result.status()
    assert status.decrypted and status.cipher == cipher and status.integrity_protected is gcm


def test_key_algorithm_names(users: Users) -> None:
    names = {}
    for kind in ("rsa", "rsa-oaep", "p256", "p384", "x25519", "x25519-hkdf"):
        recipient, issued = _recipient(users, kind)
        names[kind] = decrypt_data(encrypt_data(b"x", [recipient]), [issued.pair]).key_algorithm
    assert names == {
        "rsa": "rsaes_pkcs1v15",
        "rsa-oaep": "rsaes_oaep",
        "p256": "dh_single_pass_std_dh_sha256kdf_scheme",
        "p384": "dh_single_pass_std_dh_sha384kdf_scheme",
        "x25519": "dh_single_pass_std_dh_sha256kdf_scheme",
        "x25519-hkdf": "dh_single_pass_std_dh_hkdf_sha256_scheme",
    }


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1 << 20])
@pytest.mark.parametrize("cipher", ["aes128_cbc", "aes256_gcm"])
def test_content_sizes(users: Users, size: int, cipher: str) -> None:
    content = os.urandom(size)
    blob = encrypt_data(content, [users.p256.certificate], cipher=cipher)
    assert decrypt_data(blob, [users.p256.pair]).content == content


def test_several_recipients_each_decrypt(users: Users) -> None:
    blob = encrypt_data(
        CONTENT,
        [users.rsa.certificate, users.p256.certificate, users.x25519.certificate],
        cipher="aes256_gcm",
    )
    for issued in (users.rsa, users.p256, users.x25519):
        assert decrypt_data(blob, [issued.pair]).content == CONTENT
    with pytest.raises(DecryptionFailed, match="no key for any recipient"):
        decrypt_data(blob, [users.other.pair, users.p384.pair])


def test_right_key_found_among_historical_keys(users: Users) -> None:
    blob = encrypt_data(CONTENT, [users.rsa_old.certificate])
    keys = [users.rsa.pair, users.p256.pair, users.rsa_old.pair, users.other.pair]
    assert decrypt_data(blob, keys).recipient.certificate == users.rsa_old.certificate


# --------------------------------------------------------------------------- structure


def test_enveloped_data_versions_and_parameters(users: Users) -> None:
    """RFC 5652 6.1: version 0 only when every RecipientInfo is a version-0 KTRI."""
    plain = _content_info(encrypt_data(b"x", [users.rsa.certificate], cipher="aes256_cbc"))
    assert plain["content_type"].native == "enveloped_data"
    assert plain["content"]["version"].native == "v0"
    ktri = plain["content"]["recipient_infos"][0].chosen
    assert ktri["version"].native == "v0"
    assert ktri["rid"].name == "issuer_and_serial_number"
    eci = plain["content"]["encrypted_content_info"]
    assert eci["content_encryption_algorithm"]["algorithm"].native == "aes256_cbc"
    assert len(eci["content_encryption_algorithm"]["parameters"].native) == 16

    ski = _content_info(
        encrypt_data(b"x", [Recipient(users.rsa.certificate, use_subject_key_identifier=True)])
    )
    assert ski["content"]["version"].native == "v2"
    ktri = ski["content"]["recipient_infos"][0].chosen
    assert ktri["version"].native == "v2" and ktri["rid"].name == "subject_key_identifier"

    agreed = _content_info(encrypt_data(b"x", [users.p256.certificate], cipher="aes128_cbc"))
    assert agreed["content"]["version"].native == "v2"
    kari = agreed["content"]["recipient_infos"][0].chosen
    assert kari["version"].native == "v3"
    assert _wrap_oid(kari) == AES128_WRAP  # as strong as the AES-128 content key


def test_auth_enveloped_gcm_parameters(users: Users) -> None:
    """RFC 5084: 12-byte nonce, 16-byte ICV in ``mac``; RFC 5083: version 0."""
    info = _content_info(encrypt_data(b"x", [users.p384.certificate], cipher="aes256_gcm"))
    assert info["content_type"].native == "authenticated_enveloped_data"
    data = info["content"]
    assert data["version"].native == "v0"
    assert len(data["mac"].native) == 16
    assert not data["auth_attrs"]
    params = data["auth_encrypted_content_info"]["content_encryption_algorithm"]["parameters"]
    gcm = params.parse(GCMParameters)
    assert len(gcm["nonce"].native) == 12
    assert gcm["icv_len"].native == 16
    assert _wrap_oid(data["recipient_infos"][0].chosen) == AES256_WRAP


def test_oaep_parameters_are_sha256(users: Users) -> None:
    info = _content_info(encrypt_data(b"x", [Recipient(users.rsa.certificate, oaep=True)]))
    algorithm = info["content"]["recipient_infos"][0].chosen["key_encryption_algorithm"]
    assert algorithm["algorithm"].native == "rsaes_oaep"
    assert algorithm["parameters"]["hash_algorithm"]["algorithm"].native == "sha256"
    mgf = algorithm["parameters"]["mask_gen_algorithm"]
    assert mgf["algorithm"].native == "mgf1"
    assert mgf["parameters"]["algorithm"].native == "sha256"


def test_recipient_identifiers(users: Users) -> None:
    blob = encrypt_data(
        b"x",
        [
            users.rsa.certificate,
            Recipient(users.p256.certificate, use_subject_key_identifier=True),
        ],
    )
    first, second = recipient_identifiers(blob)
    assert first.kind == "key_transport"
    assert first.serial_number == users.rsa.certificate.serial_number
    assert first.matches(users.rsa.certificate) and not first.matches(users.rsa_old.certificate)
    assert second.kind == "key_agreement"
    assert second.subject_key_identifier is not None
    assert second.matches(users.p256.certificate)
    assert "ski=" in str(second) and "serial=" in str(first)


def test_auth_enveloped_with_auth_attrs(users: Users) -> None:
    """RFC 5083 2.2: authAttrs are authenticated as DER with an EXPLICIT SET OF tag.

    We never send authAttrs, but must read them; built here by hand with the primitives.
    """
    cek, nonce = os.urandom(16), os.urandom(12)
    attrs = cms.CMSAttributes([{"type": "content_type", "values": ["data"]}])
    ciphertext = AESGCM(cek).encrypt(nonce, CONTENT, attrs.dump())
    ktri = cms.KeyTransRecipientInfo(
        {
            "version": "v0",
            "rid": cms.RecipientIdentifier(
                name="issuer_and_serial_number",
                value={
                    "issuer": asn1_x509.Certificate.load(
                        users.rsa.certificate.public_bytes(Encoding.DER)
                    ).issuer,
                    "serial_number": users.rsa.certificate.serial_number,
                },
            ),
            "key_encryption_algorithm": {"algorithm": "rsaes_pkcs1v15"},
            "encrypted_key": users.rsa.certificate.public_key().encrypt(cek, PKCS1v15()),
        }
    )
    data = cms.AuthEnvelopedData(
        {
            "version": "v0",
            "recipient_infos": [cms.RecipientInfo(name="ktri", value=ktri)],
            "auth_encrypted_content_info": {
                "content_type": "data",
                "content_encryption_algorithm": {
                    "algorithm": "aes128_gcm",
                    "parameters": GCMParameters({"nonce": nonce, "icv_len": 16}),
                },
                "encrypted_content": ciphertext[:-16],
            },
            "auth_attrs": attrs,
            "mac": ciphertext[-16:],
        }
    )
    blob = cms.ContentInfo({"content_type": "authenticated_enveloped_data", "content": data}).dump()
    result = decrypt_data(blob, [users.rsa.pair])
    assert result.content == CONTENT and result.integrity_protected

    data["auth_attrs"] = cms.CMSAttributes([{"type": "content_type", "values": ["signed_data"]}])
    tampered = cms.ContentInfo(
        {"content_type": "authenticated_enveloped_data", "content": data}
    ).dump()
    with pytest.raises(DecryptionFailed):
        decrypt_data(tampered, [users.rsa.pair])


# --------------------------------------------------------------------------- choose_cipher


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [
        ([], "aes256_cbc"),
        ([None], "aes256_cbc"),
        ([["aes256_gcm", "aes128_gcm"]], "aes256_gcm"),
        ([["aes256_gcm"], ["aes128_gcm", "aes256_cbc"]], "aes128_gcm"),
        ([["aes256_gcm"], None], "aes256_cbc"),
        ([["aes256_gcm"], ["aes256_cbc", "aes128_cbc"]], "aes256_cbc"),
        ([["AES256-GCM"], ["aes256_gcm"]], "aes256_gcm"),
        ([[]], "aes256_cbc"),
    ],
)
def test_choose_cipher(capabilities: list[list[str] | None], expected: str) -> None:
    assert choose_cipher(capabilities) == expected


# --------------------------------------------------------------------------- OpenSSL


@pytest.mark.parametrize("cipher", CIPHERS)
@pytest.mark.parametrize("kind", ["rsa", "rsa-oaep", "rsa-ski", "p256", "p384", "p256-ski"])
def test_openssl_decrypts_ours(
    openssl: str, tmp_path: Path, users: Users, cipher: str, kind: str
) -> None:
    recipient, issued = _recipient(users, kind)
    blob = encrypt_data(CONTENT, [recipient], cipher=cipher)
    assert _openssl_decrypt(openssl, tmp_path, blob, issued) == CONTENT


def test_openssl_decrypts_ours_for_each_of_several_recipients(
    openssl: str, tmp_path: Path, users: Users
) -> None:
    blob = encrypt_data(
        CONTENT,
        [
            Recipient(users.rsa.certificate, oaep=True),
            users.p256.certificate,
            Recipient(users.p384.certificate, use_subject_key_identifier=True),
        ],
        cipher="aes256_gcm",
    )
    for issued in (users.rsa, users.p256, users.p384):
        assert _openssl_decrypt(openssl, tmp_path, blob, issued) == CONTENT


@pytest.mark.parametrize("cipher", ["aes-128-cbc", "aes-256-cbc", "aes-128-gcm", "aes-256-gcm"])
@pytest.mark.parametrize("kind", ["rsa", "p256", "p384"])
def test_we_decrypt_openssl(
    openssl: str, tmp_path: Path, users: Users, cipher: str, kind: str
) -> None:
    _, issued = _recipient(users, kind)
    blob = _openssl_encrypt(openssl, tmp_path, [f"-{cipher}"], issued)
    result = decrypt_data(blob, [users.other.pair, issued.pair])
    assert result.content == CONTENT
    assert result.cipher == cipher.replace("-", "_").replace("aes_", "aes", 1)


def test_we_decrypt_openssl_oaep_sha256(openssl: str, tmp_path: Path, users: Users) -> None:
    keyopt = ["rsa_padding_mode:oaep", "rsa_oaep_md:sha256"]
    blob = _openssl_encrypt(openssl, tmp_path, ["-aes-256-cbc"], users.rsa, keyopt=keyopt)
    result = decrypt_data(blob, [users.rsa.pair])
    assert result.content == CONTENT and result.key_algorithm == "rsaes_oaep"


def test_we_decrypt_openssl_oaep_default_sha1(openssl: str, tmp_path: Path, users: Users) -> None:
    keyopt = ["rsa_padding_mode:oaep"]
    blob = _openssl_encrypt(openssl, tmp_path, ["-aes-128-gcm"], users.rsa, keyopt=keyopt)
    assert decrypt_data(blob, [users.rsa.pair]).content == CONTENT


@pytest.mark.parametrize("kdf_md", ["sha1", "sha256", "sha384", "sha512"])
def test_we_decrypt_openssl_ecdh_kdf_hashes(
    openssl: str, tmp_path: Path, users: Users, kdf_md: str
) -> None:
    keyopt = [f"ecdh_kdf_md:{kdf_md}"]
    blob = _openssl_encrypt(openssl, tmp_path, ["-aes-256-cbc"], users.p256, keyopt=keyopt)
    result = decrypt_data(blob, [users.p256.pair])
    assert result.content == CONTENT
    assert result.key_algorithm == f"dh_single_pass_std_dh_{kdf_md}kdf_scheme"


def test_we_decrypt_openssl_keyid_and_several_recipients(
    openssl: str, tmp_path: Path, users: Users
) -> None:
    blob = _openssl_encrypt(
        openssl, tmp_path, ["-aes-256-gcm", "-keyid"], users.rsa, users.p384, users.other
    )
    assert {r.kind for r in recipient_identifiers(blob)} == {"key_transport", "key_agreement"}
    assert all(r.subject_key_identifier for r in recipient_identifiers(blob))
    for issued in (users.rsa, users.p384, users.other):
        keys = [users.rsa_old.pair, users.p256.pair, issued.pair]
        assert decrypt_data(blob, keys).recipient.certificate == issued.certificate


# --------------------------------------------------------------------------- gpgsm


def _gpgsm_home(tmp_path: Path, users: Users, issued: Issued) -> dict[str, str]:
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    fingerprint = users.factory.root.certificate.fingerprint(hashes.SHA1()).hex().upper()
    (home / "trustlist.txt").write_text(f"{fingerprint} S\n")
    (home / "root.pem").write_bytes(users.factory.root.cert_pem)
    return {**os.environ, "GNUPGHOME": str(home)}


def _gpgsm(gpgsm: str, env: dict[str, str], *args: str, stdin: bytes = b"") -> bytes:
    out = subprocess.run(
        [gpgsm, "--batch", "--disable-crl-checks", "--disable-policy-checks", *args],
        input=stdin,
        capture_output=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    return out.stdout


@pytest.fixture
def gpgsm_env(gpgsm: str, tmp_path: Path, users: Users):  # type: ignore[no-untyped-def]
    env = _gpgsm_home(tmp_path, users, users.rsa)
    home = Path(env["GNUPGHOME"])
    (home / "alice.pem").write_bytes(users.rsa.cert_pem)
    _gpgsm(gpgsm, env, "--import", str(home / "root.pem"), str(home / "alice.pem"))
    yield env
    subprocess.run(["gpgconf", "--kill", "all"], env=env, check=False, capture_output=True)


def test_we_decrypt_gpgsm(gpgsm: str, gpgsm_env: dict[str, str], users: Users) -> None:
    blob = _gpgsm(gpgsm, gpgsm_env, "--encrypt", "-r", "alice@example.test", stdin=CONTENT)
    result = decrypt_data(blob, [users.other.pair, users.rsa.pair])
    assert result.content == CONTENT
    assert result.key_algorithm == "rsaes_pkcs1v15"


@pytest.mark.parametrize("cipher", ["aes256_cbc", "aes128_cbc"])
def test_gpgsm_decrypts_ours(
    gpgsm: str, gpgsm_env: dict[str, str], users: Users, tmp_path: Path, cipher: str
) -> None:
    loopback = ["--pinentry-mode", "loopback", "--passphrase-fd", "0"]
    import_pkcs12(gpgsm, gpgsm_env, users.rsa.private_key, users.rsa.certificate)
    blob = tmp_path / "ours.der"
    blob.write_bytes(encrypt_data(CONTENT, [users.rsa.certificate], cipher=cipher))
    out = _gpgsm(gpgsm, gpgsm_env, *loopback, "--decrypt", str(blob), stdin=b"pw\n")
    assert out == CONTENT


# --------------------------------------------------------------------------- vectors


def _pair(key: Path, cert: Path, password: bytes | None = None) -> KeyPair:
    return KeyPair(
        load_certificates(cert.read_bytes())[0], load_private_key(key.read_bytes(), password)
    )


def _eml_body(path: Path) -> bytes:
    payload = email.message_from_bytes(path.read_bytes()).get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload


SAMPLE = b"This is some sample content."


@pytest.mark.parametrize("name", ["5.1.bin", "5.3.eml"])
def test_vector_rfc4134(vectors: Path, name: str) -> None:
    data = vectors / "rfc4134-python-smail/tests/testdata"
    bob = _pair(data / "BobPrivRSAEncrypt.pem", data / "BobRSASignByCarl.pem")
    blob = _eml_body(data / name) if name.endswith(".eml") else (data / name).read_bytes()
    result = decrypt_data(blob, [bob])
    assert result.content == SAMPLE
    assert result.cipher == "tripledes_3key"
    assert result.integrity_protected is False


def test_vector_rfc4134_rc2_is_unsupported(vectors: Path) -> None:
    data = vectors / "rfc4134-python-smail/tests/testdata"
    bob = _pair(data / "BobPrivRSAEncrypt.pem", data / "BobRSASignByCarl.pem")
    with pytest.raises(UnsupportedAlgorithm, match="rc2"):
        decrypt_data((data / "5.2.bin").read_bytes(), [bob])


@pytest.mark.parametrize(
    ("name", "who", "cipher", "key_algorithm"),
    [
        ("encryptedForBobRSAOaep", "bob", "aes128_cbc", "rsaes_oaep"),
        ("encryptedForBobAndDana", "bob", "aes128_cbc", "rsaes_oaep"),
        (
            "encryptedForBobAndDana",
            "dana",
            "aes128_cbc",
            "dh_single_pass_std_dh_sha256kdf_scheme",
        ),
        (
            "authEnvelopedForDanaX25519HKDF",
            "dana",
            "aes128_gcm",
            "dh_single_pass_std_dh_hkdf_sha256_scheme",
        ),
    ],
)
def test_vector_examples_cms(
    vectors: Path, name: str, who: str, cipher: str, key_algorithm: str
) -> None:
    base = vectors / "examples-cms"
    keys = {
        "bob": _pair(
            base / "certs-and-keys/lamps-bob.decrypt.p8.pem",
            base / "certs-and-keys/lamps-bob.encrypt.crt",
        ),
        "dana": _pair(
            base / "certs-and-keys/lamps-dana.decrypt.p8.pem",
            base / "certs-and-keys/lamps-dana.encrypt.crt",
        ),
    }
    result = decrypt_data((base / f"binary-files/{name}.p7m").read_bytes(), [keys[who]])
    assert result.content == SAMPLE
    assert (result.cipher, result.key_algorithm) == (cipher, key_algorithm)


def test_vector_examples_cms_chacha20_is_unsupported(vectors: Path) -> None:
    """ChaCha20-Poly1305 (RFC 8103) is not among our ciphers: a typed refusal."""
    base = vectors / "examples-cms"
    bob = _pair(
        base / "certs-and-keys/lamps-bob.decrypt.p8.pem",
        base / "certs-and-keys/lamps-bob.encrypt.crt",
    )
    blob = (base / "binary-files/authEnvelopedForBobChaCha20Poly1305.p7m").read_bytes()
    with pytest.raises(UnsupportedAlgorithm):
        decrypt_data(blob, [bob])


@pytest.mark.filterwarnings("ignore:PKCS#12 bundle could not be parsed as DER")
def test_vector_thunderbird_alice_env(vectors: Path) -> None:
    base = vectors / "thunderbird-smime/mailnews/test/data/smime"
    key, cert, _ = load_pkcs12((base / "Bob.p12").read_bytes(), b"nss")
    assert key is not None and cert is not None
    result = decrypt_data(_eml_body(base / "alice.env.eml"), [KeyPair(cert, key)])
    assert result.cipher == "aes128_cbc"
    assert result.content.startswith(b"Content-Type: text/plain")


def test_vector_covert_content_original_mail(vectors: Path) -> None:
    keys = vectors / "covert-content-attacks/assets/secret-keys"
    manager = _pair(
        keys / "manager@bigcorporation.key", keys / "manager@bigcorporation.crt", b"test12345678"
    )
    blob = _eml_body(vectors / "covert-content-attacks/01-enc/smime/00-original-mail.eml")
    assert len(recipient_identifiers(blob)) == 2
    result = decrypt_data(blob, [manager])
    assert b"THIS IS A PGP/MIME ENCRYPTED MESSAGE" in result.content


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
@pytest.mark.parametrize("number", [1, 2, 3])
def test_vector_gnupg_ber(vectors: Path, number: int) -> None:
    base = vectors / "gnupg-cms/tests/cms"
    test1 = _pair(base / "skey_g10code_test1.pem", base / "cert_g10code_test1.der", b"test")
    lines = (base / f"plain-{number}.cms.asc").read_text().splitlines()
    assert lines[0] == "-----BEGIN ENCRYPTED MESSAGE-----"
    blob = base64.b64decode("".join(lines[1:-1]))
    assert blob[1] == 0x80  # indefinite length: really BER
    result = decrypt_data(blob, [test1])
    assert result.cipher == "aes128_cbc"
    if number == 3:
        assert result.content == b"Dies ist eine einfache Zeile ohne LF am Ende."
    else:
        assert result.content.startswith(b"<!-- Dies ist Seite") or b"Vorwort" in result.content


# --------------------------------------------------------------------------- negatives


def test_wrong_key_lists_recipients_without_key_material(users: Users) -> None:
    blob = encrypt_data(CONTENT, [users.rsa.certificate, users.p256.certificate])
    with pytest.raises(DecryptionFailed) as caught:
        decrypt_data(blob, [users.other.pair])
    text = str(caught.value)
    assert text.startswith("no key for any recipient")
    assert f"{users.rsa.certificate.serial_number:x}" in text
    assert f"{users.p256.certificate.serial_number:x}" in text


def test_no_keys_at_all(users: Users) -> None:
    with pytest.raises(DecryptionFailed, match="no key for any recipient"):
        decrypt_data(encrypt_data(CONTENT, [users.rsa.certificate]), [])


@pytest.mark.parametrize("kind", ["rsa", "rsa-oaep", "p256", "x25519"])
@pytest.mark.parametrize("cipher", ["aes256_cbc", "aes128_gcm"])
def test_matching_id_but_wrong_key_material(users: Users, kind: str, cipher: str) -> None:
    """The certificate named matches, but the private key is another one."""
    recipient, issued = _recipient(users, kind)
    blob = encrypt_data(CONTENT, [recipient], cipher=cipher)
    impostor_key = {"rsa": users.other, "p256": users.p384, "x25519": users.p256}
    wrong = impostor_key.get(kind.split("-")[0], users.other)
    wrong_pair = KeyPair(issued.certificate, wrong.key)
    try:
        result = decrypt_data(blob, [wrong_pair])
    except (DecryptionFailed, UnsupportedAlgorithm) as e:
        assert "no key" not in str(e)
        return
    # RSA PKCS#1 v1.5 with CBC: the RFC 3218 random key gives valid CBC padding about
    # once in 256 tries, and then garbage comes out; it must never be the plaintext, and
    # it is never called integrity protected (the status says so to the reader)
    assert kind == "rsa" and cipher.endswith("_cbc"), "only v1.5 + CBC may yield garbage"
    assert result.content != CONTENT
    assert not result.integrity_protected


def test_pkcs1v15_failure_is_the_same_generic_error(users: Users) -> None:
    """RFC 3218: a broken RSA block and a broken ciphertext look the same."""
    blob = bytearray(encrypt_data(CONTENT * 10, [users.rsa.certificate], cipher="aes128_gcm"))
    info = cms.ContentInfo.load(bytes(blob))
    encrypted_key = info["content"]["recipient_infos"][0].chosen["encrypted_key"].native
    at = bytes(blob).index(encrypted_key)
    key_broken = bytearray(blob)
    key_broken[at + 10] ^= 1
    content_broken = bytearray(blob)
    content_broken[-40] ^= 1
    messages = set()
    for broken in (key_broken, content_broken):
        with pytest.raises(DecryptionFailed) as caught:
            decrypt_data(bytes(broken), [users.rsa.pair])
        messages.add(str(caught.value))
    assert len(messages) == 1


def test_flipped_gcm_bit_fails(users: Users) -> None:
    blob = encrypt_data(CONTENT, [users.p256.certificate], cipher="aes256_gcm")
    for offset in (-20, -30, -1):  # ciphertext, ciphertext, tag
        broken = bytearray(blob)
        broken[offset] ^= 0x01
        with pytest.raises(DecryptionFailed, match="decryption failed"):
            decrypt_data(bytes(broken), [users.p256.pair])


def test_flipped_cbc_bit_never_yields_the_plaintext(users: Users) -> None:
    """CBC is not integrity protected: a flip gives an error or garbage, and the
    result says ``integrity_protected=False`` so that the reader is warned."""
    content = b"A" * 64
    blob = encrypt_data(content, [users.p256.certificate], cipher="aes256_cbc")
    outcomes = set()
    for offset in (-1, -17, -33, -60):
        broken = bytearray(blob)
        broken[offset] ^= 0x01
        try:
            result = decrypt_data(bytes(broken), [users.p256.pair])
        except DecryptionFailed:
            outcomes.add("failed")
        else:
            assert result.content != content
            assert result.integrity_protected is False
            assert result.status().integrity_protected is False
            outcomes.add("garbage")
    assert outcomes  # each flip was either refused or visibly changed


def test_cbc_without_signature_is_reported_unprotected(users: Users) -> None:
    result = decrypt_data(encrypt_data(CONTENT, [users.rsa.certificate]), [users.rsa.pair])
    assert result.integrity_protected is False


@pytest.mark.parametrize("cut", [1, 10, 100, 300, -1, -16, -100])
def test_truncated_input(users: Users, cut: int) -> None:
    blob = encrypt_data(CONTENT, [users.p256.certificate], cipher="aes128_gcm")
    with pytest.raises(MalformedMessage):
        decrypt_data(blob[:cut], [users.p256.pair])


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00", b"\x30\x80", b"\x30\x84\xff\xff\xff\xff", os.urandom(64), b"hello"],
)
def test_garbage_input(users: Users, data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decrypt_data(data, [users.rsa.pair])
    with pytest.raises(MalformedMessage):
        recipient_identifiers(data)


def test_not_enveloped_content_type(users: Users) -> None:
    data = cms.ContentInfo({"content_type": "data", "content": b"plain"}).dump()
    with pytest.raises(MalformedMessage, match="not EnvelopedData"):
        decrypt_data(data, [users.rsa.pair])


def test_deep_indefinite_nesting_is_bounded(users: Users) -> None:
    data = b"\x30\x80" * 5000 + b"\x00\x00" * 5000
    with pytest.raises(MalformedMessage):
        decrypt_data(data, [users.rsa.pair])


def test_too_many_recipients_refused(users: Users) -> None:
    blob = encrypt_data(CONTENT, [users.p256.certificate])
    info = cms.ContentInfo.load(blob)
    infos = info["content"]["recipient_infos"]
    one = infos[0]
    many = cms.RecipientInfos([one] * 1001)
    data = info["content"].copy()
    data["recipient_infos"] = many
    forged = cms.ContentInfo({"content_type": "enveloped_data", "content": data}).dump()
    with pytest.raises(MalformedMessage, match="more than 1000 recipients"):
        decrypt_data(forged, [users.p256.pair])


def test_encrypt_refuses_bad_arguments(users: Users) -> None:
    with pytest.raises(UnsupportedAlgorithm):
        encrypt_data(CONTENT, [users.rsa.certificate], cipher="des_ede3_cbc")
    with pytest.raises(KeyNotFound):
        encrypt_data(CONTENT, [])
    ed = users.factory.user("ed@example.test", key_kind="ed25519")
    with pytest.raises(UnsupportedAlgorithm):
        encrypt_data(CONTENT, [ed.certificate])


# --------------------------------------------------------------------------- fuzzing


@pytest.fixture(scope="module")
def fuzz_blobs(users: Users) -> list[bytes]:
    return [
        encrypt_data(CONTENT, [users.rsa.certificate, users.p256.certificate]),
        encrypt_data(CONTENT, [users.x25519.certificate], cipher="aes128_gcm"),
    ]


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=512))
def test_fuzz_arbitrary_bytes(users: Users, data: bytes) -> None:
    try:
        decrypt_data(data, [users.rsa.pair])
    except SMIMEProxyError:
        pass


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    which=st.integers(0, 1),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_fuzz_mutated_blob(
    users: Users, fuzz_blobs: list[bytes], which: int, edits: list[tuple[int, int]], cut: int | None
) -> None:
    blob = bytearray(fuzz_blobs[which])
    for position, value in edits:
        blob[position % len(blob)] = value
    if cut is not None:
        blob = blob[: cut % (len(blob) + 1)]
    keys = [users.rsa.pair, users.p256.pair, users.x25519.pair]
    try:
        decrypt_data(bytes(blob), keys)
        recipient_identifiers(bytes(blob))
    except SMIMEProxyError:
        pass
