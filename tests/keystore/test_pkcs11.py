"""Keys in a PKCS#11 token (SoftHSM2): generated there, certified by the internal CA,
stored by reference only, used by the engine; OpenSSL checks the results."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from twisted.logger import LogLevel, capturedLogs

from smimeproxy.errors import (
    DecryptionFailed,
    KeyNotFound,
    KeystoreError,
    UnsupportedAlgorithm,
)
from smimeproxy.keystore import MasterSecret, SyncStore, open_store
from smimeproxy.keystore.pkcs11 import PKCS11Token, TokenKey, parse_reference
from smimeproxy.pki.ca import create_root, issue_user_certificate
from smimeproxy.smime.opener import open_message
from smimeproxy.smime.sealer import SealOptions, seal
from tests.keystore.softhsm import SoftHSM, softhsm  # noqa: F401  (fixture)

MESSAGE = (
    b"From: alice@acme.test\r\nTo: bob@acme.test\r\nSubject: from the token\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n\r\nSigned inside the HSM.\r\n"
)
CONTENT = b"Content-Type: text/plain\r\n\r\nFor the token's eyes only.\r\n"


@dataclass
class World:
    softhsm: SoftHSM
    token: PKCS11Token
    ca_key: object
    ca_cert: x509.Certificate
    ca_pem: Path
    rsa_ref: str
    rsa_cert: x509.Certificate
    ec_ref: str
    ec_cert: x509.Certificate
    store: SyncStore
    store_url: str
    master: MasterSecret
    tmp: Path


def _pem(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="module")
def world(
    softhsm: SoftHSM,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("pkcs11")
    token = PKCS11Token(softhsm.module, softhsm.tokens[0], softhsm.pin)
    ca_key, ca_cert = create_root("smimeproxy PKCS#11 Test CA", key_kind="p256")
    rsa_ref, rsa_pub = token.generate_key("alice-2026", "rsa2048")
    ec_ref, ec_pub = token.generate_key("bob-2026", "p256")
    rsa_cert = issue_user_certificate(ca_key, ca_cert, rsa_pub, ["alice@acme.test"])  # type: ignore[arg-type]
    ec_cert = issue_user_certificate(ca_key, ca_cert, ec_pub, ["bob@acme.test"])  # type: ignore[arg-type]
    master = MasterSecret(os.urandom(32), "master key (test)")
    url = f"sqlite:{tmp / 'store.db'}"
    store = open_store(url, master, create=True, hsm=token.resolver())
    store.import_key(None, rsa_cert, hsm_reference=rsa_ref)
    store.import_key(None, ec_cert, hsm_reference=ec_ref)
    world = World(
        softhsm, token, ca_key, ca_cert, _pem(tmp / "ca.pem", ca_cert),
        rsa_ref, rsa_cert, ec_ref, ec_cert, store, url, master, tmp,
    )  # fmt: skip
    yield world
    token.close()


def _run(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, capture_output=True, timeout=60)


def _openssl_verifies(openssl: str, world: World, signed: bytes, name: str) -> bytes:
    path = world.tmp / f"{name}.eml"
    out = world.tmp / f"{name}.out"
    path.write_bytes(signed)
    done = _run(
        openssl, "cms", "-verify", "-in", str(path), "-CAfile", str(world.ca_pem),
        "-out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"Verification successful" in done.stderr
    return out.read_bytes()


def _openssl_encrypt(
    openssl: str, world: World, cert: x509.Certificate, name: str, *keyopts: str
) -> bytes:
    plain = world.tmp / f"{name}.txt"
    plain.write_bytes(CONTENT)
    recip = _pem(world.tmp / f"{name}-recip.pem", cert)
    out = world.tmp / f"{name}.p7m"
    opts: list[str] = []
    for opt in keyopts:
        opts += ["-keyopt", opt]
    done = _run(
        openssl, "cms", "-encrypt", "-in", str(plain), "-aes256", "-recip", str(recip),
        *opts, "-out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return out.read_bytes()


# -- the key stays in the token -------------------------------------------------------


def test_generated_private_keys_are_sensitive_and_not_extractable(world: World) -> None:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass
    from pkcs11.exceptions import AttributeSensitive

    # Ask the token directly, not through the code under test (this process is
    # logged in already, so a plain session sees the private objects).
    token = pkcs11.lib(world.token.module_path).get_token(token_label=world.softhsm.tokens[0])
    with token.open() as session:
        for ref in (world.rsa_ref, world.ec_ref):
            key_id = parse_reference(ref).key_id
            (priv,) = session.get_objects(
                {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: key_id}
            )
            assert priv[Attribute.SENSITIVE] is True
            assert priv[Attribute.EXTRACTABLE] is False
            assert priv[Attribute.NEVER_EXTRACTABLE] is True
            assert priv[Attribute.TOKEN] is True and priv[Attribute.PRIVATE] is True
            secret = Attribute.PRIVATE_EXPONENT if ref == world.rsa_ref else Attribute.VALUE
            with pytest.raises(AttributeSensitive):
                priv[secret]
    assert world.token.protection(world.rsa_ref).protected
    assert world.token.protection(world.ec_ref).protected


def test_store_holds_only_the_reference(world: World) -> None:
    records = {r.hsm_reference: r for r in world.store.keys()}
    assert set(records) == {world.rsa_ref, world.ec_ref}
    for record in records.values():
        assert record.sealed is None
    # Without a token the store cannot produce the key: nothing was sealed in it.
    bare = open_store(world.store_url, world.master)
    with pytest.raises(KeystoreError, match="PKCS#11 token"):
        bare.key_pair(records[world.rsa_ref])


def test_reference_is_an_rfc7512_uri(world: World) -> None:
    ref = parse_reference(world.rsa_ref)
    assert world.rsa_ref.startswith("pkcs11:token=smimeproxy-test;object=alice-2026;id=%")
    assert ref.token == "smimeproxy-test" and ref.label == "alice-2026"
    assert ref.key_id is not None and len(ref.key_id) == 16
    assert parse_reference(ref.uri()) == ref


# -- signing through the engine, verified by OpenSSL ----------------------------------


@pytest.mark.parametrize("pss", [False, True], ids=["pkcs1v15", "pss"])
def test_rsa_token_key_signs_and_openssl_verifies(world: World, openssl: str, pss: bool) -> None:
    identity = world.store.signing_key("alice@acme.test")
    assert isinstance(identity.pair.key, TokenKey)
    signed = seal(MESSAGE, signer=identity.pair, chain=identity.chain, options=SealOptions(pss=pss))
    content = _openssl_verifies(openssl, world, signed, f"rsa-{pss}")
    assert b"Signed inside the HSM." in content


def test_ec_token_key_signs_and_openssl_verifies(world: World, openssl: str) -> None:
    identity = world.store.signing_key("bob@acme.test")
    signed = seal(MESSAGE.replace(b"alice", b"bob"), signer=identity.pair, chain=identity.chain)
    content = _openssl_verifies(openssl, world, signed, "ec")
    assert b"Signed inside the HSM." in content


@pytest.mark.parametrize("hash_name", ["sha256", "sha384", "sha512"])
def test_signatures_verify_with_the_certificate_key(world: World, hash_name: str) -> None:
    h = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}[hash_name]()
    data = b"signed attributes " + hash_name.encode()
    rsa_key = world.token.private_key(world.rsa_ref)
    rsa_pub = world.rsa_cert.public_key()
    assert isinstance(rsa_pub, rsa.RSAPublicKey)
    rsa_pub.verify(rsa_key.sign(data, hash_name), data, padding.PKCS1v15(), h)
    pss = padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size)
    rsa_pub.verify(rsa_key.sign(data, hash_name, pss=True), data, pss, h)
    ec_pub = world.ec_cert.public_key()
    assert isinstance(ec_pub, ec.EllipticCurvePublicKey)
    ec_pub.verify(world.token.private_key(world.ec_ref).sign(data, hash_name), data, ec.ECDSA(h))


# -- decryption through the engine of what OpenSSL encrypted --------------------------


@pytest.mark.parametrize(
    ("who", "keyopts", "key_algorithm"),
    [
        ("alice", (), "rsaes_pkcs1v15"),
        ("alice", ("rsa_padding_mode:oaep",), "rsaes_oaep"),
        ("bob", (), "dh_single_pass"),
    ],
    ids=["rsa-pkcs1v15", "rsa-oaep-sha1", "ecdh"],
)
def test_openssl_encrypts_to_token_certificate_and_engine_decrypts(
    world: World, openssl: str, who: str, keyopts: tuple[str, ...], key_algorithm: str
) -> None:
    cert = world.rsa_cert if who == "alice" else world.ec_cert
    encrypted = _openssl_encrypt(openssl, world, cert, f"enc-{who}-{len(keyopts)}", *keyopts)
    opened = open_message(encrypted, keys=world.store.decryption_keys(f"{who}@acme.test"))
    decryption = opened.status.decryption
    assert decryption is not None and decryption.decrypted, opened.status.errors
    assert decryption.recipient == cert
    assert decryption.key_algorithm is not None
    assert decryption.key_algorithm.startswith(key_algorithm)
    assert b"For the token's eyes only." in opened.data


def test_oaep_sha256_decrypts_or_is_reported_unsupported(world: World, openssl: str) -> None:
    """SoftHSM2 before 2.7 does OAEP with SHA-1 only: that must be a clear
    UnsupportedAlgorithm, never a silent failure; newer tokens must decrypt."""
    import pkcs11

    key = world.token.private_key(world.rsa_ref)
    public = world.rsa_cert.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    h = hashes.SHA256()
    cek = os.urandom(32)
    ciphertext = public.encrypt(cek, padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None))
    if pkcs11.lib(world.token.module_path).library_version < (2, 7):
        with pytest.raises(UnsupportedAlgorithm, match="OAEP with sha256"):
            key.decrypt(ciphertext, oaep_hash="sha256")
    else:
        assert key.decrypt(ciphertext, oaep_hash="sha256") == cek


def test_damaged_key_transport_is_decryption_failed(world: World) -> None:
    key = world.token.private_key(world.rsa_ref)
    public = world.rsa_cert.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    good = public.encrypt(b"k" * 32, padding.PKCS1v15())
    assert key.decrypt(good) == b"k" * 32
    bad = bytes([good[0] ^ 1]) + good[1:]
    for oaep in (None, "sha1"):
        with pytest.raises(DecryptionFailed):
            key.decrypt(bad, oaep_hash=oaep)


def test_ecdh_secret_matches_the_peer_side(world: World) -> None:
    key = world.token.private_key(world.ec_ref)
    token_pub = world.ec_cert.public_key()
    assert isinstance(token_pub, ec.EllipticCurvePublicKey)
    peer = ec.generate_private_key(ec.SECP256R1())
    assert key.exchange(peer.public_key()) == peer.exchange(ec.ECDH(), token_pub)
    with pytest.raises(DecryptionFailed):
        key.exchange(ec.generate_private_key(ec.SECP384R1()).public_key())
    with pytest.raises(UnsupportedAlgorithm):
        world.token.private_key(world.rsa_ref).exchange(peer.public_key())
    with pytest.raises(UnsupportedAlgorithm):
        key.decrypt(b"\x00" * 32)


# -- lookups, errors, threads ---------------------------------------------------------


def test_missing_and_foreign_references_are_key_not_found(world: World) -> None:
    ref = parse_reference(world.rsa_ref)
    with pytest.raises(KeyNotFound, match="smimeproxy-other"):
        world.token.private_key(world.rsa_ref.replace("smimeproxy-test", "smimeproxy-other"))
    unknown = type(ref)(ref.token, None, b"\x00" * 16).uri()
    with pytest.raises(KeyNotFound):
        world.token.private_key(unknown)
    for malformed in ("file:/tmp/key.pem", "pkcs11:token=smimeproxy-test", "pkcs11:object"):
        with pytest.raises(KeyNotFound):
            world.token.private_key(malformed)


def test_resolver_refuses_a_certificate_of_another_key(world: World) -> None:
    resolve = world.token.resolver()
    assert resolve(world.rsa_ref, world.rsa_cert).public_key() == world.rsa_cert.public_key()
    with pytest.raises(KeystoreError, match="does not belong"):
        resolve(world.rsa_ref, world.ec_cert)


def test_generate_refuses_unknown_kinds_and_taken_labels(world: World) -> None:
    with pytest.raises(UnsupportedAlgorithm):
        world.token.generate_key("x", "rsa1024")
    with pytest.raises(KeystoreError, match="already has a key"):
        world.token.generate_key("alice-2026", "p256")


def test_rsa3072_key_signs(world: World) -> None:
    ref, public = world.token.generate_key("carol-3072", "rsa3072")
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 3072
    signature = world.token.private_key(ref).sign(b"data", "sha256")
    public.verify(signature, b"data", padding.PKCS1v15(), hashes.SHA256())


def test_wrong_pin_is_a_keystore_error_without_the_pin(softhsm: SoftHSM) -> None:  # noqa: F811
    with pytest.raises(KeystoreError) as caught:
        PKCS11Token(softhsm.module, softhsm.tokens[1], "wrong-pin-0000")
    assert "PIN" in str(caught.value) and "wrong-pin-0000" not in str(caught.value)
    with pytest.raises(KeystoreError, match="no token labelled"):
        PKCS11Token(softhsm.module, "no-such-token", softhsm.pin)
    with pytest.raises(KeystoreError, match="does not exist"):
        PKCS11Token("/nonexistent/libpkcs11.so", softhsm.tokens[0], softhsm.pin)


def test_pin_is_never_logged_nor_shown(softhsm: SoftHSM) -> None:  # noqa: F811
    with capturedLogs() as events:
        token = PKCS11Token(softhsm.module, softhsm.tokens[1], softhsm.pin)
        ref, _ = token.generate_key("logged", "p256")
        token.private_key(ref).sign(b"x", "sha256")
        token.close()
    assert any(e["log_level"] == LogLevel.info for e in events)
    text = " ".join(repr(e) for e in events) + repr(token)
    assert softhsm.pin not in text


# python-pkcs11 finalises the search of the dropped session in __del__ and reports
# SessionHandleInvalid there as "unraisable"; the call itself is retried and succeeds.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_closed_token_refuses_and_lost_session_is_reopened(softhsm: SoftHSM) -> None:  # noqa: F811
    token = PKCS11Token(softhsm.module, softhsm.tokens[1], softhsm.pin)
    ref, public = token.generate_key("reopen", "p256")
    key = token.private_key(ref)
    token._session.close()  # as if the HSM dropped the session
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(key.sign(b"again", "sha256"), b"again", ec.ECDSA(hashes.SHA256()))
    token.close()
    with pytest.raises(KeystoreError, match="closed"):
        key.sign(b"late", "sha256")


def test_concurrent_signing_from_many_threads(world: World) -> None:
    rsa_key = world.token.private_key(world.rsa_ref)
    ec_key = world.token.private_key(world.ec_ref)
    rsa_pub = world.rsa_cert.public_key()
    ec_pub = world.ec_cert.public_key()
    assert isinstance(rsa_pub, rsa.RSAPublicKey) and isinstance(ec_pub, ec.EllipticCurvePublicKey)
    failures: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(10):
                data = f"{n}-{i}".encode()
                rsa_pub.verify(
                    rsa_key.sign(data, "sha256"), data, padding.PKCS1v15(), hashes.SHA256()
                )
                ec_pub.verify(ec_key.sign(data, "sha256"), data, ec.ECDSA(hashes.SHA256()))
        except BaseException as e:  # collected and asserted below
            failures.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failures
