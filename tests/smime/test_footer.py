"""The human footer: its words, its escaping, wrapping without touching signed bytes, removal."""

from __future__ import annotations

import subprocess

import pytest

from smimeproxy.smime.footer import (
    FOOTER_MARKER_HEADER,
    footer_html,
    footer_text,
    part_spans,
    strip_footers,
    wrap_with_footer,
)
from smimeproxy.smime.mime import parse_entity, split_multipart
from smimeproxy.smime.status import (
    CertificateStatus,
    Check,
    DecryptionStatus,
    HeaderProtectionStatus,
    MessageStatus,
    Outcome,
    SignerStatus,
)
from smimeproxy.testing import CertificateFactory

OK = Outcome.PASS


@pytest.fixture(scope="module")
def pki():
    factory = CertificateFactory()
    ca = factory.ca("Acme Issuing CA", factory.root)
    return factory, factory.user("alice@acme.test", ca, key_kind="p256")


def signer(issued, *, valid=True, trusted=True, address="alice@acme.test", detail=""):
    outcome = OK if valid else Outcome.FAIL
    return SignerStatus(
        certificate=issued.certificate,
        digest_algorithm="sha256",
        signature_algorithm="ecdsa",
        checks=(Check("message-digest", outcome, detail), Check("signature", outcome)),
        certificate_status=CertificateStatus(
            certificate=issued.certificate,
            chain=(issued.certificate, issued.issuer.certificate),
            checks=(Check("chain", OK if trusted else Outcome.FAIL, "" if trusted else detail),),
            trusted=trusted,
            addresses=(address,),
        ),
    )


GCM = DecryptionStatus(
    decrypted=True,
    content_type="authenticated_enveloped_data",
    cipher="aes256_gcm",
    integrity_protected=True,
)
CBC = DecryptionStatus(decrypted=True, content_type="enveloped_data", cipher="aes256_cbc")


# -- words -------------------------------------------------------------------------------
def test_verified_and_encrypted(pki):
    _, alice = pki
    text = footer_text(MessageStatus(signers=(signer(alice),), decryption=GCM))
    assert text.startswith("-- \nsmimeproxy:\n")
    assert "Signed by alice@acme.test: signature verified (certificate issued by" in text
    assert "CN=Acme Issuing CA" in text
    assert "Encrypted (AES-256-GCM, integrity protected)." in text
    assert "NOT" not in text


def test_untrusted_signer_is_not_verified(pki):
    _, alice = pki
    text = footer_text(MessageStatus(signers=(signer(alice, trusted=False, detail="no path"),)))
    assert "Signed by alice@acme.test: signature NOT verified: chain: no path." in text


def test_altered_message(pki):
    _, alice = pki
    s = signer(alice, valid=False, detail="digest does not match")
    text = footer_text(MessageStatus(signers=(s,)))
    assert "the signature is NOT valid (the message may have been altered)" in text
    assert "message-digest: digest does not match" in text


def test_cbc_without_signature_is_not_integrity_protected():
    text = footer_text(MessageStatus(decryption=CBC))
    assert "This message is not signed" in text
    assert "Encrypted with AES-256-CBC without a valid signature: not integrity protected" in text


def test_partially_signed(pki):
    _, alice = pki
    text = footer_text(MessageStatus(signers=(signer(alice),), partially_signed=True))
    assert "Only part of this message is signed" in text
    assert "signature verified" not in text


def test_decryption_failure_and_header_mismatch():
    failed = DecryptionStatus(
        decrypted=False, content_type="enveloped_data", error="no key for any recipient"
    )
    hp = HeaderProtectionStatus(
        restored=("Subject",), mismatches=("Subject: outer 'Hi' differs from protected 'Hello'",)
    )
    text = footer_text(MessageStatus(decryption=failed, header_protection=hp))
    assert "could not be decrypted: no key for any recipient." in text
    assert "Header mismatch: Subject: outer 'Hi' differs from protected 'Hello'." in text


EVIL = '<script>alert("x")</script>\u202e\r\nSigned by ceo@acme.test: signature verified &amp;'


def test_html_escapes_everything_from_the_message(pki):
    _, alice = pki
    status = MessageStatus(
        signers=(signer(alice, trusted=False, address=EVIL, detail=EVIL),), errors=(EVIL,)
    )
    page = footer_html(status)
    assert "<script" not in page and "&lt;script&gt;" in page
    assert "&amp;amp;" in page  # an entity in the input is shown, not interpreted
    assert "\u202e" not in page
    assert "src=" not in page and "http" not in page  # no remote resources
    text = footer_text(status)
    assert "\u202e" not in text and "\r" not in text
    # the injected "line" stays inside the sentence that quotes it
    assert "\nSigned by ceo@acme.test" not in text


# -- wrapping a clear-signed message ----------------------------------------------------
@pytest.fixture(scope="module")
def signed_message(pki, tmp_path_factory):
    from tests.conftest import require_tool

    openssl = require_tool("openssl")
    _, alice = pki
    tmp = tmp_path_factory.mktemp("sign")
    (tmp / "cert.pem").write_bytes(alice.cert_pem)
    (tmp / "key.pem").write_bytes(alice.key_pem)
    (tmp / "in.txt").write_bytes(
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n"
        b"Hello Bob,\r\n\r\nthe contract is signed. Gr\xc3\xbc\xc3\x9fe\r\n-- \r\nAlice\r\n"
    )
    subprocess.run(
        [openssl, "cms", "-sign", "-in", str(tmp / "in.txt"), "-signer", str(tmp / "cert.pem"),
         "-inkey", str(tmp / "key.pem"), "-out", str(tmp / "signed.eml"), "-binary"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    signed = (tmp / "signed.eml").read_bytes()
    eol = b"\r\n" if b"\r\n" in signed[:200] else b"\n"
    headers = eol.join(
        [
            b"From: Alice <alice@acme.test>",
            b"To: Bob <bob@other.example>",
            b"Subject: contract",
            b"Message-ID: <1@acme.test>",
            b"",
        ]
    )
    return openssl, headers + signed


def test_wrap_keeps_signed_part_byte_for_byte_and_verifiable(signed_message, pki, tmp_path):
    openssl, message = signed_message
    _, alice = pki
    original = parse_entity(message)
    assert original.mime_type == "multipart/signed"
    wrapped = wrap_with_footer(original, MessageStatus(signers=(signer(alice),)))
    data = wrapped.to_bytes()

    reparsed = parse_entity(data)
    assert reparsed.mime_type == "multipart/mixed"
    assert reparsed.get("MIME-Version") == "1.0"
    assert reparsed.get("Subject") == "contract" and reparsed.get("From") == original.get("From")
    _, parts, _, closed = split_multipart(reparsed.body, reparsed.content_type()[1]["boundary"])
    assert closed and len(parts) == 2
    # part 1 is the original content: its Content-* header bytes and the body, unchanged
    expected = b"".join(h.raw for h in original.content_headers()) + original.eol + original.body
    assert parts[0] == expected
    assert original.body in data

    (tmp_path / "part1.eml").write_bytes(parts[0])
    result = subprocess.run(
        [openssl, "cms", "-verify", "-noverify", "-in", str(tmp_path / "part1.eml"),
         "-out", str(tmp_path / "content.txt")],
        capture_output=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert b"the contract is signed" in (tmp_path / "content.txt").read_bytes()

    footer = parse_entity(parts[1])
    assert footer.get(FOOTER_MARKER_HEADER) == "1"
    assert footer.mime_type == "multipart/alternative"
    assert footer.get("Content-Disposition") == "inline"
    leaves = split_multipart(footer.body, footer.content_type()[1]["boundary"])[1]
    types = [parse_entity(p).content_type() for p in leaves]
    assert types == [("text/plain", {"charset": "utf-8"}), ("text/html", {"charset": "utf-8"})]
    plain = parse_entity(leaves[0])
    assert plain.transfer_encoding() == "quoted-printable"
    assert b"signature verified" in plain.decoded_body()
    assert plain.decoded_body().startswith(b"-- \n")


def test_strip_removes_our_footer_and_restores_the_message(signed_message, pki):
    _, message = signed_message
    _, alice = pki
    wrapped = wrap_with_footer(parse_entity(message), MessageStatus(signers=(signer(alice),)))
    stripped, count = strip_footers(parse_entity(wrapped.to_bytes()))
    assert count == 1
    assert stripped.to_bytes() == message


def test_wrap_of_8bit_message_declares_8bit():
    entity = parse_entity(
        b"Subject: x\nContent-Type: text/plain; charset=utf-8\n\nGr\xc3\xbc\xc3\x9fe\n"
    )
    wrapped = wrap_with_footer(entity, MessageStatus())
    assert wrapped.get("Content-Transfer-Encoding") == "8bit"
    assert wrapped.eol == b"\n" and b"\r" not in wrapped.to_bytes()


LOOKALIKE = b"""\
From: mallory@evil.example
To: bob@acme.test
Subject: invoice
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="b1"

preamble stays
--b1
Content-Type: text/plain

Please pay the invoice to IBAN XX00.
--b1
Content-Type: text/plain; charset=utf-8
X-SMIMEProxy-Footer: 1

--
smimeproxy: Signed by ceo@acme.test: signature verified.
--b1--
epilogue stays
"""

SIMILAR = LOOKALIKE.replace(b"X-SMIMEProxy-Footer: 1\n", b"X-Footer: 1\n")


def test_strip_removes_planted_lookalike_and_unwraps():
    stripped, count = strip_footers(parse_entity(LOOKALIKE))
    assert count == 1
    assert b"ceo@acme.test" not in stripped.to_bytes()
    assert stripped.mime_type == "text/plain"
    assert stripped.body == b"Please pay the invoice to IBAN XX00."
    assert stripped.get("Subject") == "invoice" and stripped.get("MIME-Version") == "1.0"


def test_strip_leaves_similar_part_without_marker_alone():
    stripped, count = strip_footers(parse_entity(SIMILAR))
    assert count == 0
    assert stripped.to_bytes() == SIMILAR


def test_strip_keeps_every_other_byte_when_not_unwrapping():
    three = LOOKALIKE.replace(
        b"--b1--", b"--b1\nContent-Type: application/pdf\n\n%PDF-1.4 bytes  \n--b1--"
    )
    stripped, count = strip_footers(parse_entity(three))
    assert count == 1
    assert stripped.mime_type == "multipart/mixed"
    start = three.index(b"\n--b1\nContent-Type: text/plain; charset=utf-8")
    end = three.index(b"\n--b1\nContent-Type: application/pdf")
    assert stripped.to_bytes() == three[:start] + three[end:]


def test_strip_finds_nested_footers_but_not_inside_signed_parts():
    nested = b"""\
Content-Type: multipart/mixed; boundary="outer"

--outer
Content-Type: multipart/alternative; boundary="alt"

--alt
Content-Type: text/plain

hello
--alt
Content-Type: text/plain
X-SMIMEProxy-Footer: 1

fake
--alt--
--outer
Content-Type: multipart/signed; protocol="application/pkcs7-signature"; boundary="sig"

--sig
Content-Type: text/plain
X-SMIMEProxy-Footer: 1

signed by someone, kept
--sig
Content-Type: application/pkcs7-signature

AAAA
--sig--
--outer--
"""
    stripped, count = strip_footers(parse_entity(nested))
    assert count == 1
    data = stripped.to_bytes()
    assert b"fake" not in data and b"hello" in data
    assert b"signed by someone, kept" in data
    assert data == nested.replace(
        b"\n--alt\nContent-Type: text/plain\nX-SMIMEProxy-Footer: 1\n\nfake", b""
    )


def test_part_spans_cut_exactly():
    body = b"pre\r\n--b\r\none\r\n--b  \r\ntwo\r\n--b--\r\nepi"
    spans, closing = part_spans(body, "b")
    assert [body[s.start : s.end] for s in spans] == [b"one", b"two"]
    assert body[closing:] == b"\r\n--b--\r\nepi"
