"""Header protection (RFC 9788): protect/unprotect round trips, mismatches, public vectors."""

from __future__ import annotations

import subprocess

import pytest

from smimeproxy.smime.headerprotect import (
    HP_OUTER,
    PROTECTED_HEADERS,
    protect,
    unprotect,
)
from smimeproxy.smime.mime import Entity, HeaderField, parse_entity, split_multipart

PLAIN = b"""\
Received: from client.acme.test by mx.acme.test
From: Alice <alice@acme.test>
To: Bob <bob@other.example>
Cc: carol@other.example
Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= and the Jones contract
Keywords: contract, urgent
Date: Wed, 11 Jan 2023 16:08:43 -0500
Message-ID: <20230111T210843Z.1234@acme.test>
X-Mailer: Sample MUA
MIME-Version: 1.0
Content-Type: text/plain; charset="us-ascii"

Please review and approve by Thursday.
"""

ALTERNATIVE = b"""\
From: Alice <alice@acme.test>
To: Bob <bob@other.example>
Subject: Thursday's meeting
Date: Wed, 11 Jan 2023 16:08:43 -0500
Message-ID: <2@acme.test>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="mix"

--mix
Content-Type: multipart/alternative; boundary="alt"

--alt
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

I think we should skip the meeting. Gr=C3=BC=C3=9Fe
--alt
Content-Type: text/html; charset=utf-8
Content-Transfer-Encoding: base64

PGh0bWw+PGhlYWQ+PHRpdGxlPjwvdGl0bGU+PC9oZWFkPjxib2R5Pgo8cD5JIHRoaW5rIHdlIHNo
b3VsZCBza2lwIHRoZSBtZWV0aW5nLjwvcD4KPC9ib2R5PjwvaHRtbD4K
--alt--
--mix
Content-Type: text/plain; charset=us-ascii
Content-Disposition: attachment; filename="notes.txt"

attached notes, never touched
--mix--
"""


def envelope(outer_fields, smime_type="enveloped-data", eol=b"\n"):
    """The message as it would arrive: outer fields around an (opaque) CMS body."""
    entity = Entity([*outer_fields], b"MIIB...\n", eol)
    entity.add("MIME-Version", "1.0")
    entity.add("Content-Type", f'application/pkcs7-mime; smime-type="{smime_type}"')
    entity.add("Content-Transfer-Encoding", "base64")
    return entity


def values(fields, name):
    return [f.value() for f in fields if f.key == name.lower()]


def transmit(inner: Entity) -> Entity:
    """What the recipient gets back after sign/encrypt and open: canonical CRLF bytes."""
    return parse_entity(inner.to_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))


# -- signed only -------------------------------------------------------------------------
def test_signed_only_round_trip_restores_and_reports_nothing():
    message = parse_entity(PLAIN)
    outer, inner = protect(message, encrypting=False)
    assert [f.raw for f in outer] == [f.raw for f in message.other_headers()]
    assert inner.content_type()[1]["hp"] == "clear"
    assert inner.get(HP_OUTER) is None
    assert inner.get("Subject") == message.get("Subject")
    assert inner.get("Received") is None and inner.get("X-Mailer") is None
    assert inner.body == message.body

    merged, payload, status = unprotect(envelope(outer, "signed-data"), transmit(inner))
    assert status.mismatches == ()
    assert set(status.restored) == {
        "From",
        "To",
        "Cc",
        "Subject",
        "Keywords",
        "Date",
        "Message-ID",
    }
    assert [(f.name, f.value()) for f in merged] == [
        (f.name, f.value()) for f in message.other_headers()
    ]
    assert all(f.raw.endswith(b"\n") and not f.raw.endswith(b"\r\n") for f in merged)
    assert [f.key for f in payload.headers] == ["content-type"]
    assert payload.body == message.body.replace(b"\n", b"\r\n")


def test_signed_only_changed_outer_subject_is_reported():
    outer, inner = protect(parse_entity(PLAIN), encrypting=False)
    tampered = [
        HeaderField.make("Subject", "Invoice overdue") if f.key == "subject" else f for f in outer
    ]
    merged, _, status = unprotect(envelope(tampered, "signed-data"), inner)
    assert len(status.mismatches) == 1
    assert status.mismatches[0].startswith(
        "Subject: outer 'Invoice overdue' differs from protected"
    )
    assert values(merged, "Subject") == [parse_entity(PLAIN).get("Subject")]


def test_signed_only_added_cc_is_reported_and_not_shown():
    outer, inner = protect(parse_entity(PLAIN), encrypting=False)
    outer = [*outer, HeaderField.make("Reply-To", "mallory@evil.example")]
    merged, _, status = unprotect(envelope(outer, "signed-data"), inner)
    assert status.mismatches == ("Reply-To: 'mallory@evil.example' is outside only, not protected",)
    assert values(merged, "Reply-To") == []
    assert values(merged, "X-Mailer") == ["Sample MUA"]  # unprotected transit fields stay


# -- encrypted ---------------------------------------------------------------------------
def test_encrypted_round_trip_applies_hcp_baseline_and_restores():
    message = parse_entity(PLAIN)
    outer, inner = protect(message, encrypting=True)
    assert values(outer, "Subject") == ["[...]"]
    assert values(outer, "Keywords") == []
    assert values(outer, "From") == ["Alice <alice@acme.test>"]
    assert values(outer, "Received") == ["from client.acme.test by mx.acme.test"]
    assert inner.content_type()[1]["hp"] == "cipher"
    assert inner.get_all(HP_OUTER) == [
        "From: Alice <alice@acme.test>",
        "To: Bob <bob@other.example>",
        "Cc: carol@other.example",
        "Subject: [...]",
        "Date: Wed, 11 Jan 2023 16:08:43 -0500",
        "Message-ID: <20230111T210843Z.1234@acme.test>",
    ]
    assert inner.body == message.body  # no legacy display unless asked

    merged, payload, status = unprotect(envelope(outer), transmit(inner))
    assert status.mismatches == ()
    assert values(merged, "Subject") == [message.get("Subject")]
    assert values(merged, "Keywords") == ["contract, urgent"]
    assert values(merged, HP_OUTER) == []
    assert payload.get(HP_OUTER) is None and payload.get("Subject") is None


def test_encrypted_changed_outer_subject_is_reported():
    outer, inner = protect(parse_entity(PLAIN), encrypting=True)
    tampered = [HeaderField.make("Subject", "Hi") if f.key == "subject" else f for f in outer]
    merged, _, status = unprotect(envelope(tampered), inner)
    assert status.mismatches == (
        "Subject: outer 'Hi' differs from what the sender put outside '[...]'",
    )
    assert "Jones contract" in values(merged, "Subject")[0]


def test_encrypted_outer_from_changed_keeps_outer_unless_signature_binds_protected():
    outer, inner = protect(parse_entity(PLAIN), encrypting=True)
    forged = [
        HeaderField.make("From", "Mallory <mallory@evil.example>") if f.key == "from" else f
        for f in outer
    ]
    merged, _, status = unprotect(envelope(forged), inner)
    assert values(merged, "From") == ["Mallory <mallory@evil.example>"]
    assert len(status.mismatches) == 1
    assert "no verified signature" in status.mismatches[0]
    assert "From" not in status.restored

    merged, _, status = unprotect(envelope(forged), inner, signer_addresses=["ALICE@acme.test"])
    assert values(merged, "From") == ["Alice <alice@acme.test>"]
    assert "a verified signature binds it" in status.mismatches[0]


def test_legacy_display_in_text_plain_round_trip():
    message = parse_entity(PLAIN)
    _, inner = protect(message, encrypting=True, legacy_display=True)
    params = inner.content_type()[1]
    assert params["hp-legacy-display"] == "1" and params["hp"] == "cipher"
    text = inner.decoded_body().decode("utf-8")
    assert text.startswith("Subject: Grüße and the Jones contract\nKeywords: contract, urgent\n\n")
    assert params["charset"] == "utf-8"  # us-ascii could not hold the subject
    assert inner.transfer_encoding() == "quoted-printable"

    _, payload, _ = unprotect(envelope([]), transmit(inner))
    assert payload.decoded_body() == message.body.replace(b"\n", b"\r\n")
    assert "hp-legacy-display" not in payload.content_type()[1]


def _leaves(entity):
    ctype, params = entity.content_type()
    if not ctype.startswith("multipart/"):
        return [entity]
    parts = split_multipart(entity.body, params["boundary"])[1]
    return [leaf for p in parts for leaf in _leaves(parse_entity(p))]


def test_legacy_display_only_in_main_body_parts_and_removed_again():
    message = parse_entity(ALTERNATIVE)
    _, inner = protect(message, encrypting=True, legacy_display=True)
    plain, page, attachment = _leaves(inner)
    assert plain.decoded_body().startswith(b"Subject: Thursday's meeting\n\nI think")
    assert plain.content_type()[1]["hp-legacy-display"] == "1"
    assert page.decoded_body().startswith(
        b'<html><head><title></title></head><body><div class="header-protection-legacy-display">'
        b"\n<pre>Subject: Thursday's meeting</pre></div>\n\n<p>I think"
    )
    assert page.content_type()[1]["hp-legacy-display"] == "1"
    assert attachment.body == b"attached notes, never touched"
    assert "hp-legacy-display" not in attachment.content_type()[1]

    _, payload, _ = unprotect(envelope([]), transmit(inner))
    originals = _leaves(message)
    for got, want in zip(_leaves(payload), originals, strict=True):
        assert got.decoded_body().replace(b"\r\n", b"\n") == want.decoded_body()
        assert "hp-legacy-display" not in got.content_type()[1]


def test_no_header_protection_returns_things_unchanged():
    message = parse_entity(PLAIN)
    inner = Entity(message.content_headers(), message.body, message.eol)
    merged, payload, status = unprotect(message, inner)
    assert [f.raw for f in merged] == [f.raw for f in message.other_headers()]
    assert payload is inner
    assert status.restored == () and status.mismatches == ()


def test_hp_only_counts_at_the_payload_root():
    # an hp= deeper down (or a Subject in a nested part) is not header protection
    outer = parse_entity(PLAIN)
    inner = parse_entity(
        b'Content-Type: multipart/mixed; boundary="b"\n\n--b\n'
        b'Content-Type: text/plain; hp="clear"\nSubject: forged\n\nx\n--b--\n'
    )
    merged, _, status = unprotect(outer, inner)
    assert values(merged, "Subject") == [outer.get("Subject")]
    assert status.restored == ()


def test_protected_headers_cover_the_user_facing_fields():
    for name in ("From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To", "References"):
        assert name in PROTECTED_HEADERS
    assert "Bcc" not in PROTECTED_HEADERS and "Received" not in PROTECTED_HEADERS


# -- public vectors: RFC 9788 appendix C -------------------------------------------------------
def _openssl(openssl, *args, stdin=None):
    result = subprocess.run([openssl, *args], input=stdin, capture_output=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_rfc9788_signed_only_complex_hp_clear(vectors, openssl):
    eml = vectors / "rfc9788-header-protection" / "smime-one-part-complex-hp.eml"
    inner = _openssl(openssl, "cms", "-verify", "-noverify", "-in", str(eml))
    outer = parse_entity(eml.read_bytes())
    merged, payload, status = unprotect(outer, parse_entity(inner))
    assert status.mismatches == ()
    assert set(status.restored) == {"Subject", "Message-ID", "From", "To", "Date", "User-Agent"}
    assert values(merged, "Subject") == ["smime-one-part-complex-hp"]
    assert values(merged, "User-Agent") == ["Sample MUA Version 1.0"]
    assert payload.mime_type == "multipart/mixed"
    assert payload.get("Subject") is None


def test_rfc9788_without_header_protection(vectors, openssl):
    eml = vectors / "rfc9788-header-protection" / "smime-one-part.eml"
    inner = _openssl(openssl, "cms", "-verify", "-noverify", "-in", str(eml))
    merged, _, status = unprotect(parse_entity(eml.read_bytes()), parse_entity(inner))
    assert status.restored == () and status.mismatches == ()
    assert values(merged, "Subject") == ["smime-one-part"]


@pytest.fixture
def hp_baseline(vectors, openssl):
    eml = vectors / "rfc9788-header-protection" / "smime-signed-enc-hp-baseline.eml"
    keys = vectors / "rfc9216"
    signed = _openssl(
        openssl, "cms", "-decrypt", "-in", str(eml),
        "-recip", str(keys / "bob.encrypt.crt"), "-inkey", str(keys / "bob.encrypt.key"),
    )  # fmt: skip
    inner = _openssl(openssl, "cms", "-verify", "-noverify", stdin=signed)
    return eml.read_bytes(), parse_entity(inner)


def test_rfc9788_signed_encrypted_hcp_baseline(hp_baseline):
    eml, inner = hp_baseline
    assert inner.content_type()[1]["hp"] == "cipher"
    merged, payload, status = unprotect(parse_entity(eml), inner)
    assert status.mismatches == ()
    assert values(merged, "Subject") == ["smime-signed-enc-hp-baseline"]
    assert values(merged, "From") == ["Alice <alice@smime.example>"]
    assert "Subject" in status.restored
    assert b"the `hcp_baseline` Header Confidentiality Policy" in payload.body


def test_rfc9788_hcp_baseline_tampered_outside(hp_baseline):
    eml, inner = hp_baseline
    tampered = eml.replace(b"Subject: [...]", b"Subject: Your account is locked")
    tampered = tampered.replace(
        b"To: Bob <bob@smime.example>", b"To: Bob <bob@smime.example>\nCc: mallory@evil.example"
    )
    merged, _, status = unprotect(parse_entity(tampered), inner)
    assert status.mismatches == (
        "Subject: outer 'Your account is locked' differs from what the sender put outside '[...]'",
        "Cc: outer 'mallory@evil.example' was not put outside by the sender",
    )
    assert values(merged, "Subject") == ["smime-signed-enc-hp-baseline"]
    assert values(merged, "Cc") == []


# -- public vectors: draft-autocrypt-lamps-protected-headers (protected-headers="v1") ----
AUTOCRYPT = "autocrypt-protected-headers"


def test_autocrypt_signed_only(vectors):
    folder = vectors / AUTOCRYPT
    outer = parse_entity((folder / "smime-onepart-signed.eml").read_bytes())
    inner = parse_entity((folder / "smime-onepart-signed.inner").read_bytes())
    merged, payload, status = unprotect(outer, inner)
    assert status.mismatches == ()
    assert set(status.restored) == {"From", "To", "Date", "Subject", "Message-ID"}
    assert values(merged, "Subject") == ["The FooCorp contract"]
    assert payload.body.startswith(b"Bob, we need to cancel this contract.")


def test_autocrypt_multipart_signed(vectors):
    eml = (vectors / AUTOCRYPT / "smime-multipart-signed.eml").read_bytes()
    outer = parse_entity(eml)
    signed_part = split_multipart(outer.body, outer.content_type()[1]["boundary"])[1][0]
    merged, _, status = unprotect(outer, parse_entity(signed_part))
    assert status.mismatches == ()
    assert values(merged, "Message-ID") == ["<smime-multipart-signed@protected-headers.example>"]


def test_autocrypt_signed_encrypted_restores_hidden_subject(vectors):
    folder = vectors / AUTOCRYPT
    outer = parse_entity((folder / "smime-sign+enc.eml").read_bytes())
    assert outer.get("Subject") == "..."
    inner = parse_entity((folder / "smime-sign+enc.inner.inner").read_bytes())
    merged, payload, status = unprotect(outer, inner)
    assert status.mismatches == ()
    assert values(merged, "Subject") == ["BarCorp contract signed, let's go!"]
    assert values(merged, "Received")  # transit fields stay
    assert payload.body.startswith(b"Hi Bob!")


@pytest.mark.parametrize(
    ("eml", "inner"),
    [
        ("smime-sign+enc+legacy-disp.eml", "smime-sign+enc+legacy-disp.inner.inner"),
        ("smime-enc+legacy-disp.eml", "smime-enc+legacy-disp.inner"),
    ],
)
def test_autocrypt_legacy_display_part_is_removed(vectors, eml, inner):
    folder = vectors / AUTOCRYPT
    outer = parse_entity((folder / eml).read_bytes())
    merged, payload, status = unprotect(outer, parse_entity((folder / inner).read_bytes()))
    assert values(merged, "Subject") == ["BarCorp contract signed, let's go!"]
    assert status.mismatches == ()
    leaves = _leaves(payload)
    assert len(leaves) == 1
    assert leaves[0].body.startswith(b"Hi Bob!")
    assert b"Subject: BarCorp" not in payload.body


def test_autocrypt_vector_via_openssl_decryption(vectors, openssl, tmp_path):
    """The .inner files are what a real decryption yields (modulo CRLF)."""
    folder = vectors / AUTOCRYPT
    armored = (folder / "bob.p12").read_text().splitlines()
    import base64

    (tmp_path / "bob.p12").write_bytes(base64.b64decode("".join(armored[1:-1])))
    key = _openssl(
        openssl, "pkcs12", "-in", str(tmp_path / "bob.p12"), "-passin", "pass:bob",
        "-nodes", "-nocerts",
    )  # fmt: skip
    (tmp_path / "bob.key").write_bytes(key)
    inner = _openssl(
        openssl, "cms", "-decrypt", "-in", str(folder / "smime-enc+legacy-disp.eml"),
        "-inkey", str(tmp_path / "bob.key"),
    )  # fmt: skip
    assert inner.replace(b"\r\n", b"\n") == (folder / "smime-enc+legacy-disp.inner").read_bytes()
    outer = parse_entity((folder / "smime-enc+legacy-disp.eml").read_bytes())
    merged, _, status = unprotect(outer, parse_entity(inner))
    assert values(merged, "Subject") == ["BarCorp contract signed, let's go!"]
    assert status.mismatches == ()


# -- hostile input -------------------------------------------------------------------------
def test_damaged_input_raises_only_our_errors():
    """Cut at every byte and flip random bytes: only SMIMEProxyError may escape."""
    import random

    from smimeproxy.errors import SMIMEProxyError
    from smimeproxy.smime.footer import strip_footers

    _, protected = protect(parse_entity(ALTERNATIVE), encrypting=True, legacy_display=True)
    rnd = random.Random(9788)
    for sample in (PLAIN, ALTERNATIVE, protected.to_bytes()):
        cases = [sample[:i] for i in range(0, len(sample), 3)]
        for _ in range(150):
            damaged = bytearray(sample)
            for _ in range(3):
                damaged[rnd.randrange(len(damaged))] = rnd.randrange(256)
            cases.append(bytes(damaged))
        for data in cases:
            for action in (
                lambda e: protect(e, encrypting=True, legacy_display=True),
                lambda e: unprotect(envelope(e.other_headers()), e),
                strip_footers,
            ):
                try:
                    action(parse_entity(data))
                except SMIMEProxyError:
                    pass
