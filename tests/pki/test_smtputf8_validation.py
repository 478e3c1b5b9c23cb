"""Path validation and SmtpUTF8Mailbox (RFC 8398): the address comparison of section 5
and an issuer's rfc822Name constraints applied to SmtpUTF8Mailbox (section 6)."""

from __future__ import annotations

import datetime

import pytest
from asn1crypto.core import IA5String, UTF8String
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from smimeproxy.pki.validation import (
    ID_ON_SMTP_UTF8_MAILBOX,
    PathValidator,
    address_matches,
    certificate_addresses,
)
from smimeproxy.smime.status import Outcome

JOSE = "jösé@例子.测试"


@pytest.mark.parametrize(
    ("cert_address", "mail_address", "expected"),
    [
        (JOSE, "jösé@xn--fsqu00a.xn--0zwm56d", True),
        ("jösé@XN--FSQU00A.xn--0zwm56d.", JOSE, True),
        (JOSE, " <jösé@例子.测试> ", True),
        (JOSE, "Jösé@例子.测试", False),  # a non-ASCII local part is compared exactly
        (JOSE, "JÖSÉ@例子.测试", False),
        (JOSE, "jo\u0308se\u0301@例子.测试", False),  # NFD: not normalised
        (JOSE, "jose@例子.测试", False),
        ("carol@xn--fsqu00a.xn--0zwm56d", "Carol@例子.测试", True),  # ASCII: as before
        ("alice@xn--strae-oqa.example", "alice@straße.example", True),  # IDNA 2008
    ],
)
def test_rfc8398_comparison(cert_address: str, mail_address: str, expected: bool) -> None:
    assert address_matches(cert_address, mail_address) is expected
    assert address_matches(mail_address, cert_address) is expected


def _mailbox(address: str) -> x509.OtherName:
    return x509.OtherName(ID_ON_SMTP_UTF8_MAILBOX, UTF8String(address).dump())


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None,
    key: ec.EllipticCurvePrivateKey,
    *,
    san: list[x509.GeneralName] | None = None,
    constraints: x509.NameConstraints | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[1].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=san is None, path_length=None), critical=True)
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        )
    if constraints is not None:
        builder = builder.add_extension(constraints, critical=True)
    return builder.sign(issuer[0] if issuer else key, hashes.SHA256())


@pytest.fixture(scope="module")
def constrained() -> tuple[x509.Certificate, tuple[ec.EllipticCurvePrivateKey, x509.Certificate]]:
    """(root, (key, CA certificate)): the CA may name acme.test and not bad.acme.test."""
    root_key = _key()
    root = _cert("eai root", None, root_key)
    inter_key = _key()
    inter = _cert(
        "eai constrained",
        (root_key, root),
        inter_key,
        constraints=x509.NameConstraints(
            permitted_subtrees=[x509.RFC822Name("acme.test"), x509.RFC822Name(".acme.test")],
            excluded_subtrees=[x509.RFC822Name("bad.acme.test")],
        ),
    )
    return root, (inter_key, inter)


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("jösé@acme.test", None),
        ("jösé@sub.acme.test", None),
        ("jösé@例子.测试", "jösé@例子.测试 is outside the names"),
        ("jösé@bad.acme.test", "jösé@bad.acme.test is excluded by"),
    ],
)
def test_rfc822name_constraints_apply_to_smtputf8mailbox(
    constrained: tuple[x509.Certificate, tuple[ec.EllipticCurvePrivateKey, x509.Certificate]],
    address: str,
    problem: str | None,
) -> None:
    root, issuer = constrained
    leaf = _cert("leaf", issuer, _key(), san=[_mailbox(address)])
    validator = PathValidator([root], [issuer[1]])
    status = validator.validate(leaf, purpose="sign", sender=address)
    (check,) = [c for c in status.checks if c.name == "ca"]
    if problem is None:
        assert status.trusted, status.checks
    else:
        assert not status.trusted and check.outcome is Outcome.FAIL
        assert problem in check.detail


def test_a_mailbox_constraint_never_names_a_utf8_local_part(
    constrained: tuple[x509.Certificate, tuple[ec.EllipticCurvePrivateKey, x509.Certificate]],
) -> None:
    root, _issuer = constrained
    inter_key = _key()
    only_jose = _cert(
        "one mailbox",
        (_key(), root),  # not verifiable: only the name check is looked at
        inter_key,
        constraints=x509.NameConstraints(
            permitted_subtrees=[x509.RFC822Name("jose@acme.test")], excluded_subtrees=None
        ),
    )
    leaf = _cert("leaf", (inter_key, only_jose), _key(), san=[_mailbox("jösé@acme.test")])
    status = PathValidator([only_jose]).validate(leaf, purpose="sign")
    (check,) = [c for c in status.checks if c.name == "ca"]
    assert check.outcome is Outcome.FAIL and "outside the names" in check.detail


def test_an_unreadable_smtputf8mailbox_is_skipped_and_fails_under_constraints(
    constrained: tuple[x509.Certificate, tuple[ec.EllipticCurvePrivateKey, x509.Certificate]],
) -> None:
    root, issuer = constrained
    odd = [
        x509.OtherName(ID_ON_SMTP_UTF8_MAILBOX, IA5String("x@acme.test").dump()),  # wrong type
        x509.OtherName(ID_ON_SMTP_UTF8_MAILBOX, UTF8String("").dump()),  # empty
        x509.OtherName(ID_ON_SMTP_UTF8_MAILBOX, b"\x0c\x02\xff\xfe"),  # not UTF-8
    ]
    for name in odd:
        leaf = _cert("odd", issuer, _key(), san=[name])
        assert certificate_addresses(leaf) == ()
        status = PathValidator([root], [issuer[1]]).validate(leaf, purpose="sign")
        (check,) = [c for c in status.checks if c.name == "ca"]
        assert check.outcome is Outcome.FAIL and "unreadable SmtpUTF8Mailbox" in check.detail
