"""The wire codec: where commands and messages end, and nothing can be smuggled."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smimeproxy.smtp.codec import (
    MAX_COMMAND_LINE,
    BadLine,
    Command,
    DataChunk,
    DataEnd,
    Response,
    ServerCodec,
)


def _content(events) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataChunk))


def _in_data(codec: ServerCodec, data: bytes, step: int | None = None) -> list:
    assert codec.feed(b"DATA\r\n") == [Command("DATA", "")]
    codec.start_data()
    if step is None:
        return codec.feed(data)
    events = []
    for i in range(0, len(data), step):
        events += codec.feed(data[i : i + step])
    return events


def test_commands_split_on_crlf_and_verbs_upper_cased():
    codec = ServerCodec()
    assert codec.feed(b"ehlo client.test\r\nMAIL FROM:<a@b.test> SIZE=10\r\nNO") == [
        Command("EHLO", "client.test"),
        Command("MAIL", "FROM:<a@b.test> SIZE=10"),
    ]
    assert codec.feed(b"OP\r\n") == [Command("NOOP", "")]


@pytest.mark.parametrize(
    "line",
    [b"NOOP\n", b"NO\rOP\r\n", b"NOOP\r\r\n", b"NO\x00OP\r\n", b"NOOP \xff\r\n"],
)
def test_bare_line_ends_and_odd_octets_in_commands_are_bad_lines(line):
    codec = ServerCodec()
    events = codec.feed(line + b"QUIT\r\n")
    assert isinstance(events[0], BadLine)
    assert events[1:] == [Command("QUIT", "")]


def test_over_long_command_line_reported_once_and_then_resynchronised():
    codec = ServerCodec()
    events = codec.feed(b"X" * (MAX_COMMAND_LINE * 3))
    events += codec.feed(b"Y" * 100 + b"\r\nQUIT\r\n")
    assert events == [BadLine("line too long"), Command("QUIT", "")]
    assert codec.buffered == 0


def test_commands_after_data_wait_for_the_servers_decision():
    codec = ServerCodec()
    events = codec.feed(b"DATA\r\nRSET\r\n")
    assert events == [Command("DATA", "")]
    assert codec.next_event() is None
    codec.cancel_data()
    assert codec.feed(b"") == [Command("RSET", "")]


def test_content_dot_unstuffed_and_ended_by_crlf_dot_crlf_only():
    codec = ServerCodec()
    events = _in_data(codec, b"a\r\n..b\r\n.\r\nQUIT\r\n")
    assert _content(events) == b"a\r\n.b\r\n"
    assert events[-2:] == [DataEnd(False), Command("QUIT", "")]


@pytest.mark.parametrize("step", [1, 2, 3, 5, 7, 64])
def test_content_cut_at_any_byte_gives_the_same_message(step):
    message = b"Subject: x\r\n\r\n.\r\n..\r\n...x\r\nline\r\n\r\n.\r"
    wire = message.replace(b"\r\n.", b"\r\n..") + b"\n.\r\n"
    events = _in_data(ServerCodec(), wire, step)
    assert _content(events) == message + b"\n"
    assert events[-1] == DataEnd(False)


# The end-of-data variants of the SMTP smuggling family (SEC Consult, December 2023;
# CVE-2023-51764/51765/51766) and aiosmtpd's test_smtpsmuggling.py: none of them may end
# the message, and each taints it so that the server refuses it.
SMUGGLING_ENDINGS = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r\n.\r", b"\r.\r\n", b"\n.\r"]


@pytest.mark.parametrize("ending", SMUGGLING_ENDINGS)
def test_smuggled_end_of_data_does_not_end_the_message(ending):
    smuggled = (
        b"Subject: hello\r\n\r\nfirst"
        + ending
        + b"MAIL FROM:<admin@acme.test>\r\nRCPT TO:<victim@acme.test>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nsecond\r\n.\r\n"
    )
    events = _in_data(ServerCodec(), smuggled)
    # the only end is the real one, the smuggled commands are content, and it is tainted
    assert [e for e in events if not isinstance(e, DataChunk)] == [DataEnd(True)]
    assert b"MAIL FROM" in _content(events)


@pytest.mark.parametrize("bare", [b"a\nb\r\n", b"a\rb\r\n", b"a\r\r\n"])
def test_bare_line_ends_anywhere_in_content_taint_the_message(bare):
    events = _in_data(ServerCodec(), b"x\r\n" + bare + b".\r\n")
    assert events[-1] == DataEnd(True)


def test_clean_large_content_is_passed_in_chunks_without_taint():
    body = (b"A" * 76 + b"\r\n") * 20_000
    events = _in_data(ServerCodec(), body + b".\r\n", step=65536)
    assert _content(events) == body
    assert events[-1] == DataEnd(False)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"a", b"DATA", b" "]), max_size=40
    ),
    st.integers(min_value=1, max_value=9),
)
def test_fuzz_content_never_ends_early_and_clean_input_round_trips(pieces, step):
    content = b"".join(pieces)
    stuffed = content.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    codec = ServerCodec()
    events = _in_data(codec, stuffed + b".\r\nNOOP\r\n", step)
    ends = [e for e in events if isinstance(e, DataEnd)]
    assert len(ends) == 1
    assert events[-1] == Command("NOOP", "")
    clean = b"\r" not in content.replace(b"\r\n", b"") and b"\n" not in content.replace(
        b"\r\n", b""
    )
    expected = content if content.endswith(b"\r\n") else content + b"\r\n"
    if clean:
        assert not ends[0].bare_line_end
        assert _content(events) == expected
    else:
        assert ends[0].bare_line_end


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=17))
def test_fuzz_any_bytes_only_yield_codec_events(data, step):
    codec = ServerCodec()
    for i in range(0, len(data), step):
        for event in codec.feed(data[i : i + step]):
            assert isinstance(event, Command | BadLine | DataChunk | DataEnd)
            if isinstance(event, Command) and event.verb == "DATA":
                codec.start_data()


def test_a_sasl_response_line_is_passed_as_sent():
    # after a 334 the next line is a base64 response: case and all, never a command
    codec = ServerCodec()
    assert codec.feed(b"AUTH LOGIN\r\n") == [Command("AUTH", "LOGIN")]
    codec.expect_response()
    assert codec.feed(b"YWxpY2U=\r\nyWxp Y2U\r\n") == [
        Response("YWxpY2U="),
        Command("YWXP", "Y2U"),
    ]
    codec.expect_response()
    assert codec.feed(b"*\r\n") == [Response("*")]
    # a bad line in its place ends the expectation: what follows is commands
    codec.expect_response()
    assert isinstance(codec.feed(b"a\nb\r\n")[0], BadLine)
    assert codec.feed(b"NOOP\r\n") == [Command("NOOP", "")]
    codec.expect_response()
    assert codec.feed(b"x" * 3000) == [BadLine("line too long")]
    assert codec.feed(b"\r\nNOOP\r\n") == [Command("NOOP", "")]


def test_utf8_command_lines_are_decoded_and_left_to_the_server():
    """RFC 6531 section 3.3: UTF-8 in MAIL and RCPT; the codec only checks it is UTF-8."""
    codec = ServerCodec()
    line = "RCPT TO:<用户@例子.测试> ORCPT=utf-8;用户@例子.测试\r\n".encode()
    assert codec.feed(line) == [Command("RCPT", "TO:<用户@例子.测试> ORCPT=utf-8;用户@例子.测试")]
    assert isinstance(codec.feed("MAIL FROM:<jösé@a.test>".encode("latin-1") + b"\r\n")[0], BadLine)


def test_a_sasl_response_stays_ascii():
    codec = ServerCodec()
    codec.expect_response()
    assert isinstance(codec.feed("grüße\r\n".encode())[0], BadLine)
