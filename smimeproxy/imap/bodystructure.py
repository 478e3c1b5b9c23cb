"""``BODYSTRUCTURE``, ``BODY`` and the ``ENVELOPE`` of encapsulated messages, as Dovecot.

RFC 3501 section 7.4.2 defines the fields; Dovecot decides the details a client sees,
and the tests compare byte for byte: types and parameters keep their case, text parts
without a charset get ``("charset" "us-ascii")`` appended, a multipart without parts
shows one empty ``text/plain`` part, envelope values are the raw header values (encoded
words not decoded, folded values sent as literals), a missing domain is
``MISSING_DOMAIN`` and a comment names an address that has no display name.

This does not call ``twisted.mail.imap4.getBodyStructure`` or ``collapseNestedLists``:
checked against Dovecot they lower-case parameter values (boundaries included), crash on
a parameter without ``=``, omit ``Content-Location``, send ``Content-Language`` as a
string instead of a list, and put a space between the parts of a multipart, which the
RFC 3501 grammar (``body-type-mpart = 1*body SP media-subtype``) does not allow. The
field order is the same as theirs.

Not guaranteed: strings with 8-bit bytes, NUL, CR or LF are sent as literals (never as
raw 8-bit quoted strings); address parsing is a tolerant tokenizer, not a validating
RFC 5322 parser, so for badly broken address headers the envelope may differ from
Dovecot's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from smimeproxy.imap.mimetree import Part, parse_disposition


class Literal(str):
    """A string Dovecot sends as a literal although it could be quoted (a folded value)."""


class Adjacent(list):  # type: ignore[type-arg]
    """Items written one after the other with no separator and no parentheses.

    RFC 3501 juxtaposes the parts of a multipart (``1*body``) and the addresses of an
    address list (``"(" 1*address ")"``).
    """


Item = None | int | str | list  # type: ignore[type-arg]


def body_structure(part: Part, extended: bool, top: bool = True) -> list:  # type: ignore[type-arg]
    """The nested-list form of ``BODYSTRUCTURE`` (``extended``) or ``BODY`` of ``part``.

    ``top`` marks the whole message (Dovecot abbreviates a plain top level, see
    :func:`_is_default_text`).
    """
    if part.is_multipart:
        result: list = [  # type: ignore[type-arg]
            Adjacent(body_structure(child, extended, False) for child in part.children)
            or Adjacent([_empty_part(extended)]),
            part.sub,
        ]
        if extended:
            result += [
                _params(part.params) or None,
                _disposition(part),
                _language(part),
                part.first("content-location"),
            ]
        return result
    if part.ignores_content_fields or (top and _is_default_text(part)):
        lines = part.body_lines()
        fields: list = ["text", "plain", ["charset", "us-ascii"], None, None, "7bit"]  # type: ignore[type-arg]
        return [*fields, part.body_size, lines, *([None] * 4 if extended else [])]
    main, sub, params = part.main, part.sub, list(part.params)
    if main.lower() == "text" and not any(k.lower() == "charset" for k, _ in params):
        params.append(("charset", "us-ascii"))
    cte = part.first("content-transfer-encoding")
    result = [
        main,
        sub,
        _params(params) or None,
        part.first("content-id"),
        part.first("content-description"),
        cte.strip() if cte is not None else "7bit",
        part.body_size,
    ]
    if main.lower() == "text":
        result.append(part.body_lines())
    elif part.message is not None:
        result += [
            envelope(part.message),
            body_structure(part.message, extended, False),
            part.body_lines(),
        ]
    if extended:
        result += [
            part.first("content-md5"),
            _disposition(part),
            _language(part),
            part.first("content-location"),
        ]
    return result


_OTHER_CONTENT_FIELDS = (
    "content-id",
    "content-description",
    "content-md5",
    "content-disposition",
    "content-language",
    "content-location",
)


def _is_default_text(part: Part) -> bool:
    """A top level that is plain ``text/plain`` (any case, at most ``charset=us-ascii``,
    7bit, no other content field): Dovecot stores only a flag for such messages
    (``message_part_data_is_plain_7bit``) and writes the default in lower case."""
    if (part.main.lower(), part.sub.lower()) != ("text", "plain"):
        return False
    if any(k.lower() != "charset" or v.lower() != "us-ascii" for k, v in part.params):
        return False
    if part.transfer_encoding().lower() != "7bit":
        return False
    return all(part.first(name) is None for name in _OTHER_CONTENT_FIELDS)


def _empty_part(extended: bool) -> list:  # type: ignore[type-arg]
    result: list = ["text", "plain", ["charset", "us-ascii"], None, None, "7bit", 0, 0]  # type: ignore[type-arg]
    return [*result, None, None, None, None] if extended else result


def _params(params: Sequence[tuple[str, str]]) -> list[str]:
    return [x for pair in params for x in pair]


def _disposition(part: Part) -> list | None:  # type: ignore[type-arg]
    value = part.first("content-disposition")
    if value is None:
        return None
    kind, params = parse_disposition(value)
    if kind is None:
        return None
    return [kind, _params(params) or None]


def _language(part: Part) -> list[str] | None:
    value = part.first("content-language")
    if value is None:
        return None
    tags = [t for t in re.split(r"[\s,]+", re.sub(r"\([^()]*\)", " ", value)) if t]
    return tags or None


def envelope(message: Part) -> list:  # type: ignore[type-arg]
    """ENVELOPE of an encapsulated message (RFC 3501 section 7.4.2), raw values as Dovecot.

    Sender and Reply-To default to From (RFC 3501). Encoded words are not decoded.
    """
    sender = _addresses(message.first("from"))

    def text(name: str) -> str | None:
        value = message.first(name)
        raw = message.raw_first(name)
        return Literal(value) if value is not None and raw and b"\n" in raw else value

    def addr(name: str, default: list | None = None) -> list | None:  # type: ignore[type-arg]
        value = _addresses(message.first(name))
        return value if value is not None else default

    return [
        text("date"),
        text("subject"),
        sender,
        addr("sender", sender),
        addr("reply-to", sender),
        addr("to"),
        addr("cc"),
        addr("bcc"),
        text("in-reply-to"),
        text("message-id"),
    ]


_ADDR_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"?|\((?:\\.|[^()\\])*\)?|[<>@,;:]|[^\s<>@,;:"(]+')


def _addresses(value: str | None) -> list | None:  # type: ignore[type-arg]
    """An address list as IMAP address structures; ``None`` for an absent/empty header."""
    if value is None:
        return None
    all_tokens = _ADDR_TOKEN.findall(value)
    tokens = [t for t in all_tokens if not t.startswith("(")]
    out: list[list[str | None]] = []
    i = 0
    n = len(tokens)
    in_group = False

    def word(t: str) -> str:
        if t.startswith('"'):
            return re.sub(r"\\(.)", r"\1", t[1:-1] if t.endswith('"') and len(t) > 1 else t[1:])
        return t

    while i < n:
        phrase: list[str] = []
        while i < n and tokens[i] not in ("<", "@", ":", ",", ";"):
            phrase.append(tokens[i])
            i += 1
        stop = tokens[i] if i < n else ""
        if stop == ":" and not in_group:
            out.append([None, None, " ".join(word(t) for t in phrase), None])
            in_group = True
            i += 1
            continue
        if stop == "<":
            i += 1
            route: list[str] = []
            inner: list[str] = []
            while i < n and tokens[i] != ">":
                inner.append(tokens[i])
                i += 1
            i += 1
            if ":" in inner:
                k = inner.index(":")
                route, inner = inner[:k], inner[k + 1 :]
            local, host = _split_addr(inner, word)
            name = " ".join(word(t) for t in phrase) or None
            adl = "".join(route) or None
            out.append([name, adl, local or MISSING_MAILBOX, host or MISSING_DOMAIN])
        elif stop == "@":
            rest: list[str] = []
            while i < n and tokens[i] not in (",", ";"):
                rest.append(tokens[i])
                i += 1
            local, host = _split_addr(phrase + rest, word)
            out.append([_comment_name(value, local), None, local, host or MISSING_DOMAIN])
        elif phrase:
            local = "".join(word(t) for t in phrase)
            out.append([_comment_name(value, local), None, local, MISSING_DOMAIN])
        if i < n and tokens[i] == ";" and in_group:
            out.append([None, None, None, None])
            in_group = False
        i += 1
    if in_group:
        out.append([None, None, None, None])
    return [Adjacent(out)] if out else None


#: What Dovecot fills in for a missing part of an address (lib-mail/message-address.c).
MISSING_MAILBOX = "MISSING_MAILBOX"
MISSING_DOMAIN = "MISSING_DOMAIN"


def _comment_name(value: str, local: str) -> str | None:
    """The comment after an addr-spec (``a@b (Name)``) as the name, as Dovecot does."""
    m = re.search(re.escape(local) + r"[^,;(]*\(((?:\\.|[^()\\])*)\)", value)
    return re.sub(r"\\(.)", r"\1", m.group(1)) if m else None


def _split_addr(tokens: list[str], word) -> tuple[str, str | None]:  # type: ignore[no-untyped-def]
    if "@" in tokens:
        k = len(tokens) - 1 - tokens[::-1].index("@")
        return "".join(word(t) for t in tokens[:k]), "".join(tokens[k + 1 :]) or None
    return "".join(word(t) for t in tokens), None


def encode(item: object) -> bytes:
    """IMAP wire form: NIL, numbers, quoted strings (literals where quoting is unsafe)."""
    if item is None:
        return b"NIL"
    if isinstance(item, bool):
        raise TypeError("no booleans in IMAP structures")
    if isinstance(item, int):
        return b"%d" % item
    if isinstance(item, Literal):
        raw = item.encode("utf-8", "surrogateescape")
        return b"{%d}\r\n" % len(raw) + raw
    if isinstance(item, str):
        return _string(item.encode("utf-8", "surrogateescape"))
    if isinstance(item, bytes):
        return _string(item)
    if isinstance(item, Adjacent):
        return b"".join(encode(x) for x in item)
    if isinstance(item, list):
        return b"(" + b" ".join(encode(x) for x in item) + b")"
    raise TypeError(f"cannot encode {type(item).__name__}")


_QUOTABLE = re.compile(rb"[\x20-\x7e]*")


def _string(raw: bytes) -> bytes:
    """A quoted string, or a literal when it holds CR, LF, NUL or 8-bit bytes."""
    if len(raw) <= 1024 and _QUOTABLE.fullmatch(raw):
        return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(raw) + raw
