"""Path validation: what a user of the status object would check, cross-checked with OpenSSL."""

from __future__ import annotations

import base64
import datetime
import subprocess
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from smimeproxy.errors import CertificateError
from smimeproxy.pki.validation import (
    PathValidator,
    RevocationPolicy,
    address_matches,
    certificate_addresses,
)
from smimeproxy.smime.status import CertificateStatus, Outcome
from smimeproxy.testing import CertificateFactory, Issued, new_key

DAY = datetime.timedelta(days=1)


@dataclass
class PKI:
    """One throwaway hierarchy shared by the module: root -> intermediate -> users."""

    factory: CertificateFactory
    inter: Issued
    alice: Issued  # RSA, signs and encrypts, SAN alice@example.org, issued by inter
    bob: Issued  # P-256, issued by root directly
    other: CertificateFactory  # a second root with the *same name* and another key
    extra: dict[str, Issued] = field(default_factory=dict)

    @property
    def now(self) -> datetime.datetime:
        return self.factory.now

    def validator(self, **kwargs: object) -> PathValidator:
        kwargs.setdefault("clock", lambda: self.now)
        anchors = kwargs.pop("anchors", [self.factory.root.certificate])
        return PathValidator(anchors, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pki() -> PKI:
    factory = CertificateFactory()
    inter = factory.ca("smimeproxy Test Intermediate", factory.root)
    alice = factory.user("alice@example.org", inter, key_kind="rsa2048")
    bob = factory.user("Bob@Example.org", key_kind="p256", email_in_subject=True)
    return PKI(factory, inter, alice, bob, CertificateFactory())


def custom(
    issuer: Issued,
    *,
    subject: str = "custom",
    ca: bool | None = False,
    path_length: int | None = None,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    key_kind: str = "p256",
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Issued:
    """A certificate with exactly the extensions a case needs (the factory's are fixed)."""
    key = new_key(key_kind)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer.certificate.subject)
        .public_key(key.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - DAY)
        .not_valid_after(not_after or now + 30 * DAY)
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca, path_length), critical=True)
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    cert = builder.sign(issuer.private_key, hashes.SHA256())  # type: ignore[arg-type]
    return Issued(cert, key, issuer)


def outcomes(status: CertificateStatus) -> dict[str, Outcome]:
    return {c.name: c.outcome for c in status.checks}


def detail(status: CertificateStatus, name: str) -> str:
    check = status.check(name)
    assert check is not None
    return check.detail


ALL_CHECKS = [
    "chain",
    "validity",
    "ca",
    "critical-extensions",
    "eku",
    "key-usage",
    "address",
    "revocation",
]


# --- good paths -----------------------------------------------------------------------


def test_good_chain_with_intermediate_from_the_message(pki: PKI) -> None:
    status = pki.validator().validate(
        pki.alice.certificate,
        purpose="sign",
        extra_certificates=[pki.inter.certificate],
        sender="alice@example.org",
    )
    assert [c.name for c in status.checks] == ALL_CHECKS
    assert status.trusted
    assert status.chain == (
        pki.alice.certificate,
        pki.inter.certificate,
        pki.factory.root.certificate,
    )
    assert outcomes(status)["revocation"] is Outcome.UNKNOWN  # soft-fail: visible
    assert status.addresses == ("alice@example.org",)


def test_good_chain_with_configured_intermediate_and_encrypt(pki: PKI) -> None:
    status = pki.validator(intermediates=[pki.inter.certificate]).validate(
        pki.alice.certificate, purpose="encrypt"
    )
    assert status.trusted
    assert len(status.chain) == 3
    assert outcomes(status)["address"] is Outcome.SKIPPED


def test_missing_intermediate_is_no_path(pki: PKI) -> None:
    status = pki.validator().validate(pki.alice.certificate, purpose="sign")
    assert not status.trusted
    assert status.chain == ()
    assert outcomes(status)["chain"] is Outcome.FAIL
    assert "no issuer certificate" in detail(status, "chain")


def test_intermediate_configured_as_anchor_is_a_partial_chain(pki: PKI) -> None:
    status = pki.validator(anchors=[pki.inter.certificate]).validate(
        pki.alice.certificate, purpose="sign"
    )
    assert status.trusted
    assert status.chain == (pki.alice.certificate, pki.inter.certificate)


def test_leaf_configured_as_anchor(pki: PKI) -> None:
    status = pki.validator(anchors=[pki.bob.certificate]).validate(
        pki.bob.certificate, purpose="sign"
    )
    assert status.trusted
    assert outcomes(status)["revocation"] is Outcome.SKIPPED


def test_untrusted_root(pki: PKI) -> None:
    status = pki.validator(anchors=[pki.inter.certificate]).validate(
        pki.bob.certificate, purpose="sign", extra_certificates=[pki.factory.root.certificate]
    )
    assert not status.trusted
    assert status.chain == ()
    assert "self-signed but not a trust anchor" in detail(status, "chain")


def test_same_name_issuers_prefer_the_one_that_verifies(pki: PKI) -> None:
    # Two roots named alike; the wrong one comes first and its signature check fails.
    anchors = [pki.other.root.certificate, pki.factory.root.certificate]
    status = pki.validator(anchors=anchors).validate(pki.bob.certificate, purpose="sign")
    assert status.trusted
    assert status.chain[-1] == pki.factory.root.certificate
    only_wrong = pki.validator(anchors=[pki.other.root.certificate])
    status = only_wrong.validate(pki.bob.certificate, purpose="sign")
    assert not status.trusted
    assert "does not verify" in detail(status, "chain")


# --- time -----------------------------------------------------------------------------


def test_expired_leaf(pki: PKI) -> None:
    old = pki.factory.user(
        "old@example.org",
        key_kind="p256",
        not_before=pki.now - 400 * DAY,
        not_after=pki.now - 10 * DAY,
    )
    status = pki.validator().validate(old.certificate, purpose="sign")
    assert not status.trusted
    assert outcomes(status)["validity"] is Outcome.FAIL
    assert "expired" in detail(status, "validity")
    # the same certificate was fine when it was valid
    then = pki.validator().validate(old.certificate, purpose="sign", at=pki.now - 20 * DAY)
    assert then.trusted


def test_not_yet_valid(pki: PKI) -> None:
    early = pki.factory.user(
        "early@example.org",
        key_kind="p256",
        not_before=pki.now + 10 * DAY,
        not_after=pki.now + 100 * DAY,
    )
    status = pki.validator().validate(early.certificate, purpose="sign")
    assert not status.trusted
    assert "not valid before" in detail(status, "validity")


def test_expired_intermediate(pki: PKI) -> None:
    now = pki.now
    inter = custom(
        pki.factory.root,
        subject="expired intermediate",
        ca=True,
        not_before=now - 400 * DAY,
        not_after=now - DAY,
    )
    leaf = pki.factory.user("carol@example.org", inter, key_kind="p256")
    status = pki.validator().validate(
        leaf.certificate, purpose="sign", extra_certificates=[inter.certificate]
    )
    assert not status.trusted
    assert "CN=expired intermediate expired" in detail(status, "validity")
    assert outcomes(status)["chain"] is Outcome.PASS


# --- extensions -------------------------------------------------------------------------


def test_wrong_eku_server_auth_only(pki: PKI) -> None:
    leaf = pki.factory.user(
        "web@example.org", key_kind="p256", eku=[ExtendedKeyUsageOID.SERVER_AUTH]
    )
    status = pki.validator().validate(leaf.certificate, purpose="sign")
    assert not status.trusted
    assert outcomes(status)["eku"] is Outcome.FAIL
    assert "serverAuth" in detail(status, "eku")


def test_no_eku_is_fine(pki: PKI) -> None:
    leaf = pki.factory.user("plain@example.org", key_kind="p256", eku=None)
    status = pki.validator().validate(leaf.certificate, purpose="encrypt")
    assert status.trusted
    assert outcomes(status)["eku"] is Outcome.PASS


def test_any_eku_is_fine(pki: PKI) -> None:
    leaf = pki.factory.user(
        "any@example.org", key_kind="p256", eku=[ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE]
    )
    assert pki.validator().validate(leaf.certificate, purpose="sign").trusted


def test_key_usage_must_fit_the_purpose(pki: PKI) -> None:
    sign_only = pki.factory.user("s@example.org", key_kind="p256", key_usage="sign")
    enc_only = pki.factory.user("e@example.org", key_kind="p256", key_usage="encrypt")
    validator = pki.validator()
    assert validator.validate(sign_only.certificate, purpose="sign").trusted
    status = validator.validate(sign_only.certificate, purpose="encrypt")
    assert not status.trusted
    assert "keyAgreement" in detail(status, "key-usage")
    assert validator.validate(enc_only.certificate, purpose="encrypt").trusted
    status = validator.validate(enc_only.certificate, purpose="sign")
    assert outcomes(status)["key-usage"] is Outcome.FAIL


def test_x25519_key_cannot_sign_and_ed25519_cannot_encrypt(pki: PKI) -> None:
    x = pki.factory.user("x@example.org", key_kind="x25519")
    ed = pki.factory.user("ed@example.org", key_kind="ed25519", key_usage="sign")
    validator = pki.validator()
    assert validator.validate(x.certificate, purpose="encrypt").trusted
    assert "cannot sign" in detail(validator.validate(x.certificate, purpose="sign"), "key-usage")
    assert validator.validate(ed.certificate, purpose="sign").trusted
    status = validator.validate(ed.certificate, purpose="encrypt")
    assert "Ed25519 key cannot encrypt" in detail(status, "key-usage")


def test_unknown_critical_extension(pki: PKI) -> None:
    odd = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00")
    leaf = custom(pki.factory.root, subject="odd", extensions=[(odd, True)])
    status = pki.validator().validate(leaf.certificate, purpose="sign")
    assert not status.trusted
    assert "1.3.6.1.4.1.55555.1" in detail(status, "critical-extensions")
    harmless = custom(pki.factory.root, subject="fine", extensions=[(odd, False)])
    assert pki.validator().validate(harmless.certificate, purpose="sign").trusted


def test_issuer_not_a_ca(pki: PKI) -> None:
    leaf = pki.factory.user("under-bob@example.org", pki.bob, key_kind="p256")
    status = pki.validator().validate(
        leaf.certificate, purpose="sign", extra_certificates=[pki.bob.certificate]
    )
    assert not status.trusted
    assert outcomes(status)["chain"] is Outcome.PASS
    assert "is not a CA" in detail(status, "ca")
    assert "keyCertSign" in detail(status, "ca")


def test_path_length_exceeded(pki: PKI) -> None:
    top = pki.factory.ca("pathlen zero", pki.factory.root, path_length=0)
    below = pki.factory.ca("below pathlen zero", top)
    leaf = pki.factory.user("deep@example.org", below, key_kind="p256")
    status = pki.validator().validate(
        leaf.certificate, purpose="sign", extra_certificates=[top.certificate, below.certificate]
    )
    assert not status.trusted
    assert "path length constraint of CN=pathlen zero (0) exceeded" in detail(status, "ca")
    # a leaf directly below the pathLen 0 CA is fine
    ok = pki.factory.user("shallow@example.org", top, key_kind="p256")
    assert (
        pki.validator()
        .validate(ok.certificate, purpose="sign", extra_certificates=[top.certificate])
        .trusted
    )


def test_name_constraints(pki: PKI) -> None:
    constraints = x509.NameConstraints(
        permitted_subtrees=[x509.RFC822Name("example.org")], excluded_subtrees=None
    )
    ca = custom(
        pki.factory.root,
        subject="constrained",
        ca=True,
        extensions=[(constraints, True)],
    )
    inside = pki.factory.user("in@example.org", ca, key_kind="p256")
    outside = pki.factory.user("out@example.net", ca, key_kind="p256")
    validator = pki.validator(intermediates=[ca.certificate])
    assert validator.validate(inside.certificate, purpose="sign").trusted
    status = validator.validate(outside.certificate, purpose="sign")
    assert not status.trusted
    assert "out@example.net is outside" in detail(status, "ca")
    # the legacy subject emailAddress is constrained as well (RFC 5280 4.2.1.10)
    sneaky = pki.factory.user("ceo@example.net", ca, key_kind="p256", email_in_subject=True)
    status = validator.validate(sneaky.certificate, purpose="sign", sender="ceo@example.net")
    assert not status.trusted
    assert "ceo@example.net is outside" in detail(status, "ca")


# --- addresses ------------------------------------------------------------------------


def test_sender_match_in_san_and_subject_email_with_case_differences(pki: PKI) -> None:
    validator = pki.validator(intermediates=[pki.inter.certificate])
    status = validator.validate(pki.alice.certificate, purpose="sign", sender="Alice@EXAMPLE.org")
    assert outcomes(status)["address"] is Outcome.PASS
    status = validator.validate(pki.bob.certificate, purpose="sign", sender="<bob@example.ORG>")
    assert status.addresses == ("bob@example.org",)
    assert outcomes(status)["address"] is Outcome.PASS
    assert status.trusted


def test_sender_mismatch_names_both_addresses(pki: PKI) -> None:
    status = pki.validator().validate(
        pki.bob.certificate, purpose="sign", sender="mallory@example.org"
    )
    assert not status.trusted
    text = detail(status, "address")
    assert "mallory@example.org" in text and "bob@example.org" in text


def test_certificate_addresses_order_and_uniqueness(pki: PKI) -> None:
    leaf = custom(
        pki.factory.root,
        extensions=[
            (
                x509.SubjectAlternativeName(
                    [
                        x509.RFC822Name("First@Example.org"),
                        x509.DNSName("example.org"),
                        x509.RFC822Name("second@example.org"),
                        x509.RFC822Name("first@example.org"),
                    ]
                ),
                False,
            )
        ],
    )
    assert certificate_addresses(leaf.certificate) == ("first@example.org", "second@example.org")


@pytest.mark.parametrize(
    ("cert_address", "mail_address", "expected"),
    [
        ("alice@example.org", "ALICE@Example.ORG", True),
        ("alice@example.org", " <alice@example.org> ", True),
        ("alice@xn--bcher-kva.example", "alice@bücher.example", True),
        ("alice@example.org", "alice@example.org.", True),
        ("alice@example.org", "alice@example.com", False),
        ("alice@example.org", "alice+tag@example.org", False),
        ("alice@example.org", "alice", False),
        ("", "", False),
    ],
)
def test_address_matches(cert_address: str, mail_address: str, expected: bool) -> None:
    assert address_matches(cert_address, mail_address) is expected


# --- revocation -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def revoked_pki(pki: PKI) -> PKI:
    pki.extra["revoked"] = pki.factory.user("gone@example.org", key_kind="p256")
    return pki


def test_revoked_by_crl(revoked_pki: PKI) -> None:
    pki = revoked_pki
    gone = pki.extra["revoked"]
    crl = pki.factory.crl(pki.factory.root, [gone])
    for policy in RevocationPolicy:
        if policy is RevocationPolicy.OFF:
            continue
        status = pki.validator(crls=[crl], revocation=policy).validate(
            gone.certificate, purpose="sign"
        )
        assert not status.trusted
        assert outcomes(status)["revocation"] is Outcome.FAIL
        assert "key_compromise" in detail(status, "revocation")
        assert "revoked on" in detail(status, "revocation")
    # a certificate the CRL does not list is good
    status = pki.validator(crls=[crl], revocation=RevocationPolicy.REQUIRE).validate(
        pki.bob.certificate, purpose="sign"
    )
    assert status.trusted
    assert outcomes(status)["revocation"] is Outcome.PASS


def test_revocation_policies_without_crl(pki: PKI) -> None:
    cert = pki.bob.certificate
    results = {
        policy: pki.validator(revocation=policy).validate(cert, purpose="sign")
        for policy in RevocationPolicy
    }
    assert results[RevocationPolicy.REQUIRE].trusted is False
    assert outcomes(results[RevocationPolicy.REQUIRE])["revocation"] is Outcome.UNKNOWN
    assert results[RevocationPolicy.SOFT_FAIL].trusted is True
    assert outcomes(results[RevocationPolicy.SOFT_FAIL])["revocation"] is Outcome.UNKNOWN
    assert results[RevocationPolicy.OFF].trusted is True
    assert outcomes(results[RevocationPolicy.OFF])["revocation"] is Outcome.SKIPPED


def test_crl_from_wrong_issuer_is_ignored(revoked_pki: PKI) -> None:
    pki = revoked_pki
    gone = pki.extra["revoked"]
    # same issuer name, another key: a forgery must neither revoke nor clear
    forged = pki.other.crl(pki.other.root, [gone])
    # a real CRL of another CA (the intermediate) says nothing about root-issued certs
    foreign = pki.factory.crl(pki.inter, [gone])
    status = pki.validator(crls=[forged, foreign], revocation=RevocationPolicy.REQUIRE).validate(
        gone.certificate, purpose="sign"
    )
    assert outcomes(status)["revocation"] is Outcome.UNKNOWN
    assert "no CRL from its issuer" in detail(status, "revocation")
    assert not status.trusted


def test_stale_crl_is_unknown(pki: PKI) -> None:
    crl = pki.factory.crl(pki.factory.root, [])  # nextUpdate in 7 days
    later = pki.now + 10 * DAY
    status = pki.validator(crls=[crl]).validate(pki.bob.certificate, purpose="sign", at=later)
    assert outcomes(status)["revocation"] is Outcome.UNKNOWN
    assert "stale" in detail(status, "revocation")
    assert status.trusted  # soft-fail
    strict = pki.validator(crls=[crl], revocation=RevocationPolicy.REQUIRE)
    assert not strict.validate(pki.bob.certificate, purpose="sign", at=later).trusted
    assert strict.validate(pki.bob.certificate, purpose="sign").trusted  # fresh today


def test_revocation_checks_the_intermediate_too(pki: PKI) -> None:
    root_crl = pki.factory.crl(pki.factory.root, [pki.inter])
    inter_crl = pki.factory.crl(pki.inter, [])
    status = pki.validator(
        intermediates=[pki.inter.certificate], crls=[root_crl, inter_crl]
    ).validate(pki.alice.certificate, purpose="sign")
    assert not status.trusted
    assert "CN=smimeproxy Test Intermediate is revoked" in detail(status, "revocation")


def test_gnupg_crl_of_a_foreign_ca_is_ignored(pki: PKI, vectors: Path) -> None:
    pem = (vectors / "gnupg-cms/tests/cms/crl_testpki_testpca.pem").read_text()
    body = "".join(line for line in pem.splitlines() if line and not line.startswith("-----"))
    crl = x509.load_der_x509_crl(base64.b64decode(body))  # labelled CERTIFICATE upstream
    status = pki.validator(crls=[crl]).validate(pki.bob.certificate, purpose="sign")
    assert outcomes(status)["revocation"] is Outcome.UNKNOWN
    assert status.trusted


# --- everything at once ---------------------------------------------------------------


def test_several_failures_are_all_reported(pki: PKI) -> None:
    odd = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.2"), b"\x05\x00")
    leaf = custom(
        pki.factory.root,
        subject="bad in every way",
        not_before=pki.now - 20 * DAY,
        not_after=pki.now - 10 * DAY,
        extensions=[
            (odd, True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), False),
            (x509.SubjectAlternativeName([x509.RFC822Name("bad@example.org")]), False),
            (
                x509.KeyUsage(False, False, False, False, False, False, True, False, False),
                True,
            ),
        ],
    )
    crl = pki.factory.crl(pki.factory.root, [leaf])
    status = pki.validator(crls=[crl]).validate(
        leaf.certificate, purpose="sign", sender="good@example.org"
    )
    failed = {c.name for c in status.failures}
    assert failed == {
        "validity",
        "critical-extensions",
        "eku",
        "key-usage",
        "address",
        "revocation",
    }
    assert outcomes(status)["chain"] is Outcome.PASS


def test_wrong_calls_raise_certificate_error(pki: PKI) -> None:
    with pytest.raises(CertificateError):
        pki.validator().validate(pki.bob.certificate, purpose="decrypt")
    with pytest.raises(CertificateError):
        pki.validator().validate(b"not a certificate", purpose="sign")  # type: ignore[arg-type]


# --- public vectors -------------------------------------------------------------------


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.mark.parametrize(
    ("anchor", "leaf", "extra", "purpose"),
    [
        ("ca.rsa.crt", "alice.sign.crt", [], "sign"),
        ("ca.rsa.crt", "alice.encrypt.crt", [], "encrypt"),
        ("ca.rsa.crt", "bob.sign.crt", [], "sign"),
        ("ca.rsa.crt", "bob.encrypt.crt", [], "encrypt"),
        ("ca.ed25519.crt", "carlos.sign.crt", [], "sign"),
        ("ca.ed25519.crt", "carlos.encrypt.crt", [], "encrypt"),
        ("ca.ed25519.crt", "dana.sign.crt", [], "sign"),
        ("ca.ed25519.crt", "dana.encrypt.crt", [], "encrypt"),
        ("ca.rsa.crt", "dana.sign.crt", ["ca.ed25519.cross.crt"], "sign"),
        ("ca.rsa.crt", "dana.encrypt.crt", ["ca.ed25519.cross.crt"], "encrypt"),
        ("ca.ed25519.crt", "alice.sign.crt", ["ca.rsa.cross.crt"], "sign"),
    ],
)
def test_rfc9216_vectors(
    vectors: Path, anchor: str, leaf: str, extra: list[str], purpose: str
) -> None:
    base = vectors / "rfc9216"
    validator = PathValidator([_load(base / anchor)], revocation=RevocationPolicy.REQUIRE)
    name = leaf.split(".")[0]
    status = validator.validate(
        _load(base / leaf),
        purpose=purpose,
        extra_certificates=[_load(base / e) for e in extra],
        sender=f"{name.capitalize()}@smime.example",
    )
    assert {c.name: c.outcome for c in status.failures} == {}
    assert outcomes(status)["revocation"] is Outcome.UNKNOWN  # no CRLs published
    assert not status.trusted  # ... which REQUIRE does not accept
    assert len(status.chain) == 2 + len(extra)
    assert status.chain[-1] == _load(base / anchor)


def test_rfc9216_cross_certificate_is_needed(vectors: Path) -> None:
    base = vectors / "rfc9216"
    status = PathValidator([_load(base / "ca.rsa.crt")]).validate(
        _load(base / "dana.sign.crt"), purpose="sign"
    )
    assert not status.trusted
    assert status.chain == ()
    # wrong purpose for an RFC 9216 signing certificate
    status = PathValidator([_load(base / "ca.rsa.crt")]).validate(
        _load(base / "alice.sign.crt"), purpose="encrypt"
    )
    assert [c.name for c in status.failures] == ["key-usage"]


def test_thunderbird_alice_with_subject_email(vectors: Path) -> None:
    base = vectors / "thunderbird-smime/mailnews/test/data/smime"
    with warnings.catch_warnings():  # NSS writes BER; cryptography warns and parses it
        warnings.simplefilter("ignore", UserWarning)
        _, cert, _ = pkcs12.load_key_and_certificates((base / "Alice.p12").read_bytes(), b"nss")
    assert cert is not None
    validator = PathValidator([_load(base / "TestCA.pem")])
    at = datetime.datetime(2028, 1, 1, tzinfo=datetime.UTC)
    status = validator.validate(cert, purpose="sign", sender="alice@example.com", at=at)
    assert status.trusted
    assert status.addresses == ("alice@example.com",)
    late = validator.validate(cert, purpose="sign", at=datetime.datetime(2032, 1, 1))
    assert [c.name for c in late.failures] == ["validity"]


def test_cryptography_verifier_agrees_on_an_rsa_vector(vectors: Path) -> None:
    """Cross-check with cryptography's own verifier (with an emailProtection EKU policy)."""
    base = vectors / "rfc9216"
    anchor, leaf = _load(base / "ca.rsa.crt"), _load(base / "alice.sign.crt")

    def email_eku(_policy: object, _cert: object, eku: x509.ExtendedKeyUsage | None) -> None:
        if eku is not None and ExtendedKeyUsageOID.EMAIL_PROTECTION not in eku:
            raise ValueError("no emailProtection")

    ee = verification.ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.ExtendedKeyUsage, verification.Criticality.AGNOSTIC, email_eku
    )
    ca = verification.ExtensionPolicy.webpki_defaults_ca()
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([anchor]))
        .extension_policies(ca_policy=ca, ee_policy=ee)
        .build_client_verifier()
    )
    theirs = verifier.verify(leaf, [])
    ours = PathValidator([anchor]).validate(leaf, purpose="sign")
    assert ours.trusted
    assert tuple(theirs.chain) == ours.chain


# --- cross-check with openssl verify --------------------------------------------------


@dataclass
class Case:
    leaf: Issued
    purpose: str = "sign"
    untrusted: list[x509.Certificate] = field(default_factory=list)
    crls: list[x509.CertificateRevocationList] | None = None  # None: no -crl_check
    anchor: x509.Certificate | None = None


CASE_BUILDERS: dict[str, Callable[[PKI], Case]] = {
    "good-sign": lambda p: Case(p.alice, untrusted=[p.inter.certificate]),
    "good-encrypt": lambda p: Case(p.alice, "encrypt", untrusted=[p.inter.certificate]),
    "missing-intermediate": lambda p: Case(p.alice),
    "untrusted-root": lambda p: Case(p.bob, anchor=p.other.root.certificate),
    "expired": lambda p: Case(
        p.factory.user("x1@example.org", key_kind="p256", not_after=p.now - DAY)
    ),
    "server-auth-eku": lambda p: Case(
        p.factory.user("x2@example.org", key_kind="p256", eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    ),
    "sign-only-rsa-for-encrypt": lambda p: Case(
        p.factory.user("x3@example.org", key_kind="rsa2048", key_usage="sign"), "encrypt"
    ),
    "encrypt-only-for-sign": lambda p: Case(
        p.factory.user("x4@example.org", key_kind="p256", key_usage="encrypt")
    ),
    "revoked": lambda p: _revoked_case(p),
    "crl-not-listed": lambda p: Case(p.bob, crls=[p.factory.crl(p.factory.root, [])]),
    "crl-missing": lambda p: Case(p.bob, crls=[]),
    "issuer-not-ca": lambda p: Case(
        p.factory.user("x5@example.org", p.bob, key_kind="p256"),
        untrusted=[p.bob.certificate],
    ),
    "path-length": lambda p: _path_length_case(p),
    "critical-extension": lambda p: Case(
        custom(
            p.factory.root,
            extensions=[
                (
                    x509.UnrecognizedExtension(
                        x509.ObjectIdentifier("1.3.6.1.4.1.55555.3"), b"\x05\x00"
                    ),
                    True,
                )
            ],
        )
    ),
}


def _revoked_case(pki: PKI) -> Case:
    leaf = pki.factory.user("x6@example.org", key_kind="p256")
    return Case(leaf, crls=[pki.factory.crl(pki.factory.root, [leaf])])


def _path_length_case(pki: PKI) -> Case:
    top = pki.factory.ca("x pathlen 0", pki.factory.root, path_length=0)
    below = pki.factory.ca("x below", top)
    leaf = pki.factory.user("x7@example.org", below, key_kind="p256")
    return Case(leaf, untrusted=[top.certificate, below.certificate])


def _pem(items: Sequence[x509.Certificate | x509.CertificateRevocationList]) -> bytes:
    return b"".join(i.public_bytes(serialization.Encoding.PEM) for i in items)


@pytest.mark.parametrize("name", sorted(CASE_BUILDERS))
def test_same_verdict_as_openssl_verify(pki: PKI, openssl: str, tmp_path: Path, name: str) -> None:
    case = CASE_BUILDERS[name](pki)
    anchor = case.anchor or pki.factory.root.certificate
    (tmp_path / "ca.pem").write_bytes(_pem([anchor]))
    (tmp_path / "leaf.pem").write_bytes(_pem([case.leaf.certificate]))
    purpose = {"sign": "smimesign", "encrypt": "smimeencrypt"}[case.purpose]
    args = [openssl, "verify", "-purpose", purpose, "-CAfile", "ca.pem"]
    args += ["-attime", str(int(pki.now.timestamp()))]
    if case.untrusted:
        (tmp_path / "untrusted.pem").write_bytes(_pem(case.untrusted))
        args += ["-untrusted", "untrusted.pem"]
    if case.crls is not None:
        args += ["-crl_check"]
        if case.crls:
            (tmp_path / "crl.pem").write_bytes(_pem(case.crls))
            args += ["-CRLfile", "crl.pem"]
    result = subprocess.run(
        [*args, "leaf.pem"], cwd=tmp_path, capture_output=True, timeout=30, check=False
    )
    theirs = result.returncode == 0
    policy = RevocationPolicy.OFF if case.crls is None else RevocationPolicy.REQUIRE
    ours = PathValidator(
        [anchor], crls=case.crls or (), revocation=policy, clock=lambda: pki.now
    ).validate(case.leaf.certificate, purpose=case.purpose, extra_certificates=case.untrusted)
    assert ours.trusted is theirs, (ours.failures, result.stdout, result.stderr)
    expected_good = name in ("good-sign", "good-encrypt", "crl-not-listed")
    assert theirs is expected_good


# --- hypothesis: nothing unexpected escapes -------------------------------------------

_FUZZ: dict[str, object] = {}


def _fuzz_pki() -> tuple[Issued, PathValidator]:
    if not _FUZZ:
        factory = CertificateFactory()
        crl = factory.crl(factory.root, [])
        _FUZZ["root"] = factory.root
        _FUZZ["validator"] = PathValidator([factory.root.certificate], crls=[crl])
    return _FUZZ["root"], _FUZZ["validator"]  # type: ignore[return-value]


_OIDS = st.sampled_from(
    [
        ExtendedKeyUsageOID.EMAIL_PROTECTION,
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
        x509.ObjectIdentifier("1.3.6.1.4.1.55555.9"),
    ]
)
_SAN_OID = x509.ObjectIdentifier("2.5.29.17")
_RAW_EXTENSION_OIDS = st.sampled_from(
    [
        _SAN_OID,
        x509.ObjectIdentifier("2.5.29.15"),
        x509.ObjectIdentifier("2.5.29.37"),
        x509.ObjectIdentifier("2.5.29.19"),
        x509.ObjectIdentifier("2.5.29.30"),
        x509.ObjectIdentifier("1.3.6.1.4.1.55555.4"),
    ]
)


@st.composite
def random_certificates(draw: st.DrawFn) -> x509.Certificate:
    root, _ = _fuzz_pki()
    self_signed = draw(st.booleans())
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, draw(st.text(min_size=1, max_size=20)))]
        + [
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, v)
            for v in draw(st.lists(st.text(max_size=30), max_size=2))
        ]
    )
    start = datetime.datetime.now(datetime.UTC) + draw(st.integers(-3000, 300)) * DAY
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if self_signed else root.certificate.subject)
        .public_key(root.private_key.public_key())  # type: ignore[arg-type]
        .serial_number(draw(st.integers(1, 2**159 - 1)))
        .not_valid_before(start)
        .not_valid_after(start + draw(st.integers(0, 4000)) * DAY)
    )
    if draw(st.booleans()):
        builder = builder.add_extension(
            x509.BasicConstraints(draw(st.booleans()), None), critical=draw(st.booleans())
        )
    if draw(st.booleans()):
        bits = draw(st.lists(st.booleans(), min_size=7, max_size=7))
        builder = builder.add_extension(x509.KeyUsage(*bits, False, False), critical=True)
    if draw(st.booleans()):
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(draw(st.lists(_OIDS, min_size=1, max_size=3, unique=True))),
            critical=draw(st.booleans()),
        )
    if draw(st.booleans()):
        addresses = draw(
            st.lists(st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=30))
        )
        names = []
        for address in addresses:
            try:
                names.append(x509.RFC822Name(address))
            except ValueError:  # cryptography refuses some strings up front; fine
                continue
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    else:
        # raw extension bytes under a well-known OID: decoding it later may fail
        oid = draw(_RAW_EXTENSION_OIDS)
        raw = x509.UnrecognizedExtension(oid, draw(st.binary(max_size=40)))
        try:
            builder = builder.add_extension(raw, critical=draw(st.booleans()))
        except ValueError:  # the builder refuses a second extension of that OID
            pass
    try:
        return builder.sign(root.private_key, hashes.SHA256())  # type: ignore[arg-type]
    except ValueError:  # e.g. a name attribute that cannot be encoded
        reject()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cert=random_certificates(),
    purpose=st.sampled_from(["sign", "encrypt"]),
    sender=st.none() | st.text(max_size=40),
)
def test_random_certificates_never_raise(
    cert: x509.Certificate, purpose: str, sender: str | None
) -> None:
    root, validator = _fuzz_pki()
    try:
        status = validator.validate(
            cert, purpose=purpose, sender=sender, extra_certificates=[cert, root.certificate]
        )
    except CertificateError:
        return
    assert {c.name for c in status.checks} == set(ALL_CHECKS)
    assert status.trusted is (not status.failures)  # soft-fail: UNKNOWN does not block
    addresses = certificate_addresses(cert)
    assert all(a == a.lower() for a in addresses)
    assert len(set(addresses)) == len(addresses)


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
@settings(max_examples=300, deadline=None)
@given(flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(1, 255)), min_size=1, max_size=4))
def test_corrupted_der_never_raises(pki: PKI, flips: list[tuple[int, int]]) -> None:
    original = pki.alice.certificate.public_bytes(serialization.Encoding.DER)
    der = bytearray(original)
    for position, mask in flips:
        der[position % len(der)] ^= mask
    try:
        cert = x509.load_der_x509_certificate(bytes(der))
    except (ValueError, x509.InvalidVersion):  # InvalidVersion is no ValueError
        return
    try:
        status = pki.validator().validate(
            cert,
            purpose="sign",
            sender="alice@example.org",
            extra_certificates=[pki.inter.certificate],
        )
    except CertificateError:
        return
    certificate_addresses(cert)
    signed_part_or_signature_changed = (
        cert.tbs_certificate_bytes != pki.alice.certificate.tbs_certificate_bytes
        or cert.signature != pki.alice.certificate.signature
    )
    # (cryptography tolerates a non-zero "unused bits" count in the signature BIT STRING
    # when those bits are zero: different DER, same signed certificate)
    if signed_part_or_signature_changed:
        assert not status.trusted


@given(a=st.text(max_size=60), b=st.text(max_size=60))
def test_address_matches_is_total_and_symmetric(a: str, b: str) -> None:
    assert address_matches(a, b) is address_matches(b, a)
    assert address_matches(f"{a}@example.org", f"{a.upper()}@EXAMPLE.org") in (True, False)
