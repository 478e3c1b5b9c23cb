"""The internal CA: what it issues must satisfy OpenSSL as an S/MIME PKI would."""

from __future__ import annotations

import datetime
import re
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from smimeproxy.errors import CertificateError, ConfigError
from smimeproxy.pki import ca
from smimeproxy.smime.keys import SoftwareKey, load_private_key

pytestmark = pytest.mark.interop

CRL_URL = "http://pki.acme.test/crl/issuing.crl"


def pem(obj: object) -> bytes:
    return obj.public_bytes(serialization.Encoding.PEM)  # type: ignore[attr-defined]


def key_pem(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=60)


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.fixture(scope="module")
def root():
    return ca.create_root("smimeproxy Test Root", key_kind="p256")


@pytest.fixture(scope="module")
def issuing(root):
    return ca.create_issuing_ca(root[0], root[1], "smimeproxy Issuing CA", crl_url=CRL_URL)


@pytest.fixture(scope="module")
def user_keys():
    return {"rsa2048": ca.generate_user_key("rsa2048"), "p256": ca.generate_user_key("p256")}


def verify(openssl: str, tmp_path: Path, cert, root_cert, *extra: str, purpose: str):
    return run(
        openssl,
        "verify",
        "-purpose",
        purpose,
        "-CAfile",
        write(tmp_path / "ca.pem", pem(root_cert)),
        *extra,
        write(tmp_path / "user.pem", pem(cert)),
        check=False,
    )


@pytest.mark.parametrize("kind", ["rsa2048", "p256"])
def test_user_certificate_verifies_for_smime_signing(openssl, tmp_path, root, user_keys, kind):
    cert = ca.issue_user_certificate(
        root[0], root[1], user_keys[kind].public_key(), ["alice@acme.test"]
    )
    result = verify(openssl, tmp_path, cert, root[1], purpose="smimesign")
    assert result.returncode == 0, result.stdout + result.stderr
    assert ": OK" in result.stdout


def test_rsa_user_certificate_verifies_for_smime_encryption(openssl, tmp_path, root, user_keys):
    cert = ca.issue_user_certificate(
        root[0], root[1], user_keys["rsa2048"].public_key(), ["alice@acme.test"]
    )
    result = verify(openssl, tmp_path, cert, root[1], purpose="smimeencrypt")
    assert result.returncode == 0, result.stdout + result.stderr


def test_p256_user_certificate_encrypts_and_decrypts_with_openssl_cms(
    openssl, tmp_path, root, user_keys
):
    # An EC certificate carries keyAgreement, not keyEncipherment (RFC 5480 section 3),
    # which OpenSSL 3.0's "-purpose smimeencrypt" does not accept; what matters to a
    # partner is that encryption to it works, so that is what this checks.
    key = user_keys["p256"]
    cert = ca.issue_user_certificate(root[0], root[1], key.public_key(), ["alice@acme.test"])
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_agreement and ku.digital_signature and not ku.key_encipherment
    cert_path = write(tmp_path / "user.pem", pem(cert))
    key_path = write(tmp_path / "user.key", key_pem(key))
    msg = write(tmp_path / "msg.txt", b"Subject: hi\r\n\r\nsecret text\r\n")
    run(openssl, "cms", "-encrypt", "-aes256", "-in", msg, "-out", str(tmp_path / "enc"), cert_path)
    out = run(
        openssl, "cms", "-decrypt", "-in", str(tmp_path / "enc"), "-recip", cert_path,
        "-inkey", key_path,
    )  # fmt: skip
    assert "secret text" in out.stdout
    run(
        openssl, "cms", "-sign", "-in", msg, "-signer", cert_path, "-inkey", key_path,
        "-out", str(tmp_path / "signed"),
    )  # fmt: skip
    checked = run(
        openssl, "cms", "-verify", "-in", str(tmp_path / "signed"), "-purpose", "smimesign",
        "-CAfile", write(tmp_path / "ca.pem", pem(root[1])), check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr


def test_chain_through_issuing_ca(openssl, tmp_path, root, issuing, user_keys):
    cert = ca.issue_user_certificate(
        issuing[0], issuing[1], user_keys["rsa2048"].public_key(), ["bob@acme.test"]
    )
    untrusted = write(tmp_path / "issuing.pem", pem(issuing[1]))
    for purpose in ("smimesign", "smimeencrypt"):
        result = verify(openssl, tmp_path, cert, root[1], "-untrusted", untrusted, purpose=purpose)
        assert result.returncode == 0, result.stdout + result.stderr
    # Without the issuing CA there is no path.
    alone = verify(openssl, tmp_path, cert, root[1], purpose="smimesign")
    assert alone.returncode != 0


def test_user_certificate_extensions_as_openssl_prints_them(openssl, tmp_path, issuing, user_keys):
    cert = ca.issue_user_certificate(
        issuing[0],
        issuing[1],
        user_keys["rsa2048"].public_key(),
        ["Alice.Liddell@ACME.test", "alice@acme.test"],
        common_name="Alice Liddell",
    )
    text = run(openssl, "x509", "-noout", "-text", "-in", write(tmp_path / "c.pem", pem(cert)))
    out = text.stdout
    assert "email:Alice.Liddell@acme.test, email:alice@acme.test" in out
    assert "E-mail Protection" in out
    assert "X509v3 Basic Constraints: critical\n                CA:FALSE" in out
    assert "X509v3 Key Usage: critical\n                Digital Signature, Key Encipherment" in out
    assert "X509v3 Subject Key Identifier" in out
    assert "X509v3 Authority Key Identifier" in out
    assert f"URI:{CRL_URL}" not in out  # the issuing CA's own DP is not copied to users
    assert "Subject: CN = Alice Liddell" in out
    with_dp = ca.issue_user_certificate(
        issuing[0], issuing[1], user_keys["p256"].public_key(), ["a@acme.test"], crl_url=CRL_URL
    )
    text = run(openssl, "x509", "-noout", "-text", "-in", write(tmp_path / "d.pem", pem(with_dp)))
    assert f"URI:{CRL_URL}" in text.stdout


@pytest.mark.parametrize(
    ("purpose", "passes", "fails"),
    [("sign", "smimesign", "smimeencrypt"), ("encrypt", "smimeencrypt", "smimesign")],
)
def test_single_purpose_certificates(openssl, tmp_path, root, user_keys, purpose, passes, fails):
    cert = ca.issue_user_certificate(
        root[0], root[1], user_keys["rsa2048"].public_key(), ["c@acme.test"], purpose=purpose
    )
    assert verify(openssl, tmp_path, cert, root[1], purpose=passes).returncode == 0
    refused = verify(openssl, tmp_path, cert, root[1], purpose=fails)
    assert refused.returncode != 0
    assert "unsuitable certificate purpose" in refused.stdout + refused.stderr


def test_profile_sets_validity_and_crl_url(root, user_keys):
    profile = ca.CAProfile(
        user_valid_days=30, crl_url_template="http://pki.acme.test/{ca_key_id}.crl"
    )
    start = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    cert = ca.issue_user_certificate(
        root[0], root[1], user_keys["p256"].public_key(), ["d@acme.test"],
        profile=profile, not_before=start,
    )  # fmt: skip
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(days=30)
    ski = root[1].extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    dp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert dp[0].full_name[0].value == f"http://pki.acme.test/{ski.hex()}.crl"


def test_validity_is_cut_at_the_ca_end(root, issuing, user_keys):
    cert = ca.issue_user_certificate(
        issuing[0], issuing[1], user_keys["p256"].public_key(), ["e@acme.test"], valid_days=99999
    )
    assert cert.not_valid_after_utc == issuing[1].not_valid_after_utc


def test_bad_profiles_are_config_errors():
    with pytest.raises(ConfigError):
        ca.CAProfile(user_valid_days=0)
    with pytest.raises(ConfigError):
        ca.CAProfile(allowed_key_kinds=("dsa1024",))
    with pytest.raises(ConfigError):
        ca.CAProfile(crl_url_template="http://x/{nope}.crl")
    with pytest.raises(ConfigError):
        ca.CAProfile(hash_name="md5")


@pytest.mark.parametrize(
    "address",
    [
        "alice",
        "a@b@acme.test",
        "alice@",
        "@acme.test",
        "alice@localhost",
        "al ice@acme.test",
        '"al ice"@acme.test',
        "Alice <alice@acme.test>",
        "alice@[192.0.2.1]",
        "alice@-acme.test",
        "alice@acme..test",
        "alice.@acme.test",
        # a non-ASCII local part is an SmtpUTF8Mailbox (tests/pki/test_smtputf8_ca.py),
        # but not one in NFD (RFC 6532 section 3.1) or with a format character
        "a\u0308@acme.test",
        "al\u200bice@acme.test",
        "alice@acme.test\nBcc: x@evil.test",
        "x" * 65 + "@acme.test",
    ],
)
def test_bad_addresses_are_rejected(root, user_keys, address):
    with pytest.raises(ConfigError):
        ca.issue_user_certificate(root[0], root[1], user_keys["p256"].public_key(), [address])


def test_addresses_normalised_domain_only():
    assert ca.normalize_address("Hugh.Smith@EXAMPLE.com") == "Hugh.Smith@example.com"
    assert ca.normalize_address("hugh@bücher.example") == "hugh@xn--bcher-kva.example"


def test_wrong_ca_arguments(root, issuing, user_keys):
    user = ca.issue_user_certificate(root[0], root[1], user_keys["p256"].public_key(), ["f@a.test"])
    with pytest.raises(CertificateError, match="not a CA"):
        ca.issue_user_certificate(
            user_keys["p256"], user, user_keys["p256"].public_key(), ["g@a.test"]
        )
    with pytest.raises(CertificateError, match="does not belong"):
        ca.issue_user_certificate(issuing[0], root[1], user_keys["p256"].public_key(), ["g@a.test"])
    with pytest.raises(ConfigError):
        ca.issue_user_certificate(
            root[0], root[1], user_keys["p256"].public_key(), ["g@a.test"], purpose="everything"
        )
    with pytest.raises(ConfigError, match="HSM"):
        ca.issue_user_certificate(
            SoftwareKey(root[0]), root[1], user_keys["p256"].public_key(), ["g@a.test"]
        )
    with pytest.raises(ConfigError):
        ca.generate_user_key("rsa1024")


def test_small_rsa_key_refused(root):
    from cryptography.hazmat.primitives.asymmetric import rsa

    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(CertificateError, match="rsa1024"):
        ca.issue_user_certificate(root[0], root[1], weak.public_key(), ["h@acme.test"])


def test_check_issued_pair(root, user_keys):
    cert = ca.issue_user_certificate(root[0], root[1], user_keys["p256"].public_key(), ["i@a.test"])
    ca.check_issued_pair(user_keys["p256"], cert)
    ca.check_issued_pair(SoftwareKey(user_keys["p256"]), cert)
    with pytest.raises(CertificateError):
        ca.check_issued_pair(user_keys["rsa2048"], cert)
    with pytest.raises(CertificateError):
        ca.check_issued_pair(root[0], cert)


def test_crl_revokes_one_certificate_and_not_the_other(openssl, tmp_path, issuing, root, user_keys):
    revoked = ca.issue_user_certificate(
        issuing[0], issuing[1], user_keys["rsa2048"].public_key(), ["mallory@acme.test"]
    )
    kept = ca.issue_user_certificate(
        issuing[0], issuing[1], user_keys["p256"].public_key(), ["carol@acme.test"]
    )
    entry = ca.RevokedEntry.for_certificate(revoked, "key-compromise")
    old = ca.RevokedEntry(12345, datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC), None)
    crl = ca.make_crl(issuing[0], issuing[1], [entry, old], crl_number=7)
    # A CRL of the root (empty) so that -crl_check_all can check the issuing CA too.
    root_crl = ca.make_crl(root[0], root[1], [], crl_number=1)
    crl_path = write(tmp_path / "crl.pem", pem(crl) + pem(root_crl))
    untrusted = write(tmp_path / "issuing.pem", pem(issuing[1]))
    args = ("-untrusted", untrusted, "-crl_check_all", "-CRLfile", crl_path)
    bad = verify(openssl, tmp_path, revoked, root[1], *args, purpose="smimesign")
    assert bad.returncode != 0
    assert "certificate revoked" in bad.stdout + bad.stderr
    good = verify(openssl, tmp_path, kept, root[1], *args, purpose="smimesign")
    assert good.returncode == 0, good.stdout + good.stderr

    text = run(openssl, "crl", "-noout", "-text", "-in", write(tmp_path / "c.pem", pem(crl)))
    assert "X509v3 CRL Number: \n                7" in text.stdout
    assert "Key Compromise" in text.stdout
    serials = re.findall(r"Serial Number: 0*([0-9A-F]+)", text.stdout)
    assert serials == [f"{12345:X}", f"{revoked.serial_number:X}"]
    assert "X509v3 Authority Key Identifier" in text.stdout
    assert crl.is_signature_valid(issuing[1].public_key())  # type: ignore[arg-type]


def test_crl_times_and_arguments(root):
    start = datetime.datetime(2031, 5, 1, tzinfo=datetime.UTC)
    crl = ca.make_crl(root[0], root[1], [], crl_number=0, this_update=start)
    assert crl.last_update_utc == start
    assert crl.next_update_utc == start + ca.DEFAULT_PROFILE.crl_next_update
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number == 0
    when = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    with pytest.raises(ConfigError):
        ca.make_crl(
            root[0], root[1], [ca.RevokedEntry(5, when), ca.RevokedEntry(5, when)], crl_number=1
        )
    with pytest.raises(ConfigError):
        ca.make_crl(root[0], root[1], [], crl_number=-1)
    with pytest.raises(ConfigError):
        ca.make_crl(root[0], root[1], [], crl_number=1, this_update=start, next_update=start)
    with pytest.raises(ConfigError):
        ca.RevokedEntry(0, when)
    with pytest.raises(ConfigError):
        ca.RevokedEntry(5, datetime.datetime(2030, 1, 1))


@pytest.mark.parametrize(
    ("text", "flag"),
    [
        ("keyCompromise", x509.ReasonFlags.key_compromise),
        ("key-compromise", x509.ReasonFlags.key_compromise),
        ("KEY_COMPROMISE", x509.ReasonFlags.key_compromise),
        ("superseded", x509.ReasonFlags.superseded),
        ("cessation-of-operation", x509.ReasonFlags.cessation_of_operation),
        ("affiliationChanged", x509.ReasonFlags.affiliation_changed),
        ("cACompromise", x509.ReasonFlags.ca_compromise),
        ("privilege_withdrawn", x509.ReasonFlags.privilege_withdrawn),
        ("unspecified", None),
        ("", None),
    ],
)
def test_parse_reason(text, flag):
    assert ca.parse_reason(text) is flag
    if flag is not None:
        assert ca.parse_reason(ca.reason_name(flag)) is flag


def test_parse_reason_unknown():
    with pytest.raises(ConfigError, match="keyCompromise"):
        ca.parse_reason("stolen")
    with pytest.raises(ConfigError):
        ca.parse_reason("removeFromCRL")


def test_csr_made_here_verifies_with_openssl(openssl, tmp_path, user_keys):
    csr = ca.make_csr(user_keys["p256"], ["dave@acme.test", "d.h@acme.test"], "Dave H")
    path = write(tmp_path / "req.pem", pem(csr))
    checked = run(openssl, "req", "-verify", "-noout", "-text", "-in", path, check=False)
    assert checked.returncode == 0, checked.stderr
    assert "verify OK" in checked.stdout + checked.stderr
    assert "email:dave@acme.test, email:d.h@acme.test" in checked.stdout
    path_bytes = Path(path).read_bytes()
    assert ca.certificate_addresses(ca.load_csr(path_bytes)) == ["dave@acme.test", "d.h@acme.test"]
    der = ca.load_csr(path_bytes).public_bytes(serialization.Encoding.DER)
    assert ca.load_csr(der).subject == csr.subject


def test_openssl_csr_becomes_a_certificate(openssl, tmp_path, root):
    key_path, req_path = tmp_path / "k.pem", tmp_path / "r.pem"
    run(
        openssl, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", str(key_path), "-out", str(req_path), "-subj", "/CN=Erin Example",
        "-addext", "subjectAltName=email:erin@acme.test,email:e@acme.test",
    )  # fmt: skip
    csr = ca.load_csr(req_path.read_bytes())
    cert = ca.certificate_from_csr(root[0], root[1], csr)
    assert ca.certificate_addresses(cert) == ["erin@acme.test", "e@acme.test"]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Erin Example"
    ca.check_issued_pair(load_private_key(key_path.read_bytes()), cert)
    result = verify(openssl, tmp_path, cert, root[1], purpose="smimesign")
    assert result.returncode == 0, result.stdout + result.stderr


def test_csr_with_bad_signature_or_no_address_is_refused(openssl, tmp_path, root, user_keys):
    der = bytearray(
        ca.make_csr(user_keys["p256"], ["frank@acme.test"]).public_bytes(serialization.Encoding.DER)
    )
    der[-5] ^= 0x01  # inside the ECDSA signature
    with pytest.raises(CertificateError):
        ca.certificate_from_csr(root[0], root[1], ca.load_csr(bytes(der)))
    run(
        openssl, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", str(tmp_path / "k"), "-out", str(tmp_path / "r"),
        "-subj", "/CN=nobody",
    )  # fmt: skip
    with pytest.raises(CertificateError, match="rfc822Name"):
        ca.certificate_from_csr(root[0], root[1], ca.load_csr((tmp_path / "r").read_bytes()))
    run(
        openssl, "req", "-new", "-key", str(tmp_path / "k"), "-out", str(tmp_path / "r2"),
        "-subj", "/CN=x", "-addext", "subjectAltName=email:not-an-address",
    )  # fmt: skip
    with pytest.raises(CertificateError):
        ca.certificate_from_csr(root[0], root[1], ca.load_csr((tmp_path / "r2").read_bytes()))
    with pytest.raises(CertificateError):
        ca.load_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----")
    with pytest.raises(CertificateError):
        ca.load_csr(b"\x30\x03\x02\x01")


def test_renew_keeps_identity_and_changes_serial(openssl, tmp_path, issuing, root, user_keys):
    old = ca.issue_user_certificate(
        issuing[0], issuing[1], user_keys["rsa2048"].public_key(),
        ["grace@acme.test", "g@acme.test"], common_name="Grace", purpose="sign", crl_url=CRL_URL,
    )  # fmt: skip
    same_key = ca.renew_certificate(issuing[0], issuing[1], old)
    rekeyed = ca.renew_certificate(
        issuing[0], issuing[1], old, user_keys["p256"].public_key(), valid_days=10
    )
    for new in (same_key, rekeyed):
        assert ca.certificate_addresses(new) == ["grace@acme.test", "g@acme.test"]
        assert new.subject == old.subject
        assert new.serial_number != old.serial_number
        dp = new.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        assert dp[0].full_name[0].value == CRL_URL
        ku = new.extensions.get_extension_for_class(x509.KeyUsage).value
        assert ku.digital_signature and not (ku.key_encipherment or ku.key_agreement)
    assert same_key.public_key() == old.public_key()
    ca.check_issued_pair(user_keys["p256"], rekeyed)
    untrusted = write(tmp_path / "issuing.pem", pem(issuing[1]))
    result = verify(
        openssl, tmp_path, rekeyed, root[1], "-untrusted", untrusted, purpose="smimesign"
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_rsa_root_and_key_kinds(openssl, tmp_path):
    key, cert = ca.create_root("RSA Root", key_kind="rsa3072", valid_days=30)
    assert ca.key_kind_of(cert.public_key()) == "rsa3072"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length is None
    user_key = ca.generate_user_key("p256")
    user = ca.issue_user_certificate(key, cert, user_key.public_key(), ["h@acme.test"])
    assert verify(openssl, tmp_path, user, cert, purpose="smimesign").returncode == 0
    with pytest.raises(ConfigError):
        ca.create_root("x", key_kind="rsa1024")
    with pytest.raises(ConfigError):
        ca.create_root("  ")


def test_ed25519_root_and_x25519_encryption_only_user(openssl, tmp_path):
    key, cert = ca.create_root("Edwards Root", key_kind="ed25519")
    profile = ca.CAProfile(allowed_key_kinds=("ed25519", "x25519"))
    signer = ca.generate_key("ed25519")
    user = ca.issue_user_certificate(
        key, cert, signer.public_key(), ["ed@acme.test"], purpose="sign", profile=profile
    )
    assert verify(openssl, tmp_path, user, cert, purpose="smimesign").returncode == 0
    agree = ca.generate_key("x25519").public_key()
    enc = ca.issue_user_certificate(
        key, cert, agree, ["ed@acme.test"], purpose="encrypt", profile=profile
    )
    ku = enc.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_agreement and not ku.digital_signature
    with pytest.raises(ConfigError, match="cannot sign"):
        ca.issue_user_certificate(key, cert, agree, ["ed@acme.test"], profile=profile)
    with pytest.raises(ConfigError, match="cannot encrypt"):
        ca.issue_user_certificate(key, cert, signer.public_key(), ["ed@acme.test"], profile=profile)
    with pytest.raises(CertificateError, match="not accepted"):
        ca.issue_user_certificate(key, cert, signer.public_key(), ["ed@acme.test"], purpose="sign")
