"""Which content cipher the gateway picks (DESIGN.md sending defaults, RFC 8551 2.7):
AES-256-CBC in EnvelopedData unless every recipient advertised AES-GCM, then
AuthEnvelopedData. The sender's own copy does not count against GCM: our own users'
mail is read through this engine, which reads GCM. Results are read with ``openssl cms``."""

from __future__ import annotations

import os
from pathlib import Path

from smimeproxy.keystore import MasterSecret, open_store
from smimeproxy.processing import MessageProcessor
from smimeproxy.smime import mime
from smimeproxy.testing import CertificateFactory, smime_settings
from tests.cms import openssl_decrypt

MESSAGE = b"From: alice@acme.test\r\nTo: bob@partner.test\r\nSubject: hi\r\n\r\nhello\r\n"
SETTINGS = smime_settings()


def _processor(tmp_path: Path, bob_capabilities: tuple[str, ...] | None):
    pki = CertificateFactory()
    alice, bob = pki.user("alice@acme.test"), pki.user("bob@partner.test")
    store = open_store(
        f"sqlite:{tmp_path / 'store.db'}", MasterSecret(os.urandom(32), "t"), create=True
    )
    store.add_trust(pki.root.certificate)
    store.import_key(alice.private_key, alice.certificate)
    if bob_capabilities is None:
        store.import_certificate(bob.certificate)
    else:
        store.harvest(bob.certificate, bob_capabilities, verified=True)
    return MessageProcessor(store, SETTINGS), alice, bob


def _smime_type(data: bytes) -> str:
    return mime.parse_entity(data).content_type()[1]["smime-type"].lower()


def test_gcm_when_the_partner_advertised_it_and_both_copies_read(tmp_path, openssl):
    processor, alice, bob = _processor(tmp_path, ("aes256_gcm", "aes128_gcm", "aes256_cbc"))
    sealed = processor.seal_for(MESSAGE, "alice@acme.test", ["bob@partner.test"])
    assert sealed.encrypted_to == ("bob@partner.test", "alice@acme.test")
    assert _smime_type(sealed.data) == "authenveloped-data"
    for reader in (bob, alice):  # OpenSSL 3.0 reads AuthEnvelopedData
        assert b"hello" in openssl_decrypt(openssl, tmp_path, sealed.data, reader)


def test_cbc_when_the_partner_advertised_nothing_or_no_gcm(tmp_path, openssl):
    for caps in (None, ("aes128_cbc", "tripledes_3key")):
        (tmp_path / str(caps is None)).mkdir()
        processor, _, bob = _processor(tmp_path / str(caps is None), caps)
        sealed = processor.seal_for(MESSAGE, "alice@acme.test", ["bob@partner.test"])
        assert _smime_type(sealed.data) == "enveloped-data"
        assert sealed.cipher is None  # "auto": chosen from capabilities
        assert b"hello" in openssl_decrypt(openssl, tmp_path, sealed.data, bob)
