"""SEARCH BODY and SEARCH TEXT over a decrypted message (RFC 3501 section 6.4.4).

The upstream server only holds ciphertext, so for S/MIME messages the proxy evaluates
the content keys of SEARCH itself and hands the server the answer as a UID set
(``searchkeys.py`` does the rewriting; this module only decides "does this message
match"). RFC 3501: ``BODY <string>`` matches when the body of the message contains the
string, ``TEXT <string>`` when the header or the body does; matching is a
case-insensitive substring match. Like Dovecot, the text searched is *decoded*: the
transfer encoding is removed, the charset converted, header fields are RFC 2047-decoded.

What is searched as body: every ``text/*`` part (HTML included, tags and all, as Dovecot
without full-text search does), text-like ``application/*`` parts (JSON, XML, scripts,
``*+xml``, ``*+json``), and the body of encapsulated ``message/rfc822`` messages
(their header only for ``TEXT``, as Dovecot does). Images, PDFs and other binary attachments are not
searched.

Not guaranteed: Unicode normalisation (NFC versus NFD) is not applied, and case folding
is Python's ``str.casefold`` (i18n-comparator rules of RFC 5051 are approximated). A part
whose transfer encoding cannot be decoded is searched as it is stored. The searchable text
is extracted on every call and not kept: keeping it would hold up to four times the text
of every cached message outside the cache's byte bound (about 50 microseconds per 20 KB of
text; a SEARCH with several content keys pays it once per key).
"""

from __future__ import annotations

import codecs
import email.errors
import email.header

from smimeproxy.errors import MalformedMessage, SMIMEProxyError
from smimeproxy.imap.views import KNOWN_ENCODINGS, MessageView, Part, decode_body

#: application/* subtypes whose content is text (searched like text/*)
TEXTUAL_APPLICATION = frozenset(
    {
        "json",
        "xml",
        "javascript",
        "x-javascript",
        "ecmascript",
        "x-sh",
        "x-shellscript",
        "sql",
        "rtf",
        "x-yaml",
        "yaml",
        "csv",
        "x-csv",
        "ics",
        "pgp-keys",
        "x-tex",
    }
)


def matches_text(view: MessageView, key: str, needle: str) -> bool:
    """Does ``view`` match ``SEARCH <key> <needle>``, with ``key`` ``BODY`` or ``TEXT``?

    Raises :class:`MalformedMessage` for any other key (the caller only rewrites those).
    """
    kind = key.upper()
    if kind not in ("BODY", "TEXT"):
        raise MalformedMessage(f"not a content search key: {key[:20]!r}")
    wanted = needle.casefold()
    if not wanted:
        return True
    header, body = searchable_text(view)
    if wanted in body:
        return True
    return kind == "TEXT" and wanted in header


def searchable_text(view: MessageView) -> tuple[str, str]:
    """(header text, body text) of ``view``, decoded and case-folded."""
    headers: list[str] = [_header_text(view.root)]
    bodies: list[str] = []
    _collect(view.root, headers, bodies)
    return "\n".join(headers).casefold(), "\n".join(bodies).casefold()


def _collect(part: Part, headers: list[str], bodies: list[str]) -> None:
    """Walk the parse tree: body text into ``bodies``, nested headers into ``headers``."""
    if part.is_multipart:
        for child in part.children:
            headers.append(_header_text(child))
            _collect(child, headers, bodies)
        return
    if part.message is not None:
        # the encapsulated message's header counts for TEXT only (as in Dovecot)
        headers.append(_header_text(part.message))
        _collect(part.message, headers, bodies)
        return
    if _is_textual(part):
        bodies.append(_decoded_text(part))


def _is_textual(part: Part) -> bool:
    main, sub = part.main.lower(), part.sub.lower()
    if main == "text":
        return True
    if main == "application":
        return sub in TEXTUAL_APPLICATION or sub.endswith(("+xml", "+json"))
    return False


def _charset(part: Part) -> str:
    for k, v in part.params:
        if k.lower() == "charset" and v:
            return v.strip().lower()
    return "utf-8"  # us-ascii by default (RFC 2045); UTF-8 reads it and is lenient


def _decoded_text(part: Part) -> str:
    cte = part.transfer_encoding().lower()
    raw = part.body
    if cte in KNOWN_ENCODINGS:
        try:
            raw = decode_body(part.body, cte)
        except SMIMEProxyError:
            raw = part.body
    charset = _charset(part)
    if charset in ("us-ascii", "ascii") or not charset.isascii():
        charset = "utf-8"
    try:
        codecs.lookup(charset)
    except (LookupError, ValueError):
        charset = "utf-8"
    try:
        return raw.decode(charset, "replace")
    except (UnicodeError, LookupError):  # codecs that refuse "replace" or fail oddly
        return raw.decode("utf-8", "replace")


def _header_text(part: Part) -> str:
    """Every header field as ``Name: value`` with RFC 2047 encoded words decoded."""
    lines = []
    for _, raw in part.fields:
        name, _, value = raw.partition(b":")
        text = value.decode("utf-8", "replace").replace("\r", "").replace("\n", "")
        lines.append(f"{name.decode('ascii', 'replace')}: {_decode_2047(text.strip())}")
    return "\n".join(lines)


def _decode_2047(value: str) -> str:
    if "=?" not in value:
        return value
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (ValueError, LookupError, UnicodeError, email.errors.MessageError):
        return value
