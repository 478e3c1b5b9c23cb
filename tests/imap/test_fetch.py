"""Pure pieces of the intercepts: FETCH items and rewriting, SEARCH keys, APPEND args."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smimeproxy.errors import MalformedMessage
from smimeproxy.imap import fetch
from smimeproxy.imap.intercept import _append_parts, decode_mailbox, in_uid_set
from smimeproxy.imap.searchkeys import _rewrite, text_keys
from smimeproxy.imap.views import MessageView
from smimeproxy.imap.wire import Atom, Message, String, encode_token, tokenize

DECRYPTED = (
    b"From: a@b.test\r\nSubject: hi\r\nContent-Type: text/plain\r\n\r\nsecret words here\r\n"
)


def items(text: bytes) -> list[fetch.ContentItem]:
    tokens = tokenize(Message([text + b"\r\n"]))
    return fetch.parse_items(tokens[0] if isinstance(tokens[0], list) else tokens)[1]


def test_content_items_and_macros() -> None:
    got = items(b"FULL BODY.PEEK[1.MIME]<10.20> BINARY.SIZE[1] UID ENVELOPE RFC822")
    assert [i.kind for i in got] == [b"RFC822.SIZE", b"BODY", b"BODY[", b"BINARY.SIZE[", b"RFC822"]
    peek = got[2]
    assert (peek.section, peek.origin, peek.length, peek.peek) == (b"1.MIME", 10, 20, True)
    assert peek.response_name() == b"BODY[1.MIME]<10>"
    assert not peek.sets_seen and got[4].sets_seen
    assert items(b"FLAGS INTERNALDATE") == []


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data", True),
        (b"Content-Type: application/x-pkcs7-mime;\r\n name=smime.p7m", True),
        (b"Content-Type: application/pkcs7-mime; smime-type=certs-only", False),
        (b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"', False),
        (b"Content-Type: text/plain", False),
        (b"", False),
    ],
)
def test_is_smime(header: bytes, expected: bool) -> None:
    assert fetch.is_smime(header) is expected


def test_fetch_items_copy_server_values_verbatim() -> None:
    data = (
        b'* 3 FETCH (UID 9 FLAGS (\\Seen) ENVELOPE ("d" {3}\r\nx)y NIL) '
        b'BODY[] {5}\r\nhello INTERNALDATE "01-Jan-2024 00:00:00 +0000")\r\n'
    )
    seq, pairs = fetch.fetch_items(data)
    assert seq == b"3"
    assert [n for n, _ in pairs] == [b"UID", b"FLAGS", b"ENVELOPE", b"BODY[]", b"INTERNALDATE"]
    assert dict(pairs)[b"ENVELOPE"] == b'("d" {3}\r\nx)y NIL)'
    with pytest.raises(MalformedMessage):
        fetch.fetch_items(b"* 3 FETCH (UID 9 FLAGS (\\Seen\r\n")


def test_rewrite_response_keeps_server_items_and_answers_content() -> None:
    view = MessageView(DECRYPTED)
    ciphertext = b"MIAGCSqGSIb3DQEHA6CAMIACAQAxggE="
    server = Message(
        [
            b"* 1 FETCH (UID 4 MODSEQ (12) BODY[] {%d}\r\n" % len(ciphertext),
            b" RFC822.SIZE 9999)\r\n",
        ],
        [ciphertext],
    )
    wanted = items(b"(UID BODY.PEEK[]<0.4> BODY.PEEK[TEXT] RFC822.SIZE)")
    out = fetch.rewrite_response(server, view, wanted)
    assert out.startswith(b"* 1 FETCH (UID 4 MODSEQ (12) BODY[]<0> {4}\r\nFrom BODY[TEXT] ")
    assert b"secret words here" in out and ciphertext not in out
    assert out.endswith(b"RFC822.SIZE %d)\r\n" % len(DECRYPTED))
    # what the client receives parses as IMAP
    lines = out.split(b"{4}\r\n")
    assert lines[0].endswith(b"BODY[]<0> ")


def test_search_keys_with_arguments_are_not_mistaken_for_body() -> None:
    tokens = tokenize(Message([b'SUBJECT BODY TEXT "x" OR BODY a HEADER X-Y b\r\n']))
    assert text_keys(tokens) == [2, 5]
    assert text_keys(tokenize(Message([b"X-UNKNOWN-KEY 1\r\n"]))) is None


def test_search_rewrite_splits_body_between_proxy_and_server() -> None:
    tokens = tokenize(Message([b"NOT BODY secret UNSEEN\r\n"]))
    views = {7: MessageView(DECRYPTED), 8: MessageView(b"Subject: x\r\n\r\nnothing\r\n")}
    out = b" ".join(encode_token(t) for t in _rewrite(tokens, views, "utf-8"))
    assert out == b"NOT (OR UID 7 (BODY secret NOT UID 7,8)) UNSEEN"


def test_uid_sets() -> None:
    assert in_uid_set(b"1:3,9:*", {2, 5, 9, 12}, 12) == {2, 9, 12}
    assert in_uid_set(b"*", {5, 12}, 12) == {12}
    assert in_uid_set(b"$", {5}, 12) == {5}


def test_mailbox_names() -> None:
    assert decode_mailbox(b"Entw&APw-rfe") == "Entwürfe"
    assert decode_mailbox(b"inbox") == "INBOX"
    assert decode_mailbox(b"A&-B") == "A&B"


def test_append_arguments() -> None:
    tokens = tokenize(
        Message(
            [b'a APPEND Sent (\\Seen) "01-Jan-2024 00:00:00 +0000" {3}\r\n', b" {2}\r\n", b"\r\n"],
            [b"abc", b"de"],
        )
    )
    mailbox, parts = _append_parts(tokens)
    assert mailbox == b"Sent"
    assert parts == [([b"(\\Seen)", b'"01-Jan-2024 00:00:00 +0000"'], b"abc"), ([], b"de")]
    with pytest.raises(MalformedMessage):
        _append_parts([Atom(b"a"), Atom(b"APPEND"), String(b"Sent")])


_values = st.recursive(
    st.one_of(
        st.sampled_from([b"NIL", b"42", b"\\Seen"]).map(Atom),
        st.binary(max_size=12).map(String),  # quoted, or a literal when it must be
    ),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_values, min_size=1, max_size=5))
def test_fetch_items_agrees_with_the_tokenizer(values: list) -> None:  # type: ignore[type-arg]
    """The structural scan cuts a response where a full tokenization does."""
    names = [b"X%d" % i for i in range(len(values))]
    body = b" ".join(n + b" " + encode_token(v) for n, v in zip(names, values, strict=True))
    seq, pairs = fetch.fetch_items(b"* 7 FETCH (" + body + b")\r\n")
    assert seq == b"7" and [n for n, _ in pairs] == names
    for (_name, raw), value in zip(pairs, values, strict=True):
        assert raw == encode_token(value)


def test_rewrite_memo_answers_identical_lines_and_never_stale_ones() -> None:
    from smimeproxy.imap.intercept import FetchRewrite

    view = MessageView(DECRYPTED)
    wanted = items(b"(FLAGS RFC822.SIZE BODYSTRUCTURE)")
    asked = frozenset({b"RFC822.SIZE", b"BODYSTRUCTURE"})

    def render(message: Message) -> bytes:  # one FETCH command each (a re-sync)
        return FetchRewrite({4: view}, {}, wanted, asked).render(message)

    seen = Message([b"* 1 FETCH (UID 4 FLAGS (\\Seen) RFC822.SIZE 9999 BODYSTRUCTURE NIL)\r\n"])
    first = render(seen)
    assert b"FLAGS (\\Seen)" in first and b"RFC822.SIZE %d" % len(DECRYPTED) in first
    assert render(seen) == first and len(view.rendered) == 1
    flagged = Message(
        [b"* 1 FETCH (UID 4 FLAGS (\\Flagged) RFC822.SIZE 9999 BODYSTRUCTURE NIL)\r\n"]
    )
    assert b"FLAGS (\\Flagged)" in render(flagged)  # the server's items stay live


def test_rewrite_memo_keeps_no_copies_of_content() -> None:
    from smimeproxy.imap.intercept import FetchRewrite

    view = MessageView(DECRYPTED + b"x" * 20000 + b"\r\n")
    rewrite = FetchRewrite({4: view}, {}, items(b"(BODY.PEEK[])"))
    assert b"x" * 20000 in rewrite.render(Message([b"* 1 FETCH (UID 4)\r\n"]))
    assert view.rendered == {}


def _response(seq: int, uid: int, section: bytes, value: bytes) -> Message:
    return Message(
        [b"* %d FETCH (UID %d BODY[%s] {%d}\r\n" % (seq, uid, section, len(value)), b")\r\n"],
        [value],
    )


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 10**9),
    st.integers(1, 10**9),
    st.sampled_from([b"", b"HEADER.FIELDS (CONTENT-TYPE)", b"1.MIME", b"TEXT"]),
    st.binary(max_size=200),
)
def test_the_quick_reading_of_a_fetch_response_agrees_with_the_tokenizer(seq, uid, section, value):
    """The proxy's own queries' answers are read by a regular expression when they have
    the usual shape: it must find what the general tokenizer finds."""
    from smimeproxy.imap.intercept import _pairs, _simple_response, _uid_and_body

    message = _response(seq, uid, section, value)
    assert _simple_response(message) == (seq, uid, value)
    pairs = _pairs(message)
    assert (int(bytes(pairs[b"*SEQ"])), int(bytes(pairs[b"UID"])), bytes(pairs[b"BODY["])) == (
        seq,
        uid,
        value,
    )
    assert _uid_and_body(message) == (uid, value)


@pytest.mark.parametrize(
    ("message", "body"),
    [
        (Message([b"* 1 FETCH (BODY[] {3}\r\n", b" UID 7)\r\n"], [b"abc"]), b"abc"),  # UID after
        (Message([b"* 1 FETCH (UID 7 BODY[] {4}\r\n", b")\r\n"], [b"abc"]), b"abc"),  # length
        (Message([b"* 1 FETCH (UID 7 BODY[] ~{3}\r\n", b")\r\n"], [b"abc"]), b"abc"),  # literal8
        (Message([b"* 1 FETCH (UID 7 BODY[] NIL)\r\n"], []), None),
        (Message([b"* 1 fetch (uid 7 body[] {3}\r\n", b")\r\n"], [b"abc"]), b"abc"),
        (Message([b"* 1 FETCH (FLAGS () UID 7)\r\n"], []), None),
    ],
)
def test_other_shapes_take_the_tokenizer(message, body):
    from smimeproxy.imap.intercept import _simple_response, _uid_and_body

    assert _simple_response(message) is None
    assert _uid_and_body(message) == (7, body)


@pytest.mark.parametrize("line", [b"* 3 FETCH (UID 70)\r\n", b"* 3 FETCH (FLAGS () UID 70)\r\n"])
def test_a_uid_alone_is_read_alike_both_ways(line):
    """``* n FETCH (UID u)`` (the answer to ``UID FETCH * (UID)``) takes the quick
    reading; with more items the tokenizer; both give sequence number and UID."""
    from smimeproxy.imap.intercept import _seq_uid_section

    assert _seq_uid_section(Message([line], [])) == (3, 70, None)
