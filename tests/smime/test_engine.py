"""The engine end to end: seal and open whole messages, against ourselves and OpenSSL."""

from __future__ import annotations

import base64
import datetime
import email
import email.policy
import subprocess
from pathlib import Path

import pytest

from smimeproxy.pki.validation import PathValidator
from smimeproxy.smime import mime
from smimeproxy.smime.opener import OpenOptions, open_message
from smimeproxy.smime.sealer import EncryptionTarget, SealOptions, seal
from smimeproxy.smime.status import SMIMEResult
from smimeproxy.testing import CertificateFactory

PLAIN = (
    b"From: Alice <alice@acme.test>\r\n"
    b"To: Bob <bob@partner.test>\r\n"
    b"Subject: quarterly figures\r\n"
    b"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <q3@acme.test>\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Gr\xc3\xbc\xc3\x9fe, the figures are attached.\r\n"
    b"From the desk of Alice\r\n"
)
OPTS = OpenOptions(authserv_id="acme.test")


@pytest.fixture(scope="module")
def pki():
    f = CertificateFactory()
    return {
        "factory": f,
        "alice": f.user("alice@acme.test"),
        "bob": f.user("bob@partner.test"),
        "carol": f.user("carol@partner.test", key_kind="p256"),
        "mallory": f.user("mallory@evil.test"),
    }


@pytest.fixture(scope="module")
def validator(pki):
    return PathValidator([pki["factory"].root.certificate])


def _body_text(data: bytes) -> str:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    texts = []
    for part in msg.walk():
        if part.get_content_type() == "text/plain":
            texts.append(part.get_content())
    return "\n".join(texts)


def test_sign_and_encrypt_round_trip(pki, validator):
    sealed = seal(
        PLAIN,
        signer=pki["alice"].pair,
        recipients=[pki["bob"].certificate, pki["alice"].certificate],
    )
    assert b"Gr\xc3\xbc" not in sealed and b"attached" not in sealed
    assert b"smime-type=enveloped-data" in sealed
    opened = open_message(sealed, keys=[pki["bob"].pair], validator=validator, options=OPTS)
    status = opened.status
    assert status.layers == ("enveloped", "signed")
    assert status.decryption and status.decryption.decrypted
    assert status.decryption.cipher == "aes256_cbc"
    assert status.smime_result is SMIMEResult.PASS, status.as_dict()
    assert status.identifier == "alice@acme.test"
    assert status.integrity_protected
    text = _body_text(opened.data)
    assert "Grüße, the figures are attached." in text
    assert "alice@acme.test" in text  # the footer names the signer
    assert b"Authentication-Results: acme.test; smime=pass" in opened.data
    assert b"Subject: quarterly figures" in opened.data
    # the sender's own copy stays readable
    mine = open_message(sealed, keys=[pki["alice"].pair], validator=validator, options=OPTS)
    assert mine.status.smime_result is SMIMEResult.PASS


@pytest.mark.parametrize("cipher", ["aes128_cbc", "aes256_cbc", "aes128_gcm", "aes256_gcm"])
def test_ciphers_and_ec_recipient(pki, validator, cipher):
    sealed = seal(
        PLAIN,
        signer=pki["alice"].pair,
        recipients=[pki["carol"].certificate],
        options=SealOptions(cipher=cipher),
    )
    expected = "authEnveloped-data" if cipher.endswith("gcm") else "enveloped-data"
    assert f"smime-type={expected}".encode() in sealed
    opened = open_message(sealed, keys=[pki["carol"].pair], validator=validator, options=OPTS)
    assert opened.status.decryption.cipher == cipher
    assert opened.status.smime_result is SMIMEResult.PASS
    assert opened.status.decryption.integrity_protected is cipher.endswith("gcm")


def test_gcm_chosen_when_every_recipient_advertised_it(pki):
    caps = ("aes256_gcm", "aes128_gcm", "aes256_cbc")
    sealed = seal(
        PLAIN,
        signer=pki["alice"].pair,
        recipients=[
            EncryptionTarget(pki["bob"].certificate, caps),
            EncryptionTarget(pki["carol"].certificate, caps),
        ],
    )
    assert b"authEnveloped-data" in sealed
    mixed = seal(
        PLAIN,
        signer=pki["alice"].pair,
        recipients=[
            EncryptionTarget(pki["bob"].certificate, caps),
            EncryptionTarget(pki["carol"].certificate, None),
        ],
    )
    assert b"smime-type=enveloped-data" in mixed


def test_clear_signed_part_kept_byte_for_byte(pki, validator):
    signed = seal(PLAIN, signer=pki["alice"].pair)
    top = mime.parse_entity(signed)
    assert top.mime_type == "multipart/signed"
    boundary = top.content_type()[1]["boundary"]
    _, parts, _, _ = mime.split_multipart(top.body, boundary)
    opened = open_message(signed, validator=validator, options=OPTS)
    assert opened.status.smime_result is SMIMEResult.PASS
    assert opened.status.layers == ("signed",)
    # the whole multipart/signed entity stands unchanged inside what the reader gets
    assert parts[0] in opened.data and parts[1] in opened.data


def test_opaque_signed(pki, validator):
    signed = seal(PLAIN, signer=pki["alice"].pair, options=SealOptions(detached=False))
    assert b"smime-type=signed-data" in signed
    opened = open_message(signed, validator=validator, options=OPTS)
    assert opened.status.layers == ("opaque-signed",)
    assert opened.status.smime_result is SMIMEResult.PASS
    assert "Grüße" in _body_text(opened.data)


def test_lf_only_input_survives(pki, validator):
    lf = PLAIN.replace(b"\r\n", b"\n")
    sealed = seal(lf, signer=pki["alice"].pair, recipients=[pki["bob"].certificate])
    assert b"\r\n" not in sealed
    opened = open_message(sealed, keys=[pki["bob"].pair], validator=validator, options=OPTS)
    assert opened.status.smime_result is SMIMEResult.PASS
    # and a transport that turns every line end into CRLF breaks nothing
    crlf = sealed.replace(b"\n", b"\r\n")
    again = open_message(crlf, keys=[pki["bob"].pair], validator=validator, options=OPTS)
    assert again.status.smime_result is SMIMEResult.PASS


# -- negative cases ---------------------------------------------------------------------


def test_body_altered_after_signing(pki, validator):
    signed = seal(PLAIN, signer=pki["alice"].pair)
    tampered = signed.replace(b"attached.", b"attacked.")
    assert tampered != signed
    opened = open_message(tampered, validator=validator, options=OPTS)
    assert opened.status.smime_result is SMIMEResult.FAIL
    assert not opened.status.verified


def test_untrusted_signer(pki):
    other = CertificateFactory()
    signed = seal(PLAIN, signer=pki["alice"].pair)
    opened = open_message(signed, validator=PathValidator([other.root.certificate]), options=OPTS)
    assert opened.status.smime_result is SMIMEResult.POLICY
    assert b"smime=policy" in opened.data


def test_from_differs_from_signer(pki, validator):
    spoofed = PLAIN.replace(b"alice@acme.test", b"ceo@acme.test")
    signed = seal(spoofed, signer=pki["alice"].pair)
    opened = open_message(signed, validator=validator, options=OPTS)
    assert opened.status.smime_result is SMIMEResult.POLICY
    (signer,) = opened.status.signers
    assert signer.certificate_status.check("address").outcome == "fail"


def test_revoked_signer(pki):
    f = pki["factory"]
    crl = f.crl(f.root, [pki["alice"]])
    signed = seal(PLAIN, signer=pki["alice"].pair)
    opened = open_message(
        signed, validator=PathValidator([f.root.certificate], crls=[crl]), options=OPTS
    )
    assert opened.status.smime_result is SMIMEResult.FAIL


def test_wrong_key_leaves_message_unchanged(pki, validator):
    sealed = seal(PLAIN, signer=pki["alice"].pair, recipients=[pki["bob"].certificate])
    opened = open_message(sealed, keys=[pki["mallory"].pair], validator=validator, options=OPTS)
    assert opened.status.decryption is not None and not opened.status.decryption.decrypted
    assert not opened.changed
    # the encrypted body is passed on as it was, flagged
    assert mime.parse_entity(sealed).body in opened.data
    assert b"X-SMIMEProxy-Status: undecryptable" in opened.data


def test_efail_spliced_ciphertext_not_decrypted(pki, validator):
    sealed = seal(PLAIN, signer=None, recipients=[pki["bob"].certificate])
    enc = mime.parse_entity(sealed)
    part = mime.Entity(enc.content_headers(), enc.body, enc.eol)
    attack = mime.build_multipart(
        [
            mime.HeaderField.make("From", "alice@acme.test"),
            mime.HeaderField.make("Subject", "re: hello"),
        ],
        "mixed",
        [
            b'Content-Type: text/html\r\n\r\n<img src="http://evil.test/',
            part.to_bytes(),
            b'Content-Type: text/html\r\n\r\n">',
        ],
    ).to_bytes()
    opened = open_message(attack, keys=[pki["bob"].pair], validator=validator, options=OPTS)
    assert b"figures" not in opened.data
    assert opened.status.decryption is None
    assert any("not decrypted" in e for e in opened.status.errors)


def test_partially_signed(pki, validator):
    signed = seal(PLAIN, signer=pki["alice"].pair)
    inner = mime.parse_entity(signed)
    part = mime.Entity(inner.content_headers(), inner.body, inner.eol)
    mixed = mime.build_multipart(
        [mime.HeaderField.make("From", "alice@acme.test")],
        "mixed",
        [b"Content-Type: text/plain\r\n\r\nPlease wire the money today.\r\n", part.to_bytes()],
    ).to_bytes()
    opened = open_message(mixed, validator=validator, options=OPTS)
    assert opened.status.partially_signed
    assert opened.status.smime_result is SMIMEResult.NEUTRAL
    assert not opened.status.verified


def test_cbc_without_signature_is_not_integrity_protected(pki, validator):
    sealed = seal(PLAIN, recipients=[pki["bob"].certificate])
    opened = open_message(sealed, keys=[pki["bob"].pair], validator=validator, options=OPTS)
    assert opened.status.decryption.decrypted
    assert not opened.status.integrity_protected
    assert any("integrity" in w for w in opened.status.warnings)


def test_flipped_cbc_bits_never_pass_altered_text(pki, validator):
    """CBC is malleable: a flipped bit must never yield altered text marked as verified."""
    sealed = seal(PLAIN, signer=pki["alice"].pair, recipients=[pki["bob"].certificate])
    top = mime.parse_entity(sealed)
    der = top.decoded_body()
    reference = open_message(sealed, keys=[pki["bob"].pair], validator=validator, options=OPTS)
    original_text = _body_text(reference.data)
    failures = 0
    for offset in range(len(der) - 17, 300, -61):
        mutated = der[:offset] + bytes([der[offset] ^ 0x04]) + der[offset + 1 :]
        msg = top.header_bytes() + b"\r\n" + mime.base64_body(mutated)
        opened = open_message(msg, keys=[pki["bob"].pair], validator=validator, options=OPTS)
        if opened.status.smime_result is SMIMEResult.PASS:
            assert _body_text(opened.data) == original_text, offset
        else:
            failures += 1
    assert failures > 10


def test_corrupt_cms_passed_on_unchanged(pki, validator):
    sealed = seal(PLAIN, signer=pki["alice"].pair, recipients=[pki["bob"].certificate])
    top = mime.parse_entity(sealed)
    truncated = top.header_bytes() + b"\r\n" + top.body[: len(top.body) // 3]
    opened = open_message(truncated, keys=[pki["bob"].pair], validator=validator, options=OPTS)
    assert not opened.changed
    assert opened.status.smime_result is not SMIMEResult.PASS
    assert top.body[: len(top.body) // 3] in opened.data


def test_forged_status_headers_removed(pki, validator):
    forged = (
        b"Authentication-Results: acme.test; smime=pass body.smime-identifier=ceo@acme.test\r\n"
        b"authentication-results: ACME.TEST 1; smime=pass\r\n"
        b"Authentication-Results: mx.partner.test; spf=pass\r\n"
        b"X-SMIMEProxy-Decryption: decrypted; cipher=aes256_gcm\r\n"
    ) + PLAIN
    opened = open_message(forged, validator=validator, options=OPTS)
    data = opened.data
    assert data.count(b"acme.test; smime=") == 1
    assert b"acme.test; smime=none" in data
    assert b"ceo@acme.test" not in data
    assert b"mx.partner.test; spf=pass" in data
    assert b"aes256_gcm" not in data


def test_header_protection_round_trip(pki, validator):
    sealed = seal(
        PLAIN,
        signer=pki["alice"].pair,
        recipients=[pki["bob"].certificate],
        options=SealOptions(header_protection=True),
    )
    outer = mime.parse_entity(sealed)
    assert outer.get("Subject") != "quarterly figures"
    opened = open_message(sealed, keys=[pki["bob"].pair], validator=validator, options=OPTS)
    assert opened.status.smime_result is SMIMEResult.PASS
    msg = email.message_from_bytes(opened.data, policy=email.policy.default)
    assert msg["Subject"] == "quarterly figures"
    assert opened.status.header_protection is not None
    assert "Subject" in {h.title() for h in opened.status.header_protection.restored}


def test_triple_wrapped(pki, validator):
    inner = seal(PLAIN, signer=pki["alice"].pair, recipients=[pki["bob"].certificate])
    outer = seal(inner, signer=pki["alice"].pair, options=SealOptions(detached=False))
    opened = open_message(outer, keys=[pki["bob"].pair], validator=validator, options=OPTS)
    assert opened.status.layers == ("opaque-signed", "enveloped", "signed")
    assert "Grüße" in _body_text(opened.data)


# -- OpenSSL interop -----------------------------------------------------------------------


def _write(tmp: Path, name: str, data: bytes) -> str:
    path = tmp / name
    path.write_bytes(data)
    return str(path)


def test_openssl_reads_our_sealed_message(pki, openssl, tmp_path):
    sealed = seal(PLAIN, signer=pki["alice"].pair, recipients=[pki["bob"].certificate])
    msg = _write(tmp_path, "sealed.eml", sealed)
    key = _write(tmp_path, "bob.key", pki["bob"].key_pem)
    cert = _write(tmp_path, "bob.pem", pki["bob"].cert_pem)
    ca = _write(tmp_path, "ca.pem", pki["factory"].root.cert_pem)
    dec = subprocess.run(
        [openssl, "cms", "-decrypt", "-in", msg, "-recip", cert, "-inkey", key],
        capture_output=True,
        check=True,
    ).stdout
    ver = subprocess.run(
        [openssl, "cms", "-verify", "-CAfile", ca, "-purpose", "smimesign"],
        input=dec,
        capture_output=True,
    )
    assert ver.returncode == 0, ver.stderr
    assert b"Verification successful" in ver.stderr
    assert "Grüße".encode() in ver.stdout.replace(b"=C3=BC", "ü".encode()).replace(
        b"=C3=9F", "ß".encode()
    )


def test_we_read_openssl_sealed_message(pki, openssl, tmp_path, validator):
    alice = pki["alice"]
    files = {
        "key": _write(tmp_path, "alice.key", alice.key_pem),
        "cert": _write(tmp_path, "alice.pem", alice.cert_pem),
        "bob": _write(tmp_path, "bob.pem", pki["bob"].cert_pem),
    }
    body = b"Content-Type: text/plain\r\n\r\nsigned and sealed by OpenSSL\r\n"
    signed = subprocess.run(
        [
            openssl,
            "cms",
            "-sign",
            "-signer",
            files["cert"],
            "-inkey",
            files["key"],
            "-md",
            "sha256",
        ],
        input=body,
        capture_output=True,
        check=True,
    ).stdout
    enc = subprocess.run(
        [
            openssl,
            "cms",
            "-encrypt",
            "-aes-256-gcm",
            "-from",
            "alice@acme.test",
            "-to",
            "bob@partner.test",
            "-subject",
            "from openssl",
            files["bob"],
        ],
        input=signed,
        capture_output=True,
        check=True,
    ).stdout
    opened = open_message(enc, keys=[pki["bob"].pair], validator=validator, options=OPTS)
    assert opened.status.layers == ("auth-enveloped", "signed")
    assert opened.status.smime_result is SMIMEResult.PASS, opened.status.as_dict()
    assert b"signed and sealed by OpenSSL" in opened.data


# -- public vectors ---------------------------------------------------------------------


def _thunderbird(vectors: Path):
    from cryptography.hazmat.primitives.serialization import pkcs12

    from smimeproxy.smime.keys import KeyPair, SoftwareKey, load_certificates

    base = vectors / "thunderbird-smime/mailnews/test/data/smime"
    key, cert, _ = pkcs12.load_key_and_certificates((base / "Bob.p12").read_bytes(), b"nss")
    ca = load_certificates((base / "TestCA.pem").read_bytes())
    return base, KeyPair(cert, SoftwareKey(key)), PathValidator(ca)


@pytest.mark.parametrize(
    "name",
    [
        "alice.sig.SHA256.opaque.env.eml",
        "alice.dsig.SHA256.multipart.env.eml",
        "alice.dsig.SHA512.multipart.eml",
        "alice.sig.SHA384.opaque.eml",
        "alice.html.sig.SHA256.opaque.env.eml",
    ],
)
def test_thunderbird_vectors_pass(vectors, name):
    base, bob, validator = _thunderbird(vectors)
    opened = open_message((base / name).read_bytes(), keys=[bob], validator=validator, options=OPTS)
    assert opened.status.smime_result is SMIMEResult.PASS, opened.status.as_dict()
    assert opened.status.identifier == "alice@example.com"


@pytest.mark.parametrize(
    "name",
    ["alice.dsig.SHA256.multipart.bad.eml", "alice.dsig.SHA256.multipart.mismatch-econtent.eml"],
)
def test_thunderbird_vectors_bad(vectors, name):
    base, bob, validator = _thunderbird(vectors)
    opened = open_message((base / name).read_bytes(), keys=[bob], validator=validator, options=OPTS)
    assert opened.status.smime_result is SMIMEResult.FAIL


def test_thunderbird_alice_env_without_signature(vectors):
    base, bob, validator = _thunderbird(vectors)
    opened = open_message(
        (base / "alice.env.eml").read_bytes(), keys=[bob], validator=validator, options=OPTS
    )
    assert opened.status.decryption.decrypted
    assert opened.status.smime_result is SMIMEResult.NONE
    assert not opened.status.integrity_protected


def test_covert_content_attacks_not_decrypted(vectors):
    from smimeproxy.smime.keys import KeyPair, load_certificates, load_private_key

    base = vectors / "covert-content-attacks"
    secret = base / "assets/secret-keys"
    (cert,) = load_certificates((secret / "manager@bigcorporation.crt").read_bytes())
    key = load_private_key((secret / "manager@bigcorporation.pem").read_bytes())
    pair = KeyPair(cert, key)
    original = open_message((base / "01-enc/smime/00-original-mail.eml").read_bytes(), keys=[pair])
    assert original.status.decryption.decrypted
    secret_text = b"THIS IS A PGP/MIME ENCRYPTED MESSAGE"
    assert secret_text in original.data
    for attack in sorted((base / "01-enc/smime").glob("0[12]-*.eml")):
        opened = open_message(attack.read_bytes(), keys=[pair])
        assert secret_text not in opened.data, attack.name
        assert not (opened.status.decryption and opened.status.decryption.decrypted), attack.name


def test_johnny_from_signer_mismatch_not_pass(vectors):
    base = vectors / "johnny-you-are-fired"
    msg = base / "04-id/i1-sender-signer-checks/i1-from-unequals-signer-smime.eml"
    assert msg.exists(), f"vector missing from {base}"
    from smimeproxy.smime.keys import load_certificates

    ca = load_certificates((base / "assets/certificates/intermediate_ca.crt").read_bytes())
    # the certificates expired in 2022: validate at the time the mail was made
    when = datetime.datetime(2019, 4, 30, tzinfo=datetime.UTC)
    opened = open_message(msg.read_bytes(), validator=PathValidator(ca, clock=lambda: when))
    assert opened.status.smime_result is SMIMEResult.POLICY
    (signer,) = opened.status.signers
    assert signer.cryptographically_valid
    assert signer.certificate_status.check("address").outcome == "fail"


def test_base64_decoding_helper_is_strict_enough():
    assert base64.b64decode(mime.base64_body(b"x" * 100).replace(b"\r\n", b"")) == b"x" * 100


def test_stored_messages_replace_our_headers_quietly(pki, validator):
    """The gateway's own status headers on a kept-encrypted message are replaced by the
    IMAP proxy without a forgery warning; from outside, their removal is reported."""
    from dataclasses import replace

    sealed = seal(PLAIN, signer=pki["alice"].pair, recipients=[pki["bob"].certificate])
    stored = b"Authentication-Results: acme.test; smime=pass\r\n" + sealed
    transit = open_message(stored, keys=[pki["bob"].pair], validator=validator, options=OPTS)
    assert any("look-alike" in w for w in transit.status.warnings)
    quiet = open_message(
        stored,
        keys=[pki["bob"].pair],
        validator=validator,
        options=replace(OPTS, origin="stored"),
    )
    assert not any("look-alike" in w for w in quiet.status.warnings)
    assert quiet.data.count(b"Authentication-Results: acme.test;") == 1
    assert quiet.status.smime_result is SMIMEResult.PASS
