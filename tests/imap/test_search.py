"""SEARCH BODY / TEXT over decrypted views, checked against Dovecot's own SEARCH.

The same messages are appended to a throwaway Dovecot in plaintext; for every needle
``UID SEARCH BODY`` and ``UID SEARCH TEXT`` there must give exactly the messages that
:func:`matches_text` picks. (The proxy then uses matches_text for S/MIME messages, whose
plaintext the server never sees.)
"""

from __future__ import annotations

import imaplib
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smimeproxy.errors import MalformedMessage
from smimeproxy.imap.search import matches_text, searchable_text
from smimeproxy.imap.views import MessageView

CORPUS = [
    # 1 plain ASCII
    b"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\nSubject: Quarterly report\r\n"
    b"\r\nThe numbers are in. Revenue grew.\r\n",
    # 2 quoted-printable UTF-8 with a soft break inside a word
    b"From: a@example.org\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= aus Berlin\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\nViele Gr=C3=BC=C3=9Fe und bis Mon=\r\n"
    b"tag, der Vorgang ist abge=\r\nschlossen.\r\n",
    # 3 base64 ISO-8859-1
    b"From: c@example.org\r\nSubject: latin\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nR3L832UgYXVzIEv2bG4gYW0gUmhlaW4K\r\n",
    # 4 multipart/alternative with HTML, and a base64 text attachment
    b"From: d@example.org\r\nSubject: mixed bag\r\nContent-Type: multipart/mixed; boundary=M\r\n"
    b"\r\n--M\r\nContent-Type: multipart/alternative; boundary=A\r\n\r\n--A\r\n"
    b"Content-Type: text/plain\r\n\r\nplain words here\r\n--A\r\nContent-Type: text/html\r\n\r\n"
    b"<p>html <b>words</b> here</p>\r\n--A--\r\n--M\r\nContent-Type: text/csv; name=data.csv\r\n"
    b"Content-Disposition: attachment; filename=data.csv\r\nContent-Transfer-Encoding: base64"
    b"\r\n\r\nY29sdW1uLHZhbHVlCmFscGhhLDEK\r\n--M--\r\n",
    # 5 forwarded message/rfc822
    b"From: e@example.org\r\nSubject: Fwd: plans\r\nContent-Type: multipart/mixed; boundary=F\r\n"
    b"\r\n--F\r\nContent-Type: text/plain\r\n\r\nsee below\r\n--F\r\n"
    b"Content-Type: message/rfc822\r\n\r\nFrom: Zed <zed@elsewhere.net>\r\nSubject: secret plans"
    b"\r\n\r\nMeet at the lighthouse.\r\n--F--\r\n",
    # 6 header-only words, empty body
    b"From: f@example.org\r\nSubject: Lighthouse keeper\r\nX-Note: revenue\r\n\r\n",
]

NEEDLES = [
    "revenue",
    "REVENUE",
    "numbers are in",
    "Grüße",
    "Montag",
    "abgeschlossen",
    "Köln am Rhein",
    "words here",
    "alpha,1",
    "lighthouse",
    "secret plans",
    "zed@elsewhere",
    "quarterly",
    "bob@example.org",
    "Berlin",
    "nowhere-to-be-found",
]


def _views() -> dict[int, MessageView]:
    return {uid: MessageView(data) for uid, data in enumerate(CORPUS, 1)}


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory):
    from tests.integration.dovecot import start_dovecot

    server = start_dovecot(tmp_path_factory.mktemp("search"), {"searcher": "pw"})
    conn = imaplib.IMAP4(server.host, server.port)
    try:
        conn.login("searcher", "pw")
        for data in CORPUS:
            assert conn.append("INBOX", None, None, data)[0] == "OK"
        conn.select("INBOX", readonly=True)
        yield conn
    finally:
        try:
            conn.logout()
        finally:
            server.stop()
            if server.process.stderr is not None:  # the fixture leaves its pipe open
                server.process.stderr.close()


def _server_search(conn: imaplib.IMAP4, key: str, needle: str) -> set[int]:
    conn.literal = needle.encode()
    typ, data = conn.uid("SEARCH", "CHARSET", "UTF-8", key)
    assert typ == "OK", data
    return {int(x) for x in data[0].split()}


@pytest.mark.parametrize("key", ["BODY", "TEXT"])
@pytest.mark.parametrize("needle", NEEDLES)
def test_same_matches_as_dovecot(dovecot, key, needle):
    views = _views()
    ours = {uid for uid, view in views.items() if matches_text(view, key, needle)}
    assert ours == _server_search(dovecot, key, needle)


def test_body_is_not_header_and_text_is_both():
    view = MessageView(CORPUS[0])
    assert matches_text(view, "TEXT", "quarterly report")
    assert not matches_text(view, "BODY", "quarterly report")
    assert matches_text(view, "BODY", "revenue grew")
    assert matches_text(view, "text", "REVENUE GREW")


def test_decoding_is_applied_before_matching():
    views = _views()
    assert matches_text(views[2], "BODY", "montag")  # soft line break joined
    assert not matches_text(views[2], "BODY", "Mon=")
    assert matches_text(views[3], "BODY", "köln")  # base64, then ISO-8859-1
    assert matches_text(views[2], "TEXT", "grüße aus")  # RFC 2047 subject


def test_binary_attachments_are_not_searched():
    data = (
        b"From: a@b\r\nContent-Type: multipart/mixed; boundary=X\r\n\r\n--X\r\n"
        b"Content-Type: image/png\r\n\r\nneedle-in-image\r\n--X--\r\n"
    )
    assert not matches_text(MessageView(data), "BODY", "needle-in-image")


def test_empty_needle_matches_everything_and_other_keys_are_refused():
    view = MessageView(CORPUS[5])
    assert matches_text(view, "BODY", "")
    with pytest.raises(MalformedMessage):
        matches_text(view, "SUBJECT", "x")


def test_concurrent_searches_agree():
    views = _views()
    expected = {n: {u for u, v in views.items() if matches_text(v, "TEXT", n)} for n in NEEDLES}
    fresh = _views()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for n in NEEDLES:
                got = {u for u, v in fresh.items() if matches_text(v, "TEXT", n)}
                assert got == expected[n]
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.text(max_size=10), st.sampled_from(["BODY", "TEXT"]))
def test_fuzz_search_never_raises(data, needle, key):
    try:
        view = MessageView(data)
    except MalformedMessage:
        return
    assert isinstance(matches_text(view, key, needle), bool)
    header, body = searchable_text(view)
    assert isinstance(header, str) and isinstance(body, str)


def test_hostile_charsets_and_encoded_words_do_not_crash():
    # found by fuzzing: 8-bit bytes in a charset name and in an encoded word's charset
    data = (
        b"Subject: =?ut\xab\xa8f-8?q?x=C3=A4?=\r\nContent-Type: text/plain; charset=utf-8\xb2Y"
        b"\r\n\r\nbody words\r\n"
    )
    view = MessageView(data)
    assert matches_text(view, "BODY", "body words")
    assert matches_text(view, "TEXT", "subject")
    assert not matches_text(view, "TEXT", "absent")
