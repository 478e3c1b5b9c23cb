"""MessageView against a real IMAP server: the same bytes as Dovecot for every section.

The corpus below is appended to a throwaway Dovecot, then every section of every
message (every part path the parse finds, each with MIME/HEADER/TEXT, plus parts that
do not exist), BODYSTRUCTURE, BODY, BINARY, BINARY.SIZE and RFC822.SIZE are fetched with
imaplib and compared byte for byte with :class:`MessageView`. No normalisation: sizes,
structures and section bytes must be identical (a message stored with bare LF line ends
is served with CRLF by Dovecot, and MessageView converts it the same way).
"""

from __future__ import annotations

import base64
import imaplib
import quopri
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smimeproxy.errors import MalformedMessage, SMIMEProxyError
from smimeproxy.imap.views import MessageView, Part, partial

M = {
    "plain": b"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\nSubject: hi\r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@x>\r\n\r\n"
    b"Hello Bob\r\nsecond line\r\n",
    "no_trailing_crlf": b"From: a@b\r\nSubject: no trailing\r\n\r\nline one\r\nno newline at end",
    "alternative": b"From: a@b\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="XyZ"'
    b"\r\n\r\npreamble\r\n--XyZ\r\nContent-Type: text/plain; charset=UTF-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\nGr=C3=BC=C3=9Fe\r\nsoft=\r\nbreak\r\n"
    b'--XyZ\r\nContent-Type: text/html; charset="utf-8"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n'
    b"<p>Gr\xc3\xbc\xc3\x9fe</p>\r\n--XyZ--\r\nepilogue\r\n",
    "mixed_attachments": b'From: a@b\r\nTo: c@d, "Eve E." <eve@x.org>\r\nMIME-Version: 1.0\r\n'
    b'Content-Type: multipart/mixed;\r\n boundary="outer"\r\n\r\n--outer\r\n'
    b"Content-Type: text/plain"
    b'\r\n\r\nbody text\r\n--outer\r\nContent-Type: application/pdf; name="doc.pdf"\r\n'
    b'Content-Disposition: attachment; filename="doc.pdf"; size=12\r\n'
    b"Content-Transfer-Encoding: base64\r\nContent-ID: <part2@x>\r\n"
    b"Content-Description: A document\r\nContent-Language: en, de\r\n"
    b"Content-Location: http://x/doc.pdf\r\nContent-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==\r\n\r\n"
    b"SGVsbG8gV29ybGQhIFNlY3JldCBQREY=\r\n--outer\r\nContent-Type: text/csv; charset=us-ascii\r\n"
    b"Content-Disposition: attachment; filename=data.csv\r\n\r\na,b\r\n1,2\r\n--outer--\r\n",
    "nested_rfc822": b"From: a@b\r\nSubject: fwd\r\n"
    b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n"
    b"--b1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nsee attached\r\n--b1\r\n"
    b"Content-Type: message/rfc822\r\n\r\nFrom: Inner Person <inner@example.com>\r\n"
    b"To: undisclosed-recipients:;\r\nCc: grp: x@y, z@w;, solo@s\r\n"
    b"Subject: =?utf-8?q?inner_subj?=\r\nDate: Tue, 2 Jan 2024 10:00:00 +0100\r\n"
    b"Message-ID: <inner@x>\r\nIn-Reply-To: <prev@x>\r\n"
    b"Content-Type: multipart/alternative; boundary=b2\r\n\r\n--b2\r\nContent-Type: text/plain"
    b"\r\n\r\ninner plain\r\n--b2\r\nContent-Type: text/html\r\n\r\n<b>inner</b>\r\n--b2--\r\n"
    b"\r\n--b1\r\nContent-Type: message/rfc822\r\n\r\nSubject: simple inner\r\n\r\nsimple body\r\n"
    b"--b1--\r\n",
    "top_level_rfc822": b"From: a@b\r\nContent-Type: message/rfc822\r\n\r\nFrom: x@y\r\n"
    b"Subject: enc\r\n\r\ninner text\r\n",
    "base64_text": b"From: a@b\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nR3L832UgYXVzIEv2bG4K\r\n",
    "unknown_cte": b"From: a@b\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 f\r\nend\r\n",
    "odd_case": b'From: a@b\r\nContent-Type: TEXT/Plain; CHARSET="US-ASCII"; format=flowed; '
    b"delsp=yes\r\nContent-Transfer-Encoding: 7BIT\r\nContent-Disposition: INLINE\r\n\r\nodd\r\n",
    "unclosed_multipart": b"From: a@b\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n"
    b"--zz\r\nContent-Type: text/plain\r\n\r\npart one\r\n--zz\r\n\r\npart two no headers\r\n",
    "empty_body": b"Subject: empty\r\n\r\n",
    "header_only": b"Subject: header only\r\nFrom: a@b\r\n",
    "rfc2231": b'From: a@b\r\nContent-Type: multipart/mixed; boundary="q"\r\n\r\n--q\r\n'
    b"Content-Type: application/octet-stream; name*=utf-8''%C3%A4.bin\r\n"
    b'Content-Disposition: attachment; filename*0="long"; filename*1="name.bin"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\nAAEC\r\n--q--\r\n",
    "lf_only": b"From: a@b\nSubject: lf\nContent-Type: multipart/mixed; boundary=L\n\n--L\n"
    b"Content-Type: text/plain\n\nline\n--L\nContent-Type: text/plain\n"
    b"Content-Transfer-Encoding: quoted-printable\n\nqp=3D\nx=\ny\n--L--\n",
    "qp_invalid": b"From: a@b\r\nContent-Type: text/plain; format=flowed\r\n"
    b"Content-Transfer-Encoding: Quoted-Printable\r\n\r\ntrailing   \r\nend=3D\r\nsoft=\r\n"
    b"=41=42 =zz =\r\n\r\nlast",
    "qp_edge": b"From: a@b\r\nContent-Type: text/plain\r\n"
    b"Content-Transfer-Encoding: quoted-printable"
    b"\r\n\r\ntrailing \t \r\nend=3D\r\nsoft=  \r\n=41=42=\r\n=0D=0A=3d\r\n\r\nlast",
    "base64_junk": b"From: a@b\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nAA!E C\r\n==\r\n",
    "base64_spaces": b"From: a@b\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nAAE C\tQUJD\r\nRA==\r\n\r\n",
    "base64_attachment": b"From: a@b\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
    b"Content-Type: image/png\r\nContent-Transfer-Encoding: BASE64\r\n\r\n"
    b"iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk\r\n"
    b"+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==\r\n\r\n--B--\r\n",
    "digest": b"From: a@b\r\nContent-Type: multipart/digest; boundary=D\r\n\r\n--D\r\n\r\n"
    b"Subject: one\r\nFrom: one@x\r\n\r\nfirst\r\n--D\r\nContent-Type: text/plain\r\n\r\n"
    b"not a message\r\n--D--\r\n",
    "multipart_no_boundary": b"From: a@b\r\nContent-Type: multipart/mixed\r\n\r\nno parts\r\n",
    "multipart_no_delimiters": b"From: a@b\r\nContent-Type: multipart/mixed; boundary=nothere"
    b"\r\n\r\njust text\r\n",
    "bad_content_type": b"From: a@b\r\nContent-Type: garbage\r\n\r\nbody\r\n",
    "quoted_params": b'From: a@b\r\nContent-Type: text/plain; name="a;b \\"c\\".txt" (comm;ent);'
    b' charset=utf-8\r\nContent-Disposition: inline; filename="x y.txt"\r\n\r\n8bit \xc3\xa4\r\n',
    "addresses": b"From: a@b\r\nContent-Type: message/rfc822\r\n\r\nFrom: bare\r\n"
    b'To: a@b (Comment N), "Quoted, Name" <q@x>\r\nReply-To: =?utf-8?q?J=C3=B6rg?= <j@x>\r\n'
    b"Sender: <@r1,@r2:u@h>\r\nBcc: undisclosed-recipients:;\r\nSubject:  folded\r\n subject\r\n"
    b"\r\nbody\r\n",
    "deep": b"From: a@b\r\nContent-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\n"
    b"Content-Type: message/rfc822\r\n\r\nSubject: l1\r\nContent-Type: message/rfc822\r\n\r\n"
    b'Subject: l2\r\nContent-Type: multipart/related; boundary=r; type="text/html"\r\n\r\n'
    b"--r\r\nContent-Type: text/html\r\n\r\n<img>\r\n--r\r\nContent-Type: image/gif\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"Content-Disposition: inline; filename*=utf-8''%E2%82%AC.gif"
    b"\r\n\r\nR0lGODlh\r\n--r--\r\n--o\r\n\r\n--o--\r\n",
}


def _part_paths(part: Part, prefix: str = "", depth: int = 0) -> list[str]:
    """Every part number the structure has, plus one that does not exist per level."""
    paths: list[str] = []
    if part.is_multipart:
        kids = part.children
        for i, child in enumerate(kids, 1):
            p = f"{prefix}{i}"
            paths.append(p)
            if child.message is not None:
                paths += _part_paths(child.message, p + ".", depth + 1)
            elif child.is_multipart:
                paths += _part_paths(child, p + ".", depth + 1)
            else:
                paths.append(p + ".1")
        paths.append(f"{prefix}{len(kids) + 1}")
    else:
        paths += [f"{prefix}1", f"{prefix}2", f"{prefix}1.1"]
        if part.message is not None:
            paths += _part_paths(part.message, f"{prefix}1.", depth + 1)
    return paths


def _sections(view: MessageView) -> list[str]:
    out = ["", "HEADER", "TEXT", "HEADER.FIELDS (SUBJECT FROM X-NONE)", "HEADER.FIELDS.NOT (FROM)"]
    out.append('HEADER.FIELDS ("Subject" content-TYPE)')
    for p in _part_paths(view.root):
        out += [p, f"{p}.MIME", f"{p}.HEADER", f"{p}.TEXT", f"{p}.HEADER.FIELDS (SUBJECT)"]
    return list(dict.fromkeys(out))


def _fetch(conn: imaplib.IMAP4, seq: int, item: str) -> bytes:
    """One FETCH item's value as sent: a literal's content, else its wire text."""
    conn.untagged_responses.pop("FETCH", None)  # left over from a refused FETCH
    typ, data = conn.fetch(str(seq), f"({item})")
    assert typ == "OK", (item, data)
    wire = b"".join(e[0] + b"\r\n" + e[1] if isinstance(e, tuple) else e for e in data)
    m = re.match(rb"\d+ \((?:[A-Z0-9.]+(?:\[[^\]]*\])?(?:<\d+>)?) (.*)\)$", wire, re.S)
    assert m, wire
    value = m.group(1)
    lit = re.match(rb"~?\{(\d+)\}\r\n", value)
    if lit and len(value) == lit.end() + int(lit.group(1)):
        return value[lit.end() :]
    return value


def _refusal(conn: imaplib.IMAP4, seq: int, item: str) -> bytes:
    """The text of a NO answer to FETCH (fails if the server answered OK)."""
    conn.untagged_responses.pop("FETCH", None)
    typ, data = conn.fetch(str(seq), f"({item})")
    assert typ == "NO", (item, data)
    return data[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.integration.dovecot import start_dovecot

    running = start_dovecot(tmp_path_factory.mktemp("views"), {"viewer": "pw"})
    try:
        yield running
    finally:
        running.stop()
        if running.process.stderr is not None:  # the fixture leaves its pipe open
            running.process.stderr.close()


def _mailbox(server, name: str, messages: list[bytes]):
    conn = imaplib.IMAP4(server.host, server.port)
    conn.login("viewer", "pw")
    if name != "INBOX":
        assert conn.create(name)[0] == "OK"
    for data in messages:
        typ, _ = conn.append(name, None, None, data)
        assert typ == "OK"
    typ, count = conn.select(name, readonly=True)
    assert int(count[0]) == len(messages)
    return conn


@pytest.fixture(scope="module")
def dovecot(server):
    conn = _mailbox(server, "INBOX", list(M.values()))
    yield conn
    conn.logout()


@pytest.mark.parametrize("name", list(M))
def test_same_structure_and_sizes_as_dovecot(dovecot, name):
    seq = list(M).index(name) + 1
    view = MessageView(M[name])
    assert _fetch(dovecot, seq, "RFC822.SIZE") == b"%d" % view.size
    assert _fetch(dovecot, seq, "BODYSTRUCTURE") == view.bodystructure(extended=True)
    assert _fetch(dovecot, seq, "BODY") == view.bodystructure(extended=False)


@pytest.mark.parametrize("name", list(M))
def test_same_sections_as_dovecot(dovecot, name):
    seq = list(M).index(name) + 1
    view = MessageView(M[name])
    mismatches = []
    for spec in _sections(view):
        theirs = _fetch(dovecot, seq, f"BODY.PEEK[{spec}]")
        if theirs != view.section(spec):
            mismatches.append((spec, theirs, view.section(spec)))
    assert mismatches == []


@pytest.mark.parametrize("name", list(M))
def test_same_binary_as_dovecot(dovecot, name):
    seq = list(M).index(name) + 1
    view = MessageView(M[name])
    specs = [""] + [p for p in _part_paths(view.root)]
    mismatches = []
    for spec in specs:
        try:
            ours = view.binary(spec)
        except MalformedMessage:
            assert b"[PARSE]" in _refusal(dovecot, seq, f"BINARY.PEEK[{spec}]")
            continue
        if ours is None:
            assert b"[UNKNOWN-CTE]" in _refusal(dovecot, seq, f"BINARY.PEEK[{spec}]")
            assert b"[UNKNOWN-CTE]" in _refusal(dovecot, seq, f"BINARY.SIZE[{spec}]")
            assert view.binary_size(spec) is None
            continue
        theirs = _fetch(dovecot, seq, f"BINARY.PEEK[{spec}]")
        size = _fetch(dovecot, seq, f"BINARY.SIZE[{spec}]")
        if theirs != ours or size != b"%d" % view.binary_size(spec):
            mismatches.append((spec, theirs, ours, size))
    assert mismatches == []


def test_partials_match_dovecot(dovecot):
    seq = list(M).index("nested_rfc822") + 1
    view = MessageView(M["nested_rfc822"])
    for spec, origin, length in [("", 0, 10), ("", 5, 1000), ("2", 40, 17), ("2.1", 500, 3)]:
        theirs = _fetch(dovecot, seq, f"BODY.PEEK[{spec}]<{origin}.{length}>")
        assert theirs == partial(view.section(spec), origin, length)


# -- without a server --------------------------------------------------------------------


def test_part_one_of_a_single_part_message_is_its_body():
    view = MessageView(M["plain"])
    assert view.section("1") == b"Hello Bob\r\nsecond line\r\n"
    assert view.section("TEXT") == view.section("1")
    assert view.section("HEADER").endswith(b"<1@x>\r\n\r\n")
    assert view.section("2") == b""
    assert view.size == len(M["plain"])


def test_header_fields_keep_order_and_add_the_blank_line():
    view = MessageView(M["plain"])
    assert view.header_fields(["subject", "TO"]) == b"To: bob@example.org\r\nSubject: hi\r\n\r\n"
    assert view.section("HEADER.FIELDS (Subject To)") == view.header_fields(["to", "subject"])
    not_from = view.header_fields(["from", "to", "date", "message-id"], negate=True)
    assert not_from == b"Subject: hi\r\n\r\n"


def test_header_field_names_may_be_quoted_strings():
    view = MessageView(M["plain"])
    assert view.section('HEADER.FIELDS ("Subject" TO)') == view.header_fields(["subject", "to"])


def test_nested_message_sections():
    view = MessageView(M["nested_rfc822"])
    assert view.section("2.1") == b"inner plain"
    assert view.section("2.HEADER").startswith(b"From: Inner Person")
    assert view.section("2.TEXT").startswith(b"--b2\r\n")
    assert view.section("2.MIME") == b"Content-Type: message/rfc822\r\n\r\n"
    assert view.section("3.1") == b"simple body"
    assert view.section("1.HEADER") == b""  # HEADER of a part that is no message


def test_binary_removes_transfer_encodings():
    assert MessageView(M["base64_text"]).binary("1") == "Grüße aus Köln\n".encode("latin-1")
    assert MessageView(M["alternative"]).binary("1") == "Grüße\r\nsoftbreak".encode()
    assert MessageView(M["unknown_cte"]).binary("1") is None
    assert MessageView(M["unknown_cte"]).binary_size("1") is None
    with pytest.raises(MalformedMessage):
        MessageView(M["plain"]).binary("HEADER")


def test_bare_lf_becomes_crlf():
    view = MessageView(M["lf_only"])
    assert b"\n" not in view.data.replace(b"\r\n", b"")
    assert view.size == len(M["lf_only"]) + M["lf_only"].count(b"\n")
    assert view.section("1") == b"line"
    assert view.binary("2") == b"qp=\r\nxy"


def test_unpadded_base64_is_decoded():
    # Dovecot 2.3 fails the whole FETCH ("internal error") here; we decode what is there.
    data = b"Content-Transfer-Encoding: base64\r\n\r\nQUJDRA\r\n"
    assert MessageView(data).binary("1") == b"ABCD"
    assert MessageView(data).binary_size("1") == 4


def test_invalid_section_syntax_is_a_typed_error():
    view = MessageView(M["plain"])
    for spec in ["MIME", "0", "1..2", "HEADER.FIELDS", "HEADER.FIELDS ()", "BOGUS", "1.X"]:
        with pytest.raises(MalformedMessage):
            view.section(spec)


def test_partial_bounds():
    assert partial(b"abcdef", 2, 3) == b"cde"
    assert partial(b"abcdef", 4, 10) == b"ef"
    assert partial(b"abcdef", 10, 1) == b""
    assert partial(b"abcdef", 1, None) == b"bcdef"
    assert partial(b"abcdef", 0, 0) == b""


def test_structure_strings_with_8bit_or_line_breaks_become_literals():
    data = b'From: a@b\r\nContent-Type: text/plain; name="\xc3\xa4.txt"\r\n\r\nx\r\n'
    structure = MessageView(data).bodystructure()
    assert b'("name" {6}\r\n\xc3\xa4.txt "charset" "us-ascii")' in structure


# -- hypothesis: arbitrary and mutated input -----------------------------------------------

_SPECS = [
    "",
    "HEADER",
    "TEXT",
    "1",
    "1.MIME",
    "2",
    "2.1",
    "2.HEADER",
    "1.1.TEXT",
    "3.1.MIME",
    "HEADER.FIELDS (FROM)",
    "2.HEADER.FIELDS.NOT (TO)",
]


def _exercise(data: bytes) -> None:
    try:
        view = MessageView(data)
    except SMIMEProxyError:
        return
    assert view.size == len(view.data) == len(data) + data.count(b"\n") - data.count(b"\r\n")
    view.bodystructure(True)
    view.bodystructure(False)
    for spec in _SPECS:
        content = view.section(spec)
        assert len(content) <= view.size + 2  # HEADER.FIELDS may add one CRLF
        try:
            binary = (
                view.binary(spec)
                if "H" not in spec and "T" not in spec and "M" not in spec
                else b""
            )
        except SMIMEProxyError:
            continue
        assert binary is None or isinstance(binary, bytes)


_fragments = st.sampled_from(
    [
        b"\r\n",
        b"\n",
        b"--b\r\n",
        b"--b--\r\n",
        b"Content-Type: multipart/mixed; boundary=b\r\n",
        b"Content-Type: message/rfc822\r\n",
        b"Content-Transfer-Encoding: base64\r\n",
        b"Content-Transfer-Encoding: quoted-printable\r\n",
        b"Subject: x\r\n",
        b": \r\n",
        b"=\r\n",
        b"=4",
        b"\x00",
        b"\xff",
        b" folded\r\n",
        b"Content-Type: text/plain; a*0*=x; a*2=y\r\n",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_fragments | st.binary(max_size=20), max_size=40))
def test_fuzz_assembled_messages_only_raise_our_errors(pieces):
    _exercise(b"".join(pieces))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(M)), st.integers(0, 10_000), st.binary(max_size=8), st.integers(0, 8))
def test_fuzz_mutated_corpus_only_raises_our_errors(name, where, insert, cut):
    data = M[name]
    at = where % (len(data) + 1)
    _exercise(data[:at] + insert + data[at + cut :])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(-5, 400), st.one_of(st.none(), st.integers(-5, 400)))
def test_fuzz_partials_never_exceed_the_data(data, origin, length):
    out = partial(data, origin, length)
    assert len(out) <= len(data)
    if length is not None:
        assert len(out) <= max(length, 0)
    assert out in data


# -- generated messages against Dovecot ------------------------------------------------------


def _generated_leaf(r: random.Random, depth: int) -> tuple[list[str], bytes]:
    kind = r.choice(["text", "text", "html", "bin", "rfc822" if depth < 3 else "text", "none"])
    hdr: list[str] = []
    if kind == "bin":
        hdr.append(
            r.choice(
                [
                    'Content-Type: application/octet-stream; name="f.bin"',
                    "Content-Type: image/png",
                    "Content-Type: application/pdf",
                ]
            )
        )
        hdr.append("Content-Transfer-Encoding: base64")
        if r.random() < 0.5:
            hdr.append(
                r.choice(
                    [
                        'Content-Disposition: attachment; filename="f.bin"',
                        "Content-Disposition: inline",
                        "Content-Disposition: attachment;\r\n"
                        "\tfilename*=utf-8''%E2%82%AC.bin; size=3",
                    ]
                )
            )
        raw = bytes(r.randrange(256) for _ in range(r.randrange(1, 80)))
        return hdr, base64.encodebytes(raw).replace(b"\n", b"\r\n")
    if kind == "rfc822":
        return ["Content-Type: message/rfc822"], _generated_message(r, depth + 1)
    text = r.choice([b"hello world\r\nline two\r\n", b"no eol", "Grüße\r\n".encode(), b"\r\n\r\n"])
    if kind == "text":
        charset = r.choice([None, "utf-8", "ISO-8859-1", '"us-ascii"', "US-ASCII"])
        ctype = r.choice(["text/plain", "Text/Plain", "text/calendar", "TEXT/PLAIN"])
        params = "" if charset is None else f"; charset={charset}"
        if r.random() < 0.3:
            params += '; format=flowed; name="a b.txt"'
        hdr.append(f"Content-Type: {ctype}{params}")
    elif kind == "html":
        hdr.append("Content-Type: text/html;\r\n charset=utf-8")
        text = b"<p>x</p>\r\n"
    cte = r.choice([None, "7bit", "7BIT", "8bit", "quoted-printable", "base64"])
    body = text
    if cte == "quoted-printable":
        body = quopri.encodestring(text.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")
    elif cte == "base64":
        body = base64.encodebytes(text).replace(b"\n", b"\r\n")
    if cte:
        hdr.append(f"Content-Transfer-Encoding: {cte}")
    for chance, field in [
        (0.2, f"Content-ID: <id{r.randrange(100)}@x>"),
        (0.2, "Content-Description: some desc"),
        (0.1, "Content-Language: en"),
        (0.1, "Content-Disposition: inline"),
        (0.1, "Content-Location: http://x/y"),
    ]:
        if r.random() < chance:
            hdr.append(field)
    return hdr, body


def _generated_entity(r: random.Random, depth: int) -> tuple[list[str], bytes]:
    if depth >= 3 or r.random() >= 0.4:
        return _generated_leaf(r, depth)
    sub = r.choice(["mixed", "alternative", "related", "digest", "signed"])
    b = f"b{depth}_{r.randrange(1000)}"
    if r.random() < 0.5:
        hdr = [f'Content-Type: multipart/{sub}; boundary="{b}"']
    else:
        hdr = [f"Content-Type: multipart/{sub};\r\n boundary={b}"]
    chunks = [b"preamble text\r\n"] if r.random() < 0.3 else []
    for _ in range(r.randrange(1, 4)):
        if sub == "digest":  # parts default to message/rfc822
            h, body = [], _generated_message(r, depth + 1)
        else:
            h, body = _generated_entity(r, depth + 1)
        raw = b"".join(x.encode() + b"\r\n" for x in h) + b"\r\n" + body
        chunks.append(b"--" + b.encode() + b"\r\n" + raw + b"\r\n")
    closed = r.random() < 0.85
    if closed:
        chunks.append(b"--" + b.encode() + b"--\r\n")
        if r.random() < 0.3:
            chunks.append(b"epilogue\r\n")
    body = b"".join(chunks)
    if closed and r.random() < 0.3:  # a close delimiter right before the outer one
        body = body.rstrip(b"\r\n")
    return hdr, body


def _generated_message(r: random.Random, depth: int = 0) -> bytes:
    sender = r.choice(["a@b", "Name <n@x.org>", '"Q, N" <q@x>', "bare", "grp: a@b, c@d;"])
    subject = r.choice(["hi", "=?utf-8?q?x=C3=A4?=", "folded\r\n subject", ""])
    hdr = [f"From: {sender}", f"Subject: {subject}", "Date: Mon, 1 Jan 2024 00:00:00 +0000"]
    if r.random() < 0.5:
        hdr.append("To: x@y, z@w")
    if r.random() < 0.3:
        hdr.append(f"Message-ID: <m{r.randrange(100)}@x>")
    if r.random() < 0.7:
        hdr.append("MIME-Version: 1.0")
    more, body = _generated_entity(r, depth)
    return b"".join(x.encode() + b"\r\n" for x in hdr + more) + b"\r\n" + body


GENERATED = [_generated_message(random.Random(f"views-{i}")) for i in range(80)]


@pytest.fixture(scope="module")
def generated(server):
    conn = _mailbox(server, "Generated", GENERATED)
    yield conn
    conn.logout()


def test_generated_messages_match_dovecot(generated):
    """80 random MIME trees (nesting, digests, rfc822, encodings, odd case, unclosed
    multiparts, close delimiters right before outer ones): every item is Dovecot's."""
    failures = []
    for seq, data in enumerate(GENERATED, 1):
        view = MessageView(data)
        got = {
            "RFC822.SIZE": b"%d" % view.size,
            "BODYSTRUCTURE": view.bodystructure(True),
            "BODY": view.bodystructure(False),
        }
        for spec in _sections(view):
            got[f"BODY.PEEK[{spec}]"] = view.section(spec)
        for spec in ["", *_part_paths(view.root)]:
            try:
                binary = view.binary(spec)
            except MalformedMessage:
                binary = None
            if binary is not None:
                got[f"BINARY.PEEK[{spec}]"] = binary
        for item, ours in got.items():
            if _fetch(generated, seq, item) != ours:
                failures.append((seq, item))
    assert failures == []


def _split_spans_by_regex(body: bytes, boundary: str) -> list[tuple[int, int]]:
    """The earlier, regex-only reading of split_spans: the fast one must agree."""
    import re as _re

    delim = b"--" + boundary.encode()
    pattern = _re.compile(
        rb"(?:\A|\r\n|\n)" + _re.escape(delim) + rb"(--)?[ \t]*(?=\r\n|\n|\Z)(?:\r\n|\n)?"
    )
    spans: list[tuple[int, int]] = []
    start = None
    for m in pattern.finditer(body):
        if start is not None:
            spans.append((start, m.start()))
        if m.group(1):
            return spans
        start = m.end()
    if start is not None:
        spans.append((start, len(body)))
    return spans


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.sampled_from([b"--b", b"--b--", b"\r\n", b"\n", b"\r", b" ", b"\t", b"x", b"-", b"b"]),
        max_size=30,
    )
)
def test_split_spans_agrees_with_the_regex_reading(pieces: list[bytes]) -> None:
    from smimeproxy.imap.mimetree import split_spans

    body = b"".join(pieces)
    assert split_spans(body, "b") == _split_spans_by_regex(body, "b")


def test_a_view_crossing_processes_answers_the_same():
    """An engine worker's view arrives pickled: a small one without its parsed tree
    (parsed again on first use), a large one with it; both answer every item alike."""
    import pickle

    from smimeproxy.imap.views import REPARSE_MAX

    def message(size: int) -> bytes:
        text = b"line of text\r\n" * (size // 14)
        return (
            b"From: a@b.test\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
            b"--b\r\nContent-Type: text/plain\r\n\r\n" + text + b"\r\n"
            b"--b\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n--b--\r\n"
        )

    for size, keeps_tree in ((10_000, False), (REPARSE_MAX + 10_000, True)):
        view = MessageView(message(size))
        view.warm()
        back = pickle.loads(pickle.dumps(view))
        assert (back._root is not None) is keeps_tree
        assert back.size == view.size and back.data == view.data
        assert back.bodystructure(True) == view.bodystructure(True)
        assert back.bodystructure(False) == view.bodystructure(False)
        for spec in ("1", "2", "2.MIME", "HEADER", "TEXT", "HEADER.FIELDS (From)"):
            assert back.section(spec) == view.section(spec)
