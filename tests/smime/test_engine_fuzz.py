"""Hostile input to the engine's entry points: only our own errors, never a crash.

``open_message`` promises more: it never raises at all for bad input, it flags the
message and passes it on.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smimeproxy.errors import SMIMEProxyError
from smimeproxy.smime import mime
from smimeproxy.smime.opener import OpenOptions, open_message
from smimeproxy.smime.sealer import seal
from smimeproxy.testing import CertificateFactory

PLAIN = (
    b"From: alice@acme.test\r\nTo: bob@partner.test\r\nSubject: s\r\n"
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
    b"hello\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: "
    b"base64\r\n\r\nAAEC\r\n--b--\r\n"
)


@pytest.fixture(scope="module")
def sealed():
    f = CertificateFactory()
    alice, bob = f.user("alice@acme.test"), f.user("bob@partner.test")
    data = seal(PLAIN, signer=alice.pair, recipients=[bob.certificate])
    signed = seal(PLAIN, signer=alice.pair)
    return data, signed, bob.pair


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_mime_parser_on_random_bytes(data):
    entity = mime.parse_entity(data)
    # nothing is changed or lost: headers are a prefix, the body a suffix, at most a
    # line end between them
    assert data.startswith(entity.header_bytes()) and data.endswith(entity.body)
    assert len(data) - len(entity.header_bytes()) - len(entity.body) <= 2
    try:
        list(mime.iter_leaves(entity))
        for leaf in mime.iter_leaves(entity):
            leaf.decoded_body()
    except SMIMEProxyError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_open_random_bytes_never_raises(data):
    opened = open_message(data, options=OpenOptions(authserv_id="acme.test"))
    assert b"Authentication-Results: acme.test; smime=" in opened.data
    # a reader may trust the flag and skip its own line-end check (the IMAP view does)
    assert not opened.crlf or mime.is_crlf(opened.data)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_open_mutated_messages_never_raises(sealed, data):
    enveloped, signed, key = sealed
    base = data.draw(st.sampled_from([enveloped, signed, PLAIN]))
    cut = data.draw(st.integers(0, len(base)))
    pos = data.draw(st.integers(0, max(0, len(base) - 1)))
    byte = data.draw(st.integers(0, 255))
    mutated = bytearray(base[:cut] if data.draw(st.booleans()) else base)
    if mutated:
        mutated[min(pos, len(mutated) - 1)] = byte
    opened = open_message(bytes(mutated), keys=[key], options=OpenOptions(authserv_id="acme.test"))
    assert opened.data
    assert not opened.crlf or mime.is_crlf(opened.data)
