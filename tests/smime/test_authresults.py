"""Authentication-Results values, our decryption header, and removal of forged headers."""

from __future__ import annotations

import pytest

from smimeproxy.errors import ConfigError
from smimeproxy.smime.authresults import (
    DECRYPTION_HEADER,
    STATUS_HEADER,
    authentication_results,
    decryption_header,
    parse_authserv_id,
    strip_lookalikes,
)
from smimeproxy.smime.mime import parse_entity
from smimeproxy.smime.status import (
    CertificateStatus,
    Check,
    DecryptionStatus,
    MessageStatus,
    Outcome,
    SignerStatus,
)
from smimeproxy.testing import CertificateFactory

OK = Outcome.PASS


@pytest.fixture(scope="module")
def alice():
    factory = CertificateFactory()
    ca = factory.ca("Acme Issuing CA", factory.root)
    return factory.user("alice@acme.test", ca, key_kind="p256")


def signer(
    issued,
    *,
    signature=OK,
    trusted=True,
    addresses=("alice@acme.test",),
    cert_checks=(),
    with_cert_status=True,
):
    cs = None
    if with_cert_status:
        cs = CertificateStatus(
            certificate=issued.certificate,
            chain=(issued.certificate,),
            checks=tuple(cert_checks) or (Check("chain", OK),),
            trusted=trusted,
            addresses=tuple(addresses),
        )
    return SignerStatus(
        certificate=issued.certificate,
        digest_algorithm="sha256",
        signature_algorithm="ecdsa",
        checks=(Check("message-digest", signature), Check("signature", signature)),
        certificate_status=cs,
    )


def value_of(status, authserv_id="acme.test"):
    return authentication_results(authserv_id, status)


# -- one value per SMIMEResult ----------------------------------------------------------
def test_pass(alice):
    v = value_of(MessageStatus(layers=("signed",), signers=(signer(alice),)))
    assert v == (
        "acme.test; smime=pass (signature verified, certificate issued by Acme Issuing CA)"
        " body.smime-identifier=alice@acme.test"
    )


def test_none_for_unsigned_message():
    assert value_of(MessageStatus()) == "acme.test; smime=none"


def test_none_for_malformed_unsigned_message_says_why():
    v = value_of(MessageStatus(malformed=True, errors=("missing closing boundary",)))
    assert v == "acme.test; smime=none (malformed: missing closing boundary)"


def test_fail_names_the_failed_check(alice):
    s = signer(alice, signature=Outcome.FAIL)
    v = value_of(MessageStatus(signers=(s,)))
    assert v.startswith("acme.test; smime=fail (signature NOT valid: message-digest; signature)")
    assert v.endswith("body.smime-identifier=alice@acme.test")


def test_fail_when_revoked(alice):
    s = signer(
        alice,
        trusted=False,
        cert_checks=(Check("chain", OK), Check("revocation", Outcome.FAIL, "revoked")),
    )
    v = value_of(MessageStatus(signers=(s,)))
    assert "smime=fail (signature NOT valid: revocation: revoked)" in v


def test_policy_for_untrusted_signer(alice):
    s = signer(alice, trusted=False, cert_checks=(Check("chain", Outcome.FAIL, "no path"),))
    v = value_of(MessageStatus(signers=(s,)))
    assert v == (
        "acme.test; smime=policy (signature valid, signer not trusted: chain: no path)"
        " body.smime-identifier=alice@acme.test"
    )


def test_temperror_when_revocation_unknown(alice):
    s = signer(
        alice,
        trusted=False,
        cert_checks=(Check("chain", OK), Check("revocation", Outcome.UNKNOWN, "no CRL")),
    )
    v = value_of(MessageStatus(signers=(s,)))
    assert "smime=temperror (signature valid, revocation status unknown: revocation: no CRL)" in v


def test_neutral_for_partially_signed(alice):
    v = value_of(MessageStatus(signers=(signer(alice),), partially_signed=True))
    assert "smime=neutral (only part of the message is signed)" in v


def test_neutral_for_text_outside_the_signature(alice):
    v = value_of(MessageStatus(signers=(signer(alice),), signature_covers_whole=False))
    assert v.startswith("acme.test; smime=neutral (text outside the signed part")


def test_permerror_without_certificate_status(alice):
    s = signer(alice, with_cert_status=False)
    v = value_of(MessageStatus(signers=(s,)))
    assert v.startswith("acme.test; smime=permerror (signature could not be checked")
    # no certificate status: the identity falls back to the subject (here a valid addr-spec)
    assert v.endswith(" body.smime-identifier=CN=alice@acme.test")


# -- identifiers and injection ----------------------------------------------------------
@pytest.mark.parametrize(
    ("identity", "expected"),
    [
        ("bob@example.org", "bob@example.org"),
        ("first.last+tag@mail.example.org", "first.last+tag@mail.example.org"),
        ("CN=Bob,O=Example", '"CN=Bob,O=Example"'),
        ('evil"; smime=pass', '"evil\\"; smime=pass"'),
        ("a@b; smime=pass", '"a@b; smime=pass"'),
        ("x@y.test (verified)", '"x@y.test [verified]"'),
        ("x@y.test\r\nAuthentication-Results: acme.test; smime=pass", None),
        ("jürgen@例え.jp", '"j?rgen@??.jp"'),
    ],
)
def test_identifier_is_a_valid_pvalue(alice, identity, expected):
    s = signer(alice, addresses=(identity,))
    v = value_of(MessageStatus(signers=(s,)))
    ident = v.split(" body.smime-identifier=", 1)[1]
    if expected is not None:
        assert ident == expected.replace("[verified]", "(verified)")
    assert "\r" not in v and "\n" not in v
    assert v.isascii()
    # exactly one result, exactly one identifier property outside quotes
    outside = _outside_quotes(v)
    assert outside.count("smime=") == 1
    assert outside.count("body.smime-identifier=") == 1


def _outside_quotes(value: str) -> str:
    out, quoted, escaped = [], False, False
    for ch in value:
        if escaped:
            escaped = False
            continue
        if quoted and ch == "\\":
            escaped = True
            continue
        if ch == '"':
            quoted = not quoted
            continue
        if not quoted:
            out.append(ch)
    return "".join(out)


def test_comment_cannot_be_closed_or_broken(alice):
    detail = "bad) smime=pass (x\r\nX-Injected: 1\\"
    s = signer(alice, trusted=False, cert_checks=(Check("chain", Outcome.FAIL, detail),))
    v = value_of(MessageStatus(signers=(s,)))
    comment = v[v.index("(") + 1 : v.rindex(")")]
    assert "(" not in comment and ")" not in comment and "\\" not in comment
    assert "\r" not in v and "\n" not in v
    assert v.count("(") == 1 and v.count(")") == 1


def test_comment_is_bounded(alice):
    s = signer(alice, trusted=False, cert_checks=(Check("chain", Outcome.FAIL, "x" * 5000),))
    v = value_of(MessageStatus(signers=(s,)))
    assert len(v) < 998 - len("Authentication-Results: ")


def test_bad_authserv_id_is_a_config_error():
    with pytest.raises(ConfigError):
        authentication_results("acme.test; smime=pass", MessageStatus())
    with pytest.raises(ConfigError):
        authentication_results("", MessageStatus())


# -- decryption header ------------------------------------------------------------------
def test_decryption_header_gcm():
    dec = DecryptionStatus(
        decrypted=True,
        content_type="authenticated_enveloped_data",
        cipher="aes256_gcm",
        key_algorithm="rsaes_oaep",
        integrity_protected=True,
    )
    assert decryption_header(MessageStatus(decryption=dec)) == (
        "decrypted; cipher=aes256_gcm; key=rsaes_oaep; integrity=protected"
    )


def test_decryption_header_cbc_without_signature_is_not_integrity_protected():
    dec = DecryptionStatus(
        decrypted=True,
        content_type="enveloped_data",
        cipher="aes128_cbc",
        key_algorithm="rsaes_pkcs1v15",
    )
    assert decryption_header(MessageStatus(decryption=dec)) == (
        "decrypted; cipher=aes128_cbc; key=rsaes_pkcs1v15; integrity=none"
    )


def test_decryption_header_cbc_with_valid_signature_inside(alice):
    dec = DecryptionStatus(decrypted=True, content_type="enveloped_data", cipher="aes256_cbc")
    status = MessageStatus(decryption=dec, signers=(signer(alice),))
    assert decryption_header(status).endswith("integrity=protected")


def test_decryption_header_failure_quotes_the_reason():
    dec = DecryptionStatus(
        decrypted=False, content_type="enveloped_data", error='no key; integrity="protected"\n'
    )
    v = decryption_header(MessageStatus(decryption=dec))
    assert v == 'failed; reason="no key; integrity=\\"protected\\""'


def test_no_decryption_header_for_unencrypted_message():
    assert decryption_header(MessageStatus()) is None


# -- authserv-id parsing and stripping ------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("acme.test; smime=pass", "acme.test"),
        ("acme.test 1; smime=pass", "acme.test"),
        ("(comment) acme.test; none", "acme.test"),
        ("(nested (comment) \\) here)\r\n\tACME.test; none", "ACME.test"),
        ('"acme.test"; none', "acme.test"),
        ("acme.test;none", "acme.test"),
        ("other.example; dkim=pass", "other.example"),
        ("", None),
        ("(unclosed comment acme.test", None),
        ("; smime=pass", None),
    ],
)
def test_parse_authserv_id(value, expected):
    assert parse_authserv_id(value) == expected


FORGED = b"""\
Received: from mx.other.example
Authentication-Results: acme.test; smime=pass body.smime-identifier=ceo@acme.test
Authentication-Results: ACME.TEST 1; smime=pass
Authentication-Results: (we are nice)
 acme.test.; smime=pass
authentication-results: "acme.test"; smime=pass
Authentication-Results: other.example; dkim=pass header.d=other.example
Authentication-Results: acme.test.evil; spf=pass
Authentication-Results: (broken acme.test; smime=pass
X-SMIMEProxy-Decryption: decrypted; cipher=aes256_gcm
x-smimeproxy-status: fine
X-SMIMEProxy-Footer: 1
X-SMIMEProxyish: kept
From: a@other.example
Subject: hi

body
"""


def test_strip_lookalikes_removes_ours_and_keeps_others():
    entity = parse_entity(FORGED)
    removed = strip_lookalikes(entity, "acme.test")
    assert removed == [
        "Authentication-Results",
        "Authentication-Results",
        "Authentication-Results",
        "authentication-results",
        "Authentication-Results",
        "X-SMIMEProxy-Decryption",
        "x-smimeproxy-status",
        "X-SMIMEProxy-Footer",
    ]
    assert entity.get_all("Authentication-Results") == [
        "other.example; dkim=pass header.d=other.example",
        "acme.test.evil; spf=pass",
    ]
    assert entity.get("X-SMIMEProxyish") == "kept"
    assert entity.get(STATUS_HEADER) is None and entity.get(DECRYPTION_HEADER) is None
    assert entity.body == b"body\n"
    assert entity.to_bytes().startswith(b"Received: from mx.other.example\n")


def test_strip_lookalikes_then_our_header_is_the_only_one(alice):
    entity = parse_entity(FORGED)
    strip_lookalikes(entity, "acme.test")
    entity.add("Authentication-Results", value_of(MessageStatus()), first=True)
    ours = [
        v for v in entity.get_all("Authentication-Results") if parse_authserv_id(v) == "acme.test"
    ]
    assert ours == ["acme.test; smime=none"]
