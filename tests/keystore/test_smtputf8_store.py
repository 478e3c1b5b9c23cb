"""An SmtpUTF8Mailbox certificate (RFC 8398) made by OpenSSL, not by this project:
read as such by ``openssl x509 -text``, imported and harvested into the key store and
found for its address in either domain form, validated for that address and refused
for another, and mail sealed to it through the MessageProcessor decrypted by
``openssl cms``.

The certificate is written with a config-file section and ``FORMAT:UTF8,UTF8:``: with
``-addext "subjectAltName=otherName:1.3.6.1.5.5.7.8.9;UTF8:jösé@..."`` OpenSSL 3.0
reads the value as Latin-1 and encodes every byte again (``jÃ¶sÃ©@...``), which is
shown below to name another mailbox.
"""

from __future__ import annotations

import email
import email.policy
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from smimeproxy.keystore import SyncStore
from smimeproxy.keystore.certificates import certificate_addresses, normalise
from smimeproxy.pki import ca
from smimeproxy.pki.validation import PathValidator, address_matches
from smimeproxy.processing import MessageProcessor
from smimeproxy.smime.status import Outcome
from smimeproxy.testing import CertificateFactory, smime_settings

JOSE = "jösé@例子.测试"
JOSE_ALABEL = "jösé@xn--fsqu00a.xn--0zwm56d"
ALICE = "alice@acme.test"
SETTINGS = smime_settings()
CONFIG = """\
[req]
distinguished_name = dn
x509_extensions = ext
prompt = no
utf8 = yes
[dn]
CN = jose
[ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyAgreement
extendedKeyUsage = emailProtection
subjectAltName = @san
[san]
otherName.1 = 1.3.6.1.5.5.7.8.9;FORMAT:UTF8,UTF8:jösé@例子.测试
"""


def _run(*args: str, stdin: bytes | None = None) -> bytes:
    done = subprocess.run(args, input=stdin, capture_output=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


@pytest.fixture(scope="module")
def jose(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, x509.Certificate]:
    """(certificate path, key path, certificate): self-signed by OpenSSL, EC P-256."""
    openssl = _openssl()
    d = tmp_path_factory.mktemp("jose")
    (d / "req.cnf").write_text(CONFIG, encoding="utf-8")
    cert, key = d / "jose.pem", d / "jose.key"
    _run(
        openssl, "req", "-x509", "-config", str(d / "req.cnf"), "-newkey", "ec",
        "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
        "-out", str(cert), "-days", "30",
    )  # fmt: skip
    return cert, key, x509.load_pem_x509_certificate(cert.read_bytes())


def _openssl() -> str:
    from tests.conftest import require_tool

    return require_tool("openssl")


def test_openssl_reads_an_smtputf8mailbox(jose: tuple[Path, Path, x509.Certificate]) -> None:
    text = _run(_openssl(), "x509", "-in", str(jose[0]), "-noout", "-text").decode("utf-8")
    assert f"othername: SmtpUTF8Mailbox::{JOSE}" in text
    assert "email:" not in text


def test_the_brief_addext_form_double_encodes(tmp_path: Path) -> None:
    """OpenSSL's ``-addext ...;UTF8:`` writes another mailbox (every byte re-encoded):
    it is read as that mailbox and does not match jösé."""
    openssl = _openssl()
    _run(
        openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", str(tmp_path / "k.pem"), "-out", str(tmp_path / "c.pem"),
        "-subj", "/CN=jose", "-days", "1",
        "-addext", f"subjectAltName=otherName:1.3.6.1.5.5.7.8.9;UTF8:{JOSE}",
    )  # fmt: skip
    cert = x509.load_pem_x509_certificate((tmp_path / "c.pem").read_bytes())
    (address,) = certificate_addresses(cert)
    assert address == JOSE.encode("utf-8").decode("latin-1")
    assert not address_matches(address, JOSE)


def test_addresses_are_read_from_the_smtputf8mailbox(
    jose: tuple[Path, Path, x509.Certificate],
) -> None:
    assert certificate_addresses(jose[2]) == (JOSE,)
    assert normalise(JOSE_ALABEL) == normalise(f" {JOSE} ") == JOSE
    assert normalise("Jösé@例子.测试") != JOSE  # a non-ASCII local part is exact
    assert normalise("Alice@ACME.test") == ALICE  # ASCII: as before


def test_imported_certificate_is_found_for_both_domain_forms(
    store: SyncStore, jose: tuple[Path, Path, x509.Certificate]
) -> None:
    record = store.import_certificate(jose[2])
    assert record.addresses == (JOSE,)
    for address in (JOSE, JOSE_ALABEL, f" {JOSE} "):
        found = store.encryption_certificate(address)
        assert found is not None and found.fingerprint == record.fingerprint
    assert [r.fingerprint for r in store.certificates(JOSE_ALABEL)] == [record.fingerprint]
    assert store.encryption_candidates(JOSE_ALABEL).external[0].fingerprint == record.fingerprint
    assert store.encryption_certificate("Jösé@例子.测试") is None
    assert store.encryption_certificate("jose@例子.测试") is None


def test_validated_for_its_address_and_refused_for_another(
    jose: tuple[Path, Path, x509.Certificate],
) -> None:
    validator = PathValidator([jose[2]])
    for sender in (JOSE, JOSE_ALABEL):
        status = validator.validate(jose[2], purpose="encrypt", sender=sender)
        assert status.trusted, status.checks
    for other in ("Jösé@例子.测试", "jose@例子.测试", "jösé@例子.example"):
        status = validator.validate(jose[2], purpose="encrypt", sender=other)
        assert not status.trusted
        (address,) = [c for c in status.checks if c.name == "address"]
        assert address.outcome is Outcome.FAIL and JOSE in address.detail


@pytest.fixture
def processor(
    store: SyncStore, jose: tuple[Path, Path, x509.Certificate]
) -> Callable[[], MessageProcessor]:
    pki = CertificateFactory()
    alice = pki.user(ALICE, key_kind="p256")
    store.add_trust(pki.root.certificate)
    store.add_trust(jose[2])
    store.import_key(alice.private_key, alice.certificate)
    return lambda: MessageProcessor(store, SETTINGS)


def test_sealed_to_the_utf8_recipient_and_opened_by_openssl(
    processor: Callable[[], MessageProcessor],
    store: SyncStore,
    jose: tuple[Path, Path, x509.Certificate],
) -> None:
    store.import_certificate(jose[2])
    message = f"From: {ALICE}\r\nTo: {JOSE}\r\nSubject: hi\r\n\r\nhello jösé\r\n".encode()
    sealed = processor().seal_for(message, ALICE, [JOSE_ALABEL])
    plain = _run(
        _openssl(), "cms", "-decrypt", "-recip", str(jose[0]), "-inkey", str(jose[1]),
        stdin=sealed.data,
    )  # fmt: skip
    inner = email.message_from_bytes(plain, policy=email.policy.default)
    assert inner.get_content_type() == "multipart/signed"  # signed by alice, then sealed
    texts = [p.get_payload(decode=True) for p in inner.walk() if not p.is_multipart()]
    assert "hello jösé".encode() in texts[0]


def test_harvested_from_a_signature_made_by_openssl(
    processor: Callable[[], MessageProcessor],
    store: SyncStore,
    jose: tuple[Path, Path, x509.Certificate],
) -> None:
    body = b"Content-Type: text/plain\r\n\r\nfrom jose\r\n"
    signed = _run(
        _openssl(), "cms", "-sign", "-signer", str(jose[0]), "-inkey", str(jose[1]),
        "-md", "sha256", stdin=body,
    )  # fmt: skip
    headers = f"From: {JOSE}\r\nTo: {ALICE}\r\nSubject: signed\r\n".encode()
    opened = processor().open_for(headers + signed, [], harvest=True)
    assert opened.status.signers[0].verified
    found = store.encryption_certificate(JOSE_ALABEL)
    assert found is not None and found.certificate == jose[2]


def test_a_local_user_whose_certificate_the_ca_gave_an_smtputf8mailbox(store: SyncStore) -> None:
    root_key, root_cert = ca.create_root("smimeproxy EAI Test Root", key_kind="p256")
    key = ca.generate_user_key("p256")
    cert = ca.issue_user_certificate(root_key, root_cert, key.public_key(), [JOSE_ALABEL])
    record = store.import_key(key, cert)
    assert store.user(JOSE_ALABEL).address == JOSE
    assert store.user(JOSE).id == record.owner
    assert store.signing_key(JOSE_ALABEL).pair.certificate == cert
    found = store.encryption_certificate(JOSE_ALABEL)
    assert found is not None and found.certificate == cert
    assert [p.certificate for p in store.decryption_keys(JOSE)] == [cert]
