"""What the gateway makes of a message, per direction and policy, checked with OpenSSL."""

from __future__ import annotations

import subprocess

import pytest

from smimeproxy.smime import mime
from smimeproxy.smime.sealer import SealOptions, seal
from smimeproxy.smtp.transform import INBOUND, OUTBOUND, MessageTransform
from tests.cms import openssl_decrypt, openssl_verify
from tests.smtp.conftest import PLAIN

FROM_BOB = PLAIN.replace(b"From: Alice <alice@acme.test>", b"From: Bob <bob@partner.test>").replace(
    b"To: Bob <bob@partner.test>", b"To: Alice <alice@acme.test>, Dave <dave@acme.test>"
)


def _transform(make_processor, extra: str = "") -> MessageTransform:
    processor = make_processor(extra)
    return MessageTransform(processor, processor.config.smtp)


def _openssl_verify(openssl, tmp_path, data: bytes, pki) -> subprocess.CompletedProcess:
    return openssl_verify(openssl, tmp_path, data, pki["factory"].root.cert_pem)


def test_outbound_encrypted_to_recipient_and_sender_signed_by_sender(
    make_processor, openssl, tmp_path, pki
):
    t = _transform(make_processor)
    result = t.transform("alice@acme.test", ["bob@partner.test"], PLAIN)
    [copy] = result.copies
    assert (copy.direction, copy.action, copy.recipients) == (
        OUTBOUND,
        "sign+encrypt",
        ("bob@partner.test",),
    )
    assert b"The figures are attached." not in copy.data
    for reader in ("bob", "alice"):  # the sender's copy stays readable
        inner = openssl_decrypt(openssl, tmp_path, copy.data, pki[reader])
        assert b"multipart/signed" in inner
    verified = _openssl_verify(openssl, tmp_path, inner, pki)
    assert verified.returncode == 0, verified.stderr.decode()
    assert b"The figures are attached." in verified.stdout


def test_recipients_needing_different_treatment_get_separate_copies(make_processor):
    t = _transform(make_processor, '[smtp.recipient_policy]\n"press.test" = "pass-through"\n')
    result = t.transform(
        "alice@acme.test", ["bob@partner.test", "eve@other.test", "ed@press.test"], PLAIN
    )
    got = {c.recipients: c.action for c in result.copies}
    assert got == {
        ("bob@partner.test",): "sign+encrypt",
        ("eve@other.test",): "sign",  # encrypt-if-possible without a certificate
        ("ed@press.test",): "pass",
    }
    signed = next(c for c in result.copies if c.action == "sign")
    assert mime.parse_entity(signed.data).mime_type == "multipart/signed"


def test_sign_only_is_verifiable_by_openssl(make_processor, openssl, tmp_path, pki):
    t = _transform(make_processor, 'outbound_policy = "sign-only"')
    [copy] = t.transform("alice@acme.test", ["bob@partner.test"], PLAIN).copies
    assert copy.action == "sign"
    assert _openssl_verify(openssl, tmp_path, copy.data, pki).returncode == 0


def test_inbound_encrypted_opened_per_recipient_with_own_keys(make_processor, pki):
    t = _transform(make_processor)
    sealed = seal(
        FROM_BOB,
        signer=pki["bob"].pair,
        chain=[pki["bob"].certificate],
        recipients=[pki["alice"].certificate, pki["dave"].certificate],
        options=SealOptions(),
    )
    result = t.transform("bob@partner.test", ["alice@acme.test", "dave@acme.test"], sealed)
    assert [c.recipients for c in result.copies] == [("alice@acme.test",), ("dave@acme.test",)]
    for copy in result.copies:
        assert copy.direction == INBOUND and copy.details["decrypted"] == "true"
        top = mime.parse_entity(copy.data)
        [ar] = top.get_all("Authentication-Results")
        assert ar.startswith("mx.acme.test; smime=pass")
        assert "bob@partner.test" in ar
        assert b"The figures are attached." in copy.data
    # the verified signer's certificate was harvested
    assert t.processor.store.encryption_certificate("bob@partner.test") is not None


def test_inbound_for_a_user_without_keys_is_relayed_unchanged_with_status(make_processor, pki):
    t = _transform(make_processor)
    sealed = seal(FROM_BOB, recipients=[pki["bob"].certificate])
    [copy] = t.transform("bob@partner.test", ["alice@acme.test"], sealed).copies
    top = mime.parse_entity(copy.data)
    assert top.body == mime.parse_entity(sealed).body
    assert "undecryptable" in (top.get("X-SMIMEProxy-Status") or "")


def test_lookalike_status_headers_removed_in_every_direction(make_processor):
    t = _transform(make_processor)
    forged = (
        b"Authentication-Results: mx.acme.test; smime=pass body.smime-identifier=ceo@acme.test\r\n"
        b"X-SMIMEProxy-Status: verified\r\n"
        b"Authentication-Results: other.test; spf=pass\r\n" + FROM_BOB
    )
    for sender, rcpt in [
        ("x@elsewhere.test", "bob@partner.test"),  # transit
        ("bob@partner.test", "alice@acme.test"),  # inbound
        ("alice@acme.test", "dave@acme.test"),  # internal, pass-through
    ]:
        [copy] = t.transform(sender, [rcpt], forged).copies
        top = mime.parse_entity(copy.data)
        assert "ceo@acme.test" not in top.header_bytes().decode()
        assert "verified" not in (top.get("X-SMIMEProxy-Status") or "")
        assert "other.test; spf=pass" in top.get_all("Authentication-Results")


def test_keep_encrypted_adds_status_headers_only(make_processor, pki):
    t = _transform(make_processor, 'inbound_storage = "keep-encrypted"')
    sealed = seal(FROM_BOB, signer=pki["bob"].pair, recipients=[pki["alice"].certificate])
    [copy] = t.transform("bob@partner.test", ["alice@acme.test"], sealed).copies
    assert copy.action == "keep-encrypted"
    assert copy.data.endswith(sealed)
    head = copy.data[: -len(sealed)].decode()
    assert "Authentication-Results: mx.acme.test; smime=pass" in head
    # the stored message is still encrypted: no "decrypted" header, a status line instead
    assert "X-SMIMEProxy-Decryption" not in head
    assert "X-SMIMEProxy-Status: stored encrypted" in head


def test_encrypt_at_rest_encrypts_plaintext_inbound_to_the_recipient(
    make_processor, openssl, tmp_path, pki
):
    t = _transform(make_processor, 'inbound_storage = "encrypt-at-rest"')
    result = t.transform("bob@partner.test", ["alice@acme.test", "dave@acme.test"], FROM_BOB)
    assert [c.action for c in result.copies] == ["encrypt-at-rest", "encrypt-at-rest"]
    alice_copy = result.copies[0]
    assert b"The figures are attached." not in alice_copy.data
    assert b"The figures are attached." in openssl_decrypt(
        openssl, tmp_path, alice_copy.data, pki["alice"]
    )
    with pytest.raises(AssertionError):  # dave's key does not open alice's copy
        openssl_decrypt(openssl, tmp_path, alice_copy.data, pki["dave"])


@pytest.mark.parametrize(
    "message",
    [
        b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nnot base64 at all !!\r\n",
        b'Content-Type: multipart/mixed; boundary="never"\r\n\r\nno parts here\r\n',
        b"Subject: Gr\xfc\xdfe \xff\r\nFrom: \xc3\xa9@acme.test\r\n\r\n8-bit headers\r\n",
        b"no header at all\r\n",
        b"",
    ],
)
def test_malformed_input_relayed_never_dropped(make_processor, message):
    t = _transform(make_processor)
    for sender, rcpt in [("bob@partner.test", "alice@acme.test"), ("alice@acme.test", "b@o.test")]:
        result = t.transform(sender, [rcpt], message)
        assert result.refusal is None
        assert [c.recipients for c in result.copies] == [(rcpt,)]


# -- internationalised domains --------------------------------------------------------------
def test_idn_local_domain_matches_in_either_form():
    from smimeproxy.smtp.transform import INTERNAL, TRANSIT, direction_of, is_local

    assert is_local("用户@例子.测试", ["xn--fsqu00a.xn--0zwm56d"])
    assert is_local("bob@xn--fsqu00a.xn--0zwm56d", ["例子.测试"])
    assert is_local("bob@XN--FSQU00A.xn--0zwm56d.", ["例子.测试"])
    assert is_local("jürgen@Bücher.test", ["xn--bcher-kva.test"])
    assert not is_local("bob@例子.test", ["xn--fsqu00a.xn--0zwm56d"])
    assert direction_of("jösé@bücher.test", "用户@例子.测试", ["xn--bcher-kva.test"]) == OUTBOUND
    assert direction_of("a@例子.测试", "b@xn--fsqu00a.xn--0zwm56d", ["例子.测试"]) == INTERNAL
    assert direction_of("a@x.test", "b@例子.测试", ["acme.test"]) == TRANSIT


@pytest.mark.parametrize(
    ("key", "recipient"),
    [
        ("xn--fsqu00a.xn--0zwm56d", "用户@例子.测试"),
        ("例子.测试", "bob@xn--fsqu00a.xn--0zwm56d"),
        ("例子.测试", "bob@例子.测试"),
    ],
)
def test_idn_policy_key_matches_the_address_in_either_form(make_processor, key, recipient):
    t = _transform(make_processor, f'[smtp.recipient_policy]\n"{key}" = "pass-through"\n')
    assert t.engine_free("alice@acme.test", [recipient])
    [copy] = t.transform("alice@acme.test", [recipient], PLAIN).copies
    assert (copy.action, copy.recipients) == ("pass", (recipient,))


def test_certificate_of_an_idn_address_found_from_its_unicode_form(
    make_processor, pki, openssl, tmp_path
):
    """The store holds carol's certificate under its rfc822Name (A-label domain); mail to
    carol@例子.测试 under must-encrypt finds it and is encrypted to it."""
    carol = pki["factory"].user("carol@xn--fsqu00a.xn--0zwm56d")
    t = _transform(make_processor, '[smtp.recipient_policy]\n"例子.测试" = "must-encrypt"\n')
    t.processor.store.import_certificate(carol.certificate)
    assert t.check_recipient("alice@acme.test", "carol@例子.测试") is None
    assert t.check_recipient("alice@acme.test", "dan@例子.测试").code == 550
    [copy] = t.transform("alice@acme.test", ["carol@例子.测试"], PLAIN).copies
    assert (copy.action, copy.recipients) == ("sign+encrypt", ("carol@例子.测试",))
    assert b"The figures are attached." in openssl_decrypt(openssl, tmp_path, copy.data, carol)
