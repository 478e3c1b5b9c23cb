"""The internal CA and internationalised addresses (RFC 8398 section 3): an
SmtpUTF8Mailbox (U-label domain, no rfc822Name) for a non-ASCII local part, an
rfc822Name with the A-label domain for an ASCII local part, each read back by
``openssl x509 -text`` / ``openssl req -text`` and checked by ``openssl verify``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from smimeproxy.errors import ConfigError
from smimeproxy.pki import ca
from smimeproxy.pki.validation import (
    ID_ON_SMTP_UTF8_MAILBOX,
    PathValidator,
    certificate_addresses,
    smtputf8_mailboxes,
)

JOSE = "jösé@例子.测试"
JOSE_ALABEL = "jösé@xn--fsqu00a.xn--0zwm56d"
CAROL_ALABEL = "carol@xn--fsqu00a.xn--0zwm56d"


@pytest.fixture(scope="module")
def root():
    return ca.create_root("smimeproxy EAI Test Root", key_kind="p256")


@pytest.fixture(scope="module")
def key():
    return ca.generate_user_key("p256")


def _pem(path: Path, obj: x509.Certificate | x509.CertificateSigningRequest) -> Path:
    path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    return path


def _text(openssl: str, kind: str, path: Path) -> str:
    done = subprocess.run(
        [openssl, kind, "-in", str(path), "-noout", "-text"],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return done.stdout.decode("utf-8")


def _san(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[x509.GeneralName]:
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


@pytest.mark.parametrize("address", [JOSE, JOSE_ALABEL, "jösé@例子.测试."])
def test_non_ascii_local_part_gets_an_smtputf8mailbox_only(
    openssl: str, tmp_path: Path, root, key, address: str
) -> None:
    cert = ca.issue_user_certificate(root[0], root[1], key.public_key(), [address])
    (name,) = _san(cert)
    assert isinstance(name, x509.OtherName) and name.type_id == ID_ON_SMTP_UTF8_MAILBOX
    assert smtputf8_mailboxes([name]) == [JOSE]
    assert name.value == b"\x0c" + bytes([len(JOSE.encode())]) + JOSE.encode()  # UTF8String
    assert cert.subject.rfc4514_string() == f"CN={JOSE}"
    text = _text(openssl, "x509", _pem(tmp_path / "jose.pem", cert))
    assert f"othername: SmtpUTF8Mailbox::{JOSE}" in text
    assert "email:" not in text
    assert ca.certificate_addresses(cert) == [JOSE]


def test_ascii_local_part_with_idn_domain_gets_an_a_label_rfc822name(
    openssl: str, tmp_path: Path, root, key
) -> None:
    cert = ca.issue_user_certificate(root[0], root[1], key.public_key(), ["carol@例子.测试"])
    assert _san(cert) == [x509.RFC822Name(CAROL_ALABEL)]
    text = _text(openssl, "x509", _pem(tmp_path / "carol.pem", cert))
    assert f"email:{CAROL_ALABEL}" in text
    assert "othername" not in text


def test_mixed_addresses_keep_their_order(root, key) -> None:
    cert = ca.issue_user_certificate(
        root[0], root[1], key.public_key(), [JOSE, "jose@acme.test", JOSE_ALABEL]
    )
    assert ca.certificate_addresses(cert) == [JOSE, "jose@acme.test"]
    assert certificate_addresses(cert) == ("jose@acme.test", JOSE)


def test_openssl_verifies_it_and_the_validator_matches_the_address(
    openssl: str, tmp_path: Path, root
) -> None:
    # RSA: OpenSSL's smimeencrypt purpose wants keyEncipherment, which EC keys lack
    rsa_key = ca.generate_user_key("rsa2048")
    cert = ca.issue_user_certificate(root[0], root[1], rsa_key.public_key(), [JOSE])
    leaf, anchor = _pem(tmp_path / "leaf.pem", cert), _pem(tmp_path / "root.pem", root[1])
    for purpose in ("smimesign", "smimeencrypt"):
        done = subprocess.run(
            [openssl, "verify", "-CAfile", str(anchor), "-purpose", purpose, str(leaf)],
            capture_output=True,
            check=False,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    validator = PathValidator([root[1]])
    assert validator.validate(cert, purpose="encrypt", sender=JOSE_ALABEL).trusted
    assert not validator.validate(cert, purpose="encrypt", sender="JÖSÉ@例子.测试").trusted


def test_renewal_and_csr_keep_the_smtputf8mailbox(openssl: str, tmp_path: Path, root, key) -> None:
    old = ca.issue_user_certificate(root[0], root[1], key.public_key(), [JOSE])
    new = ca.renew_certificate(root[0], root[1], old)
    assert ca.certificate_addresses(new) == [JOSE]
    csr = ca.make_csr(key, [JOSE_ALABEL])
    assert f"othername: SmtpUTF8Mailbox::{JOSE}" in _text(
        openssl, "req", _pem(tmp_path / "jose.csr", csr)
    )
    assert ca.certificate_addresses(csr) == [JOSE]
    issued = ca.certificate_from_csr(root[0], root[1], csr)
    assert ca.certificate_addresses(issued) == [JOSE]


@pytest.mark.parametrize(
    "address",
    [
        "jo\u0308se@例子.测试",  # NFD: RFC 6532 section 3.1 asks for NFC
        "jö\u200bsé@例子.测试",  # a format character
        "jö sé@例子.测试",
        "ö" * 33 + "@例子.测试",  # 66 octets
        "jösé@例子",  # one label
    ],
)
def test_bad_internationalised_addresses_are_refused(root, key, address: str) -> None:
    with pytest.raises(ConfigError):
        ca.issue_user_certificate(root[0], root[1], key.public_key(), [address])
