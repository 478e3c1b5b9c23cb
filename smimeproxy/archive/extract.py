"""Searchable fields from a message as its owner sees it: headers, body text, attachment
names and the S/MIME state.

The input is the *opened* message (decrypted where the owner's keys opened it) and its
:class:`~smimeproxy.smime.status.MessageStatus`. A message that could not be decrypted
gives its outer headers only, and says so (``decrypted=False``).

Body text comes from ``text/plain`` parts, ``text/html`` parts (turned into text with
the standard library's :mod:`html.parser`, scripts and styles dropped) and text
attachments. Not guaranteed: text inside other attachment formats (PDF, office
documents) is not extracted; charsets Python does not know are decoded as UTF-8 with
replacement; text is capped at :data:`MAX_BODY_CHARS` per message.
"""

from __future__ import annotations

import datetime
import email
import email.errors
import email.header
import email.message
import email.utils
from dataclasses import dataclass
from html.parser import HTMLParser

from smimeproxy.smime.status import MessageStatus

#: at most this much text per message goes into the index (a 50 MB log file attached to a
#: message is not made searchable in full)
MAX_BODY_CHARS = 1_000_000
#: MIME nesting followed at most (beyond it the parts are ignored)
MAX_DEPTH = 32
#: text attachments by type besides text/*
_TEXT_LIKE = ("application/json", "application/xml", "application/csv", "message/delivery-status")
_SMIME_TYPES = (
    "application/pkcs7-signature",
    "application/x-pkcs7-signature",
    "application/pkcs7-mime",
    "application/x-pkcs7-mime",
)
#: defects that mean the message's structure is broken (not merely sloppy)
_STRUCTURE_DEFECTS = (
    email.errors.MissingHeaderBodySeparatorDefect,
    email.errors.StartBoundaryNotFoundDefect,
    email.errors.NoBoundaryInMultipartDefect,
    email.errors.CloseBoundaryNotFoundDefect,
    email.errors.MultipartInvariantViolationDefect,
)
#: the errors the stdlib email package raises on hostile input
_EMAIL_ERRORS = (ValueError, LookupError, UnicodeError, TypeError, IndexError, AssertionError)


@dataclass(frozen=True)
class ExtractedMessage:
    """What the index holds about one message (plaintext-derived: keep it on the
    hardened host)."""

    message_id: str
    sender: str
    to: str
    cc: str
    subject: str
    date: datetime.datetime | None
    body: str
    attachments: tuple[str, ...]
    encrypted: bool
    decrypted: bool
    signed: bool
    verified: bool
    signer: str
    smime: str  # the RFC 7281 result: pass, fail, none ...
    malformed: bool = False


class _HTMLText(HTMLParser):
    """Text content of an HTML document; script and style elements are skipped."""

    _SKIP = ("script", "style", "head", "title")

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in ("br", "p", "div", "li", "tr", "td", "h1", "h2", "h3"):
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skipping:
            self._skipping -= 1

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """Visible text of ``markup`` with whitespace collapsed (never raises)."""
    parser = _HTMLText()
    try:
        parser.feed(markup)
        parser.close()
    except (AssertionError, ValueError):  # html.parser on broken markup
        pass
    return " ".join(" ".join(parser.parts).split())


def decode_header(value: str | email.header.Header | None) -> str:
    """An RFC 2047 header as text; undecodable words are kept raw, never raised."""
    if value is None:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(str(value))))
    except (*_EMAIL_ERRORS, email.errors.HeaderParseError):
        return str(value)


def addresses(values: list[str]) -> str:
    """``Name <addr>`` list as text: names and addresses both searchable."""
    out = []
    try:
        pairs = email.utils.getaddresses([decode_header(v) for v in values])
    except _EMAIL_ERRORS:
        return " ".join(values)
    for name, addr in pairs:
        text = f"{name} <{addr}>" if name and addr else (addr or name)
        if text:
            out.append(text)
    return ", ".join(out)


def parse_date(value: str | None) -> datetime.datetime | None:
    """The Date header in UTC (naive, as whoosh stores it); None when absent or bad."""
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(str(value))
    except _EMAIL_ERRORS:
        return None
    if parsed is None:
        return None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(datetime.UTC).replace(tzinfo=None)
    return parsed


def _part_text(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, "replace")
    except LookupError:
        return payload.decode("utf-8", "replace")


def _walk(part: email.message.Message, depth: int, texts: list[str], names: list[str]) -> None:
    if depth > MAX_DEPTH:
        return
    if part.is_multipart():
        payload = part.get_payload()
        if isinstance(payload, list):
            for sub in payload:
                if isinstance(sub, email.message.Message):
                    _walk(sub, depth + 1, texts, names)
        return
    ctype = part.get_content_type()
    if ctype in _SMIME_TYPES:
        return  # the signature or envelope itself, not an attachment of the sender's
    filename = part.get_filename()
    if filename:
        names.append(decode_header(filename))
    if ctype == "text/html":
        texts.append(html_to_text(_part_text(part)))
    elif ctype.startswith("text/") or ctype in _TEXT_LIKE:
        texts.append(_part_text(part))
    elif ctype == "message/rfc822":
        inner = part.get_payload()
        if isinstance(inner, list):
            for sub in inner:
                if isinstance(sub, email.message.Message):
                    _walk(sub, depth + 1, texts, names)


def extract(data: bytes, status: MessageStatus | None = None) -> ExtractedMessage:
    """Index fields of ``data`` (the opened message), with ``status`` from opening it.

    Never raises for bad input: what cannot be parsed is left out and the result is
    marked ``malformed``. ``status=None`` means the message was not S/MIME at all.
    """
    malformed = bool(status and status.malformed)
    msg = email.message_from_bytes(data)
    texts: list[str] = []
    names: list[str] = []
    decrypted = True
    if status is not None and status.decryption is not None:
        decrypted = status.decryption.decrypted
    if decrypted:
        try:
            _walk(msg, 0, texts, names)
        except _EMAIL_ERRORS:
            malformed = True
    if not msg.keys() or any(isinstance(d, _STRUCTURE_DEFECTS) for d in msg.defects):
        malformed = True
    body = " ".join(t for t in texts if t)[:MAX_BODY_CHARS]
    signer = ""
    if status is not None and status.signers:
        signer = ", ".join(s.identity for s in status.signers)
    return ExtractedMessage(
        message_id=(msg.get("Message-ID") or "").strip(),
        sender=addresses(msg.get_all("From") or []),
        to=addresses(msg.get_all("To") or []),
        cc=addresses(msg.get_all("Cc") or []),
        subject=decode_header(msg.get("Subject")),
        date=parse_date(msg.get("Date")),
        body=body,
        attachments=tuple(names),
        encrypted=bool(status and status.encrypted),
        decrypted=bool(status and status.encrypted and decrypted),
        signed=bool(status and status.signed),
        verified=bool(status and status.verified),
        signer=signer,
        smime=str(status.smime_result) if status is not None else "none",
        malformed=malformed,
    )
