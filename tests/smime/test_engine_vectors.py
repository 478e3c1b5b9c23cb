"""RFC 9788 messages made with the RFC 9216 keys, opened by the whole engine."""

from __future__ import annotations

import email
import email.policy

import pytest

from smimeproxy.pki.validation import PathValidator
from smimeproxy.smime.keys import KeyPair, load_certificates, load_private_key
from smimeproxy.smime.opener import OpenOptions, open_message
from smimeproxy.smime.status import SMIMEResult

OPTS = OpenOptions(authserv_id="example.net")


def _pair(base, name):
    (cert,) = load_certificates((base / f"{name}.crt").read_bytes())
    return KeyPair(cert, load_private_key((base / f"{name}.key").read_bytes()))


@pytest.fixture
def rfc9216(vectors):
    base = vectors / "rfc9216"
    anchors = load_certificates((base / "ca.rsa.crt").read_bytes())
    return {
        "validator": PathValidator(anchors),
        "bob": _pair(base, "bob.encrypt"),
        "alice": _pair(base, "alice.encrypt"),
        "messages": vectors / "rfc9788-header-protection",
    }


@pytest.mark.parametrize("owner", ["bob", "alice"])
def test_signed_and_encrypted(rfc9216, owner):
    data = (rfc9216["messages"] / "smime-signed-enc.eml").read_bytes()
    opened = open_message(data, keys=[rfc9216[owner]], validator=rfc9216["validator"], options=OPTS)
    assert opened.status.layers == ("enveloped", "opaque-signed")
    assert opened.status.decryption.cipher == "aes128_cbc"
    assert opened.status.smime_result is SMIMEResult.PASS, opened.status.as_dict()
    assert opened.status.identifier == "alice@smime.example"


def test_header_protection_baseline_restores_subject(rfc9216):
    data = (rfc9216["messages"] / "smime-signed-enc-hp-baseline.eml").read_bytes()
    outer = email.message_from_bytes(data, policy=email.policy.default)
    assert outer["Subject"] == "[...]"
    opened = open_message(data, keys=[rfc9216["bob"]], validator=rfc9216["validator"], options=OPTS)
    assert opened.status.smime_result is SMIMEResult.PASS
    shown = email.message_from_bytes(opened.data, policy=email.policy.default)
    assert shown["Subject"] != "[...]"
    assert "Subject" in {h.title() for h in opened.status.header_protection.restored}
    assert not opened.status.header_protection.mismatches


@pytest.mark.parametrize("name", ["smime-one-part.eml", "smime-one-part-complex-hp.eml"])
def test_signed_only(rfc9216, name):
    data = (rfc9216["messages"] / name).read_bytes()
    opened = open_message(data, validator=rfc9216["validator"], options=OPTS)
    assert opened.status.layers == ("opaque-signed",)
    assert opened.status.smime_result is SMIMEResult.PASS


def test_wrong_anchor_is_policy_not_pass(rfc9216, vectors):
    other = load_certificates((vectors / "rfc9216/ca.ed25519.crt").read_bytes())
    data = (rfc9216["messages"] / "smime-one-part.eml").read_bytes()
    opened = open_message(data, validator=PathValidator(other), options=OPTS)
    assert opened.status.smime_result is SMIMEResult.POLICY
