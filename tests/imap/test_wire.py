"""The sans-I/O IMAP codec: splitting, literals of every kind, tokens, fuzz."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smimeproxy.errors import MalformedMessage
from smimeproxy.imap.wire import (
    Assembler,
    Atom,
    Fragment,
    LineTooLong,
    LiteralData,
    LiteralHeader,
    Message,
    Splitter,
    String,
    build_message,
    literal_header,
    tokenize,
)


def assemble(data: bytes, chunk: int = 0, max_size: int = 1 << 20) -> list[Message]:
    splitter, assembler = Splitter(), Assembler(max_size)
    out = []
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
    for piece in pieces:
        for event in splitter.feed(piece):
            message = assembler.add(event)
            if message is not None:
                out.append(message)
    return out


def test_literal_headers_of_every_kind() -> None:
    assert literal_header(b"a APPEND x {5}\r\n") == LiteralHeader(5)
    assert literal_header(b"a APPEND x {5+}\r\n") == LiteralHeader(5, nonsync=True)
    assert literal_header(b"a APPEND x ~{5}\r\n") == LiteralHeader(5, binary=True)
    assert literal_header(b'a SELECT "x{5}"\r\n') is None
    assert literal_header(b"a NOOP\r\n") is None


def test_fetch_response_with_literals_streams_in_chunks() -> None:
    body = b"Subject: hi\r\n\r\n" + b"x" * 5000 + b"\r\n"
    data = b"* 1 FETCH (UID 7 BODY[] {%d}\r\n" % len(body) + body + b" FLAGS (\\Seen))\r\n"
    splitter = Splitter(max_line=100)
    events = []
    for i in range(0, len(data), 7):
        events.extend(splitter.feed(data[i : i + 7]))
    literal_chunks = [e for e in events if isinstance(e, LiteralData)]
    assert b"".join(e.data for e in literal_chunks) == body
    assert max(len(e.data) for e in literal_chunks) <= 7  # never buffered whole
    assert literal_chunks[-1].end and not any(e.end for e in literal_chunks[:-1])
    fragments = [e for e in events if isinstance(e, Fragment)]
    assert [f.first for f in fragments] == [True, False]
    assert splitter.at_boundary


@pytest.mark.parametrize("chunk", [0, 1, 3, 64])
def test_assembled_tokens(chunk: int) -> None:
    data = (
        b'a1 UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.100> "q\\"x")\r\n'
        b"a2 LOGIN {5+}\r\nalice {3}\r\npw!\r\n"
    )
    first, second = assemble(data, chunk)
    tokens = tokenize(first)
    assert tokens[:4] == [b"a1", b"UID", b"FETCH", b"1:*"]
    assert tokens[4] == [b"FLAGS", b"BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.100>", b'q"x']
    assert isinstance(tokens[4][0], Atom) and isinstance(tokens[4][2], String)
    assert tokenize(second) == [b"a2", b"LOGIN", b"alice", b"pw!"]
    assert second.encode() == data[len(first.encode()) :]


def test_zero_length_literal() -> None:
    (message,) = assemble(b"a APPEND x {0}\r\n\r\n")
    assert message.literals == [b""]
    assert tokenize(message)[-1] == b""


def test_line_too_long_is_reported_and_skipped() -> None:
    splitter = Splitter(max_line=16)
    events = splitter.feed(b"a" * 40 + b"\r\nb NOOP\r\n")
    assert isinstance(events[0], LineTooLong)
    assert events[1] == Fragment(b"b NOOP\r\n", True, None)


def test_assembler_bounds_messages() -> None:
    with pytest.raises(MalformedMessage):
        assemble(b"a APPEND x {100}\r\n" + b"y" * 100 + b"\r\n", max_size=50)


def test_build_message_roundtrip() -> None:
    message = build_message(b"t SEARCH ", [Atom(b"BODY"), String("grüße".encode()), [Atom(b"ALL")]])
    assert message.literals == ["grüße".encode()]
    assert tokenize(message) == [b"t", b"SEARCH", b"BODY", "grüße".encode(), [b"ALL"]]


@pytest.mark.parametrize("bad", [b"a (unbalanced\r\n", b'a "open\r\n', b"a x)\r\n", b"a {5}\r\n"])
def test_tokenize_errors_are_typed(bad: bytes) -> None:
    with pytest.raises(MalformedMessage):
        tokenize(Message([bad]))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=50))
def test_fuzz_split_assemble_tokenize(data: bytes, chunk: int) -> None:
    """Arbitrary bytes in arbitrary chunks: only MalformedMessage ever escapes, and the
    literal octets plus lines add up to what was fed (minus skipped long lines)."""
    splitter, assembler = Splitter(max_line=64), Assembler(1000)
    seen = 0
    for i in range(0, len(data), chunk):
        for event in splitter.feed(data[i : i + chunk]):
            if not isinstance(event, LineTooLong):
                seen += len(event.data)
            try:
                message = assembler.add(event)
            except MalformedMessage:
                continue
            if message is not None:
                try:
                    tokenize(message)
                except MalformedMessage:
                    pass
    assert seen <= len(data)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(min_size=0, max_size=30).map(lambda b: String(b)),
            st.from_regex(rb"\A[A-Za-z0-9.\\:*]{1,10}\Z").map(Atom),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_fuzz_build_then_tokenize_roundtrip(tokens: list) -> None:
    message = build_message(b"t X ", tokens)
    wire = message.encode()
    (again,) = assemble(wire, chunk=5)
    assert tokenize(again)[2:] == tokens
