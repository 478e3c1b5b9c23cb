"""CMS SignedData: our signatures against OpenSSL and gpgsm, theirs against us, the
public vectors, and hostile input."""

from __future__ import annotations

import base64
import datetime
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from asn1crypto import algos, cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smimeproxy.errors import MalformedMessage, SMIMEProxyError, UnsupportedAlgorithm
from smimeproxy.smime.algorithms import encode_capabilities, parse_capabilities
from smimeproxy.smime.keys import KeyPair, load_private_key
from smimeproxy.smime.signed import (
    DEFAULT_CAPABILITIES,
    SignedDataResult,
    decode_pem,
    sign_data,
    verify_data,
)
from smimeproxy.smime.status import Outcome
from smimeproxy.testing import CertificateFactory, Issued
from tests.gpgsm import import_pkcs12

CONTENT = b"Content-Type: text/plain\r\n\r\nHello, signed world.\r\n"
TB = Path("thunderbird-smime/mailnews/test/data/smime")
RFC4134 = Path("rfc4134-python-smail/tests/testdata")


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def pki() -> CertificateFactory:
    return CertificateFactory()


@pytest.fixture(scope="module")
def users(pki: CertificateFactory) -> dict[str, Issued]:
    inter = pki.ca("smimeproxy Test Intermediate", pki.root)
    return {
        "rsa": pki.user("rsa@example.test", inter, key_kind="rsa2048"),
        "p256": pki.user("p256@example.test", key_kind="p256"),
        "p384": pki.user("p384@example.test", key_kind="p384"),
        "ed25519": pki.user("ed@example.test", key_kind="ed25519"),
    }


def outcomes(result: SignedDataResult) -> list[dict[str, Outcome]]:
    return [{c.name: c.outcome for c in s.checks} for s in result.signers]


def all_pass(result: SignedDataResult) -> bool:
    return bool(result.signers) and all(s.valid for s in result.signers)


def crypto_pass(result: SignedDataResult) -> bool:
    """message-digest, signature and content-type pass (ignores digest strength)."""
    return bool(result.signers) and all(
        all(c.outcome is Outcome.PASS for c in s.checks if c.name != "digest-strength")
        for s in result.signers
    )


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None, input: bytes = b""):
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, input=input, capture_output=True, timeout=60
    )


def write(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def mime_cms(path: Path) -> tuple[bytes, bytes | None]:
    """(CMS DER, signed part or None) of an S/MIME mail, by a simple raw split: the
    MIME layer is not under test here."""
    raw = re.sub(rb"(?<!\r)\n", b"\r\n", path.read_bytes())
    head, _, body = raw.partition(b"\r\n\r\n")
    boundary = re.search(rb'boundary="?([^";\r\n]+)"?', head, re.IGNORECASE)
    if b"multipart/signed" not in head.lower() or boundary is None:
        return base64.b64decode(body), None
    parts = (b"\r\n" + body).split(b"\r\n--" + boundary.group(1))
    signed = parts[1].split(b"\r\n", 1)[1]
    sig_body = parts[2].partition(b"\r\n\r\n")[2]
    return base64.b64decode(sig_body), signed


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


# ------------------------------------------------------------------- our own round trip


@pytest.mark.parametrize(
    ("kind", "digest", "pss"),
    [
        ("rsa", "sha256", False),
        ("rsa", "sha384", False),
        ("rsa", "sha512", False),
        ("rsa", "sha256", True),
        ("rsa", "sha512", True),
        ("p256", "sha256", False),
        ("p384", "sha384", False),
        ("ed25519", "sha512", False),
    ],
)
@pytest.mark.parametrize("detached", [True, False])
def test_round_trip(users: dict[str, Issued], kind: str, digest: str, pss: bool, detached: bool):
    user = users[kind]
    sig = sign_data(
        CONTENT, user.pair, chain=user.chain(), digest=digest, pss=pss, detached=detached
    )
    result = verify_data(sig, CONTENT if detached else None)
    assert all_pass(result), outcomes(result)
    assert result.content == CONTENT
    assert result.detached is detached
    assert result.content_type == "data"
    signer = result.signers[0]
    assert signer.certificate == user.certificate
    assert signer.digest_algorithm == digest
    assert signer.capabilities == DEFAULT_CAPABILITIES
    assert set(result.certificates) == {user.certificate, *user.chain()}
    expected_alg = {
        "rsa": "rsassa_pss" if pss else "rsassa_pkcs1v15",
        "p256": "sha256_ecdsa",
        "p384": "sha384_ecdsa",
        "ed25519": "ed25519",
    }[kind]
    assert signer.signature_algorithm == expected_alg


def test_ed25519_always_digests_with_sha512(users: dict[str, Issued]):
    # RFC 8419 section 3: SHA-512 for the messageDigest, whatever the caller asked.
    result = verify_data(sign_data(CONTENT, users["ed25519"].pair, digest="sha256"), CONTENT)
    assert result.signers[0].digest_algorithm == "sha512"
    assert all_pass(result)


def test_signed_attributes(users: dict[str, Issued], pki: CertificateFactory):
    when = datetime.datetime(2031, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)
    enc = pki.user("rsa@example.test", key_kind="p256", key_usage="encrypt")
    sig = sign_data(
        CONTENT,
        users["p256"].pair,
        capabilities=("aes128_gcm", "aes256_cbc"),
        encryption_certificate=enc.certificate,
        signing_time=when,
    )
    result = verify_data(sig, CONTENT)
    signer = result.signers[0]
    assert signer.signing_time == when
    assert signer.capabilities == ("aes128_gcm", "aes256_cbc")
    assert signer.encryption_key_preference == enc.certificate
    assert enc.certificate in result.certificates
    # DER: the SET OF attributes is sorted, and the SignerInfo uses issuerAndSerialNumber.
    info = cms.ContentInfo.load(sig)["content"]["signer_infos"][0]
    encodings = [a.dump() for a in info["signed_attrs"]]
    assert encodings == sorted(encodings)
    assert info["sid"].name == "issuer_and_serial_number"
    assert info["version"].native == "v1"


def test_capability_encoding():
    # RFC 3560 section 5: RSAES-OAEP with default parameters, byte for byte.
    caps = encode_capabilities(["aes256_gcm", "rsaes_oaep"])
    assert caps[1].dump() == bytes.fromhex("300d06092a864886f70d0101073000")
    # AES capabilities carry no parameters (RFC 3565 section 5).
    assert caps[0].dump() == bytes.fromhex("300b060960864801650304012e")
    assert parse_capabilities(caps.dump()) == ("aes256_gcm", "rsaes_oaep")
    with pytest.raises(UnsupportedAlgorithm):
        encode_capabilities(["rot13"])


def test_refuses_unknown_digest(users: dict[str, Issued]):
    with pytest.raises(UnsupportedAlgorithm):
        sign_data(CONTENT, users["rsa"].pair, digest="md5")
    with pytest.raises(UnsupportedAlgorithm):
        sign_data(CONTENT, users["p256"].pair, pss=True)


# ----------------------------------------------------------------------------- OpenSSL


@pytest.mark.parametrize(
    ("kind", "digest", "pss"),
    [
        ("rsa", "sha256", False),
        ("rsa", "sha384", False),
        ("rsa", "sha512", False),
        ("rsa", "sha256", True),
        ("p256", "sha256", False),
        ("p384", "sha512", False),
    ],
)
def test_openssl_verifies_ours(
    openssl: str, tmp_path: Path, users: dict[str, Issued], pki, kind, digest, pss
):
    user = users[kind]
    root = write(tmp_path, "root.pem", pki.root.cert_pem)
    content = write(tmp_path, "content.bin", CONTENT)
    detached = sign_data(CONTENT, user.pair, chain=user.chain(), digest=digest, pss=pss)
    sig = write(tmp_path, "sig.der", detached)
    common = ["-binary", "-inform", "DER", "-CAfile", root, "-purpose", "any"]
    proc = run(openssl, "cms", "-verify", "-in", sig, "-content", content, *common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    opaque = write(
        tmp_path,
        "opaque.der",
        sign_data(CONTENT, user.pair, chain=user.chain(), digest=digest, pss=pss, detached=False),
    )
    proc = run(openssl, "cms", "-verify", "-in", opaque, *common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == CONTENT
    # and OpenSSL notices a changed byte
    write(tmp_path, "content.bin", CONTENT.replace(b"Hello", b"Jello"))
    proc = run(openssl, "cms", "-verify", "-in", sig, "-content", content, *common, cwd=tmp_path)
    assert proc.returncode != 0


def test_ed25519_signature_checks_with_openssl_pkeyutl(
    openssl: str, tmp_path: Path, users: dict[str, Issued]
):
    """OpenSSL 3.0's ``cms -verify`` cannot verify Ed25519 SignedData at all
    (``eddsa_digest_signverify_init:invalid digest``), so check the raw signature over
    DER(signed attributes) with ``pkeyutl -rawin`` instead, and the digest ourselves."""
    user = users["ed25519"]
    info = cms.ContentInfo.load(sign_data(CONTENT, user.pair))["content"]["signer_infos"][0]
    attrs = info["signed_attrs"].untag().dump(force=True)
    assert attrs[0] == 0x31
    pub = user.certificate.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write(tmp_path, "pub.pem", pub)
    write(tmp_path, "attrs.der", attrs)
    write(tmp_path, "sig.bin", info["signature"].native)
    proc = run(
        openssl,
        "pkeyutl",
        "-verify",
        "-pubin",
        "-inkey",
        "pub.pem",
        "-rawin",
        "-in",
        "attrs.der",
        "-sigfile",
        "sig.bin",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert b"Signature Verified Successfully" in proc.stdout


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("rsa", ["-md", "sha256"]),
        ("rsa", ["-md", "sha384"]),
        ("rsa", ["-md", "sha512"]),
        ("rsa", ["-md", "sha256", "-keyopt", "rsa_padding_mode:pss"]),
        ("rsa", ["-md", "sha512", "-keyopt", "rsa_padding_mode:pss"]),
        ("p256", ["-md", "sha256"]),
        ("p384", ["-md", "sha384"]),
    ],
)
@pytest.mark.parametrize("detached", [True, False])
def test_we_verify_openssl(openssl: str, tmp_path: Path, users, kind, extra, detached):
    user = users[kind]
    write(tmp_path, "cert.pem", user.cert_pem)
    write(tmp_path, "key.pem", user.key_pem)
    write(tmp_path, "content.bin", CONTENT)
    args = [
        "cms",
        "-sign",
        "-binary",
        "-in",
        "content.bin",
        "-signer",
        "cert.pem",
        "-inkey",
        "key.pem",
        "-outform",
        "DER",
        "-out",
        "sig.der",
        *extra,
    ]
    if not detached:
        args.append("-nodetach")
    proc = run(openssl, *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    sig = (tmp_path / "sig.der").read_bytes()
    result = verify_data(sig, CONTENT if detached else None)
    assert all_pass(result), outcomes(result)
    assert result.content == CONTENT
    assert result.signers[0].certificate == user.certificate
    if "rsa_padding_mode:pss" in extra:
        assert result.signers[0].signature_algorithm == "rsassa_pss"
    # OpenSSL announces its capabilities; we read them
    assert "aes256_cbc" in result.signers[0].capabilities
    bad = verify_data(sig, CONTENT + b"x") if detached else None
    if bad is not None:
        assert outcomes(bad)[0]["message-digest"] is Outcome.FAIL


def test_openssl_sha1_pss_is_reported_weak(openssl: str, tmp_path: Path, users):
    user = users["rsa"]
    write(tmp_path, "cert.pem", user.cert_pem)
    write(tmp_path, "key.pem", user.key_pem)
    write(tmp_path, "content.bin", CONTENT)
    proc = run(
        openssl,
        "cms",
        "-sign",
        "-binary",
        "-in",
        "content.bin",
        "-signer",
        "cert.pem",
        "-inkey",
        "key.pem",
        "-md",
        "sha1",
        "-keyopt",
        "rsa_padding_mode:pss",
        "-outform",
        "DER",
        "-out",
        "sig.der",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    result = verify_data((tmp_path / "sig.der").read_bytes(), CONTENT)
    assert crypto_pass(result), outcomes(result)
    assert outcomes(result)[0]["digest-strength"] is Outcome.FAIL
    assert any("sha1" in e for e in result.signers[0].errors)


def test_we_verify_openssl_nocerts_needs_certificate(openssl: str, tmp_path: Path, users):
    user = users["rsa"]
    write(tmp_path, "cert.pem", user.cert_pem)
    write(tmp_path, "key.pem", user.key_pem)
    write(tmp_path, "content.bin", CONTENT)
    proc = run(
        openssl,
        "cms",
        "-sign",
        "-binary",
        "-nocerts",
        "-in",
        "content.bin",
        "-signer",
        "cert.pem",
        "-inkey",
        "key.pem",
        "-outform",
        "DER",
        "-out",
        "sig.der",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    result = verify_data((tmp_path / "sig.der").read_bytes(), CONTENT)
    checks = outcomes(result)[0]
    assert checks["message-digest"] is Outcome.PASS
    assert checks["signature"] is Outcome.FAIL  # no certificate: never a pass
    assert result.signers[0].certificate is None


# ------------------------------------------------------------------------------- gpgsm


@pytest.fixture(scope="module")
def gpg_pki() -> CertificateFactory:
    # gpgsm 2.2 is happiest with an RSA hierarchy
    return CertificateFactory(root_key_kind="rsa2048")


@pytest.fixture
def gnupghome(gpgsm: str, tmp_path: Path, gpg_pki: CertificateFactory, openssl: str):
    """A GNUPGHOME holding the user's key (imported from a PKCS#12) and a trusted root."""
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    user = gpg_pki.user("gpg@example.test", key_kind="rsa2048")
    write(tmp_path, "u.key", user.key_pem)
    write(tmp_path, "u.crt", user.cert_pem)
    write(tmp_path, "root.pem", gpg_pki.root.cert_pem)
    env = {**os.environ, "GNUPGHOME": str(home)}
    # a PKCS#12 gpgsm 2.2 can read, retried with a fresh salt (see tests/gpgsm.py)
    import_pkcs12(gpgsm, env, user.private_key, user.certificate, [gpg_pki.root.certificate])
    fpr = gpg_pki.root.certificate.fingerprint(hashes.SHA1()).hex().upper()
    (home / "trustlist.txt").write_text(f"{fpr} S relax\n")
    yield env, user
    gpgconf = shutil.which("gpgconf")
    if gpgconf:  # stop the agent this home started
        run(gpgconf, "--kill", "all", cwd=tmp_path, env=env)


def test_gpgsm_verifies_ours(gpgsm: str, tmp_path: Path, gnupghome):
    env, user = gnupghome
    write(tmp_path, "content.bin", CONTENT)
    write(tmp_path, "sig.der", sign_data(CONTENT, user.pair))
    args = [gpgsm, "--batch", "--disable-crl-checks", "--status-fd", "1"]
    proc = run(*args, "--verify", "sig.der", "content.bin", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert b"[GNUPG:] GOODSIG" in proc.stdout
    write(tmp_path, "content.bin", CONTENT + b"!")
    proc = run(*args, "--verify", "sig.der", "content.bin", cwd=tmp_path, env=env)
    assert proc.returncode != 0
    assert b"GOODSIG" not in proc.stdout


@pytest.mark.parametrize("mode", ["--detach-sign", "--sign"])
def test_we_verify_gpgsm(gpgsm: str, tmp_path: Path, gnupghome, mode: str):
    env, user = gnupghome
    write(tmp_path, "content.bin", CONTENT)
    proc = run(
        gpgsm,
        "--batch",
        "--pinentry-mode",
        "loopback",
        "--passphrase-fd",
        "0",
        "--disable-crl-checks",
        mode,
        "--local-user",
        "gpg@example.test",
        "-o",
        "sig.der",
        "content.bin",
        cwd=tmp_path,
        env=env,
        input=b"pw\n",
    )
    assert proc.returncode == 0, proc.stderr
    sig = (tmp_path / "sig.der").read_bytes()
    result = verify_data(sig, CONTENT if mode == "--detach-sign" else None)
    assert all_pass(result), outcomes(result)
    assert result.content == CONTENT
    assert result.signers[0].certificate == user.certificate


# ----------------------------------------------------------------------------- vectors


@pytest.mark.parametrize("sha", ["SHA1", "SHA256", "SHA384", "SHA512"])
@pytest.mark.parametrize("form", ["sig.{}.opaque", "dsig.{}.multipart"])
def test_thunderbird_good(vectors: Path, sha: str, form: str):
    der, signed = mime_cms(vectors / TB / f"alice.{form.format(sha)}.eml")
    result = verify_data(der, signed)
    assert crypto_pass(result), outcomes(result)
    assert b"This is a test message from Alice to Bob." in result.content
    signer = result.signers[0]
    assert "CN=Alice" in signer.certificate.subject.rfc4514_string()
    strength = signer.check("digest-strength")
    assert strength is not None
    # SHA-1 verifies, but is visibly weak (Thunderbird calls it bad)
    assert strength.outcome is (Outcome.FAIL if sha == "SHA1" else Outcome.PASS)
    assert signer.valid is (sha != "SHA1")


@pytest.mark.parametrize("sha", ["SHA1", "SHA256", "SHA384", "SHA512"])
@pytest.mark.parametrize("kind", ["bad", "mismatch-econtent"])
def test_thunderbird_bad(vectors: Path, sha: str, kind: str):
    der, signed = mime_cms(vectors / TB / f"alice.dsig.{sha}.multipart.{kind}.eml")
    result = verify_data(der, signed)
    assert not crypto_pass(result)
    assert outcomes(result)[0]["message-digest"] is Outcome.FAIL


@pytest.mark.parametrize("name", ["4.2.bin", "4.5.bin", "4.1.bin", "4.7.bin", "4.10.bin"])
def test_rfc4134_encapsulated(vectors: Path, name: str):
    result = verify_data((vectors / RFC4134 / name).read_bytes())
    assert result.content == (vectors / RFC4134 / "ExContent.bin").read_bytes()
    assert crypto_pass(result), outcomes(result)
    assert all(s.check("digest-strength").outcome is Outcome.FAIL for s in result.signers)


def test_rfc4134_detached(vectors: Path):
    content = (vectors / RFC4134 / "ExContent.bin").read_bytes()
    result = verify_data((vectors / RFC4134 / "4.3.bin").read_bytes(), content)
    assert result.detached
    assert crypto_pass(result), outcomes(result)
    assert not crypto_pass(verify_data((vectors / RFC4134 / "4.3.bin").read_bytes(), b"x"))


def test_rfc4134_crl_and_attributes(vectors: Path):
    result = verify_data((vectors / RFC4134 / "4.4.bin").read_bytes())
    assert crypto_pass(result), outcomes(result)
    assert len(result.crls) == 1
    rich = verify_data((vectors / RFC4134 / "4.10.bin").read_bytes())
    assert rich.signers[0].capabilities  # smimeCapabilities among many attributes


def test_rfc4134_certificates_only(vectors: Path):
    result = verify_data((vectors / RFC4134 / "4.11.bin").read_bytes())
    assert result.signers == ()
    assert len(result.certificates) >= 2


def test_rfc4134_inherited_dsa_parameters_fail_softly(vectors: Path):
    # Diane's certificate inherits DSA parameters: her key is unusable, never an exception.
    result = verify_data((vectors / RFC4134 / "4.6.bin").read_bytes())
    assert len(result.signers) == 2
    assert not crypto_pass(result)


@pytest.mark.parametrize(
    ("name", "algorithm"),
    [
        ("signedByAliceRSA", "rsassa_pkcs1v15"),
        ("signedByAliceRSAPSS", "rsassa_pss"),
        ("signedByCarlosEd25519", "ed25519"),
    ],
)
def test_examples_cms(vectors: Path, name: str, algorithm: str):
    der = (vectors / "examples-cms/binary-files" / f"{name}.p7m").read_bytes()
    result = verify_data(der)
    assert all_pass(result), outcomes(result)
    assert result.content == b"This is some sample content."
    assert result.signers[0].signature_algorithm == algorithm
    pem = (vectors / "examples-cms/pem-encoded" / f"{name}.pem").read_bytes()
    assert decode_pem(pem) == der
    assert verify_data(pem).content == result.content


def test_examples_cms_detached_ski_no_signed_attributes(vectors: Path):
    der = (vectors / "examples-cms/binary-files/signedByCarlosDetached.p7m").read_bytes()
    # signer found by subjectKeyIdentifier; pure Ed25519 over the content itself
    result = verify_data(der, b"This is some sample content.")
    assert result.detached
    assert all_pass(result), outcomes(result)
    assert "message-digest" not in outcomes(result)[0]
    assert outcomes(verify_data(der, b"This is some sample content!"))[0]["signature"] is (
        Outcome.FAIL
    )


def test_examples_cms_two_signers_no_certs(vectors: Path):
    der = (vectors / "examples-cms/binary-files/signedByAliceAndCarlosNoCerts.p7m").read_bytes()
    result = verify_data(der)
    assert len(result.signers) == 2
    assert all(o["signature"] is Outcome.FAIL for o in outcomes(result))
    # with the certificates from elsewhere, both signers (RSA and Ed25519) verify
    known = [
        x509.load_pem_x509_certificate((vectors / "rfc9216" / f"{who}.sign.crt").read_bytes())
        for who in ("alice", "carlos")
    ]
    result = verify_data(der, extra_certificates=known)
    assert all_pass(result), outcomes(result)
    assert {s.certificate for s in result.signers} == set(known)
    assert result.certificates == ()


@pytest.mark.parametrize("name", ["eContent_confusion.eml", "eContent_confusion_refinement.eml"])
def test_johnny_econtent_confusion(vectors: Path, name: str):
    path = vectors / "johnny-you-are-fired/01-cms/c1_eContent-confusion" / name
    der, signed = mime_cms(path)
    result = verify_data(der, signed)
    assert result.content == signed
    assert not crypto_pass(result)
    assert outcomes(result)[0]["encapsulated-content"] is Outcome.FAIL


def test_johnny_valid_baseline_and_no_signers(vectors: Path):
    der, signed = mime_cms(vectors / "johnny-you-are-fired/01-cms/valid_email_from_manager.eml")
    assert crypto_pass(verify_data(der, signed))
    der, signed = mime_cms(
        vectors / "johnny-you-are-fired/01-cms/c3_no-signerInfos/no_signerInfos_detached.eml"
    )
    assert verify_data(der, signed).signers == ()


def test_johnny_crash_is_malformed(vectors: Path):
    der, signed = mime_cms(vectors / "johnny-you-are-fired/01-cms/crashes/crash_01.eml")
    with pytest.raises(MalformedMessage):
        verify_data(der, signed)


@pytest.mark.parametrize("where", ["append", "prepend"])
def test_johnny_extra_signer_is_not_a_pass(vectors: Path, where: str):
    folder = vectors / "johnny-you-are-fired/01-cms/c2_multiple-signerInfos"
    path = folder / f"multiple_signerInfos_{where}_johnny.eml"
    der, signed = mime_cms(path)
    result = verify_data(der, signed)
    assert len(result.signers) >= 2
    assert not crypto_pass(result)


def test_gnupg_samples(vectors: Path):
    base = vectors / "gnupg-cms/tests/cms"
    good = verify_data((base / "text-1.osig.pem").read_bytes())
    assert good.content == (base / "text-1.txt").read_bytes()
    checks = outcomes(good)[0]
    assert checks["message-digest"] is Outcome.PASS
    assert checks["signature"] is Outcome.PASS
    assert checks["content-type"] is Outcome.FAIL  # gpgsm omitted the mandatory attribute
    bad = verify_data((base / "text-1.osig-bad.pem").read_bytes())
    assert outcomes(bad)[0]["message-digest"] is Outcome.FAIL
    detached = verify_data(
        (base / "text-1.dsig.pem").read_bytes(), (base / "text-1.txt").read_bytes()
    )
    assert outcomes(detached)[0]["signature"] is Outcome.PASS


def test_webde_broken_outer_oid(vectors: Path):
    data = (vectors / "gnupg-cms/tests/cms/samplemsgs/webde-buenemann-signed.cms").read_bytes()
    # gpgsm itself rejects this object ("Unknown CMS object"); its inner eContentType
    # and attributes are broken too. We read past the outer OID and never pass it.
    result = verify_data(data)
    assert result.signers
    assert not crypto_pass(result)


def test_rfc9788_opaque(vectors: Path):
    der, _ = mime_cms(vectors / "rfc9788-header-protection/smime-one-part.eml")
    result = verify_data(der)
    assert all_pass(result), outcomes(result)
    assert "alice" in result.signers[0].certificate.subject.rfc4514_string().lower()


# ------------------------------------------------------------------------ hostile input


@pytest.fixture(scope="module")
def sample(users: dict[str, Issued]) -> bytes:
    return sign_data(CONTENT, users["p256"].pair, detached=False)


def test_tampered_content(users: dict[str, Issued]):
    sig = sign_data(CONTENT, users["rsa"].pair, detached=False)
    offset = sig.index(b"Hello")
    result = verify_data(flip(sig, offset))
    assert outcomes(result)[0]["message-digest"] is Outcome.FAIL
    assert outcomes(result)[0]["signature"] is Outcome.PASS


def test_tampered_signature_byte(users: dict[str, Issued]):
    sig = sign_data(CONTENT, users["rsa"].pair)
    signature = cms.ContentInfo.load(sig)["content"]["signer_infos"][0]["signature"].native
    offset = sig.index(signature) + 10
    result = verify_data(flip(sig, offset), CONTENT)
    assert outcomes(result)[0]["signature"] is Outcome.FAIL
    assert outcomes(result)[0]["message-digest"] is Outcome.PASS


def test_tampered_signed_attribute(users: dict[str, Issued]):
    when = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    sig = sign_data(CONTENT, users["p256"].pair, signing_time=when)
    offset = sig.index(b"300101")  # UTCTime 300101000000Z
    result = verify_data(sig[:offset] + b"310101" + sig[offset + 6 :], CONTENT)
    assert outcomes(result)[0]["signature"] is Outcome.FAIL


def test_wrong_detached_content_and_missing_content(users: dict[str, Issued]):
    sig = sign_data(CONTENT, users["ed25519"].pair)
    assert outcomes(verify_data(sig, b"other"))[0]["message-digest"] is Outcome.FAIL
    assert outcomes(verify_data(sig))[0]["message-digest"] is Outcome.FAIL


def test_content_type_mismatch(users: dict[str, Issued]):
    sig = sign_data(CONTENT, users["p256"].pair, detached=False)
    data_oid = bytes.fromhex("06092a864886f70d010701")  # id-data; the first is eContentType
    other = bytes.fromhex("06092a864886f70d010705")  # id-digestedData, same length
    result = verify_data(sig.replace(data_oid, other, 1))
    assert result.content_type == "digested_data"
    assert outcomes(result)[0]["content-type"] is Outcome.FAIL


def test_unknown_signature_algorithm(users: dict[str, Issued]):
    info = cms.ContentInfo.load(sign_data(CONTENT, users["rsa"].pair))
    si = info["content"]["signer_infos"][0]
    si["signature_algorithm"] = algos.SignedDigestAlgorithm({"algorithm": "1.2.3.4.5"})
    result = verify_data(info.dump(force=True), CONTENT)
    assert outcomes(result)[0]["signature"] is Outcome.FAIL
    assert "1.2.3.4.5" in result.signers[0].signature_algorithm


def test_unknown_digest_algorithm(users: dict[str, Issued]):
    info = cms.ContentInfo.load(sign_data(CONTENT, users["p256"].pair))
    si = info["content"]["signer_infos"][0]
    si["digest_algorithm"] = algos.DigestAlgorithm({"algorithm": "1.2.3.4.6"})
    result = verify_data(info.dump(force=True), CONTENT)
    assert outcomes(result)[0]["message-digest"] is Outcome.FAIL


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00", b"garbage" * 10, b"0\x80", b"-----BEGIN PKCS7-----\n!!\n-----END PKCS7-----"],
)
def test_junk_is_malformed(data: bytes):
    with pytest.raises(MalformedMessage):
        verify_data(data)


def test_truncations_are_malformed(sample: bytes):
    for cut in (1, 10, len(sample) // 2, len(sample) - 1):
        with pytest.raises(MalformedMessage):
            verify_data(sample[:cut])


def test_not_signed_data_is_malformed(vectors: Path):
    with pytest.raises(MalformedMessage):
        verify_data((vectors / RFC4134 / "5.1.bin").read_bytes())


def test_too_many_signers_refused(users: dict[str, Issued]):
    info = cms.ContentInfo.load(sign_data(CONTENT, users["p256"].pair))
    si = info["content"]["signer_infos"][0]
    info["content"]["signer_infos"] = cms.SignerInfos([si] * 1001)
    with pytest.raises(MalformedMessage):
        verify_data(info.dump(force=True), CONTENT)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes(data: bytes):
    try:
        verify_data(data)
    except SMIMEProxyError:
        pass


_SAMPLE: list[bytes] = []


def _sample() -> bytes:
    if not _SAMPLE:
        pair = KeyPair(*_fuzz_pair())
        _SAMPLE.append(sign_data(CONTENT, pair, detached=False))
    return _SAMPLE[0]


def _fuzz_pair():
    factory = CertificateFactory()
    user = factory.user("fuzz@example.test", key_kind="p256")
    return user.certificate, load_private_key(user.key_pem)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutations(data: st.DataObject):
    sig = bytearray(_sample())
    for _ in range(data.draw(st.integers(1, 4))):
        offset = data.draw(st.integers(0, len(sig) - 1))
        sig[offset] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(sig)))
    try:
        result = verify_data(bytes(sig[:cut]))
    except SMIMEProxyError:
        return
    assert isinstance(result, SignedDataResult)
