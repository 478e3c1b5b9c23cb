"""One decrypted message as an IMAP server would show it: sections, BINARY, BODYSTRUCTURE.

The IMAP proxy answers FETCH for S/MIME messages from the decrypted message instead of
the stored ciphertext. A client that fetches ``BODYSTRUCTURE`` first and then sections
and partials of sections (Thunderbird does) must see one consistent message, and it must
look exactly as if the upstream server held the plaintext. :class:`MessageView` parses
the message once and answers every content item of FETCH from that parse:

* ``section(spec)`` -- ``BODY[spec]`` (RFC 3501 section 6.4.5, RFC 9051 section 6.4.5);
* ``binary(spec)`` / ``binary_size(spec)`` -- ``BINARY[spec]`` (RFC 3516);
* ``bodystructure(extended)`` -- ``BODYSTRUCTURE`` / ``BODY`` in wire form (RFC 3501 7.4.2);
* :func:`partial` -- the ``<origin.length>`` suffix.

Part numbering follows Dovecot's reading of RFC 3501 exactly (it is the reference the
tests compare against, byte for byte): part ``1`` of a non-multipart message is its
body; ``n.1`` of a leaf part is that leaf; a ``message/rfc822`` part followed by more
numbers, ``HEADER`` or ``TEXT`` stands for the encapsulated message; a part that does
not exist is the empty string, as is ``HEADER`` or ``TEXT`` of a part that is not a
``message/rfc822``. ``BODYSTRUCTURE`` is computed the way Dovecot computes it (case of
types and parameters kept, ``charset us-ascii`` supplied for text parts without one,
RFC 2231 continuations merged, line counts for ``text/*`` and ``message/rfc822``).

The MIME tree is built by :mod:`smimeproxy.imap.mimetree`, the structure by
:mod:`smimeproxy.imap.bodystructure` (which explains why Twisted's builder is not used).

Line ends: a bare LF in ``data`` becomes CRLF (as Dovecot serves it), so ``size`` is
the length of the converted message. Not guaranteed: a lone CR is left alone;
BINARY of base64 without padding is decoded (Dovecot 2.3 fails the whole FETCH); see
the two modules above for what they do not guarantee.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterable, Sequence

from smimeproxy.errors import MalformedMessage, SMIMEProxyError
from smimeproxy.imap.bodystructure import body_structure, encode
from smimeproxy.imap.mimetree import Part, parse_part
from smimeproxy.smime.mime import CRLF, is_crlf

__all__ = ["IDENTITY_ENCODINGS", "KNOWN_ENCODINGS", "MessageView", "Part", "partial"]

#: Transfer encodings BINARY can undo (RFC 2045 section 6.1; RFC 3516 section 4.2 says
#: the server answers ``NO [UNKNOWN-CTE]`` for others).
IDENTITY_ENCODINGS = frozenset({"7bit", "8bit", "binary", ""})
KNOWN_ENCODINGS = IDENTITY_ENCODINGS | {"base64", "quoted-printable"}

_SECTION = re.compile(
    r"^(?P<part>[1-9][0-9]*(?:\.[1-9][0-9]*)*)?"
    r"(?:(?(part)\.)(?P<text>HEADER\.FIELDS\.NOT|HEADER\.FIELDS|HEADER|TEXT|MIME)"
    r"(?:\s*\((?P<names>[^()]*)\))?)?$",
    re.IGNORECASE,
)


#: a view of up to this many octets crosses processes without its parsed tree
REPARSE_MAX = 256 << 10

_BARE_LF = re.compile(rb"(?<!\r)\n")
_HEADER_NAME = re.compile(r'"(?:\\.|[^"\\])*"|[^\s"]+')


def _astring(token: str) -> str:
    """A header name as an IMAP atom or quoted string (RFC 3501 ``header-fld-name``)."""
    if len(token) >= 2 and token[0] == token[-1] == '"':
        return re.sub(r"\\(.)", r"\1", token[1:-1])
    return token


def partial(data: bytes, origin: int, length: int | None) -> bytes:
    """The ``<origin.length>`` slice of a fetched item (RFC 3501 section 6.4.5).

    An origin beyond the end gives the empty string; a length running past the end is
    cut at the end. Negative values are not valid IMAP and give the empty string.
    """
    if origin < 0 or (length is not None and length < 0):
        return b""
    if length is None:
        return data[origin:]
    return data[origin : origin + length]


class MessageView:
    """One decrypted message, parsed once (lazily), answering FETCH content items.

    Pure: the lazily computed tree and structure are functions of ``data`` only, so two
    threads racing to compute them store equal values; safe to share between threads. Sizes and
    structure are functions of ``data`` only, so every command of a session sees the
    same message.
    """

    def __init__(self, data: bytes, crlf: bool = False):
        """``crlf``: the caller knows every line of ``data`` ends with CRLF (the
        engine's output for a CRLF message, :attr:`OpenedMessage.crlf`), so the
        bare-LF check (~46 us for 70 KB) is skipped."""
        if not isinstance(data, bytes):
            raise TypeError("MessageView takes bytes")
        if not crlf and not is_crlf(data) and data.count(b"\n") != data.count(b"\r\n"):
            # IMAP servers send CRLF line ends whatever they store (Dovecot converts bare
            # LF on output); ``size`` and every section are of the converted message.
            data = _BARE_LF.sub(b"\r\n", data)
        self.data = data
        self.size = len(data)
        self._root: Part | None = None
        self._structure: dict[bool, bytes] = {}
        #: the IMAP layer's memo of rendered FETCH lines for this message (reactor thread)
        self.rendered: dict[object, bytes] = {}

    def __getstate__(self) -> dict[str, object]:
        """What crosses to another process (an engine worker's answer): the message and
        its structure, and the parsed tree only for a large message. A small one's tree
        costs more to pickle and unpickle than to parse again where a section is asked
        for (about 150 us for 70 KB), and a cold sync asks for none; a large one's tree
        comes along so that the reactor never parses megabytes."""
        state = dict(self.__dict__)
        state["rendered"] = {}
        if self.size <= REPARSE_MAX:
            state["_root"] = None
        return state

    @property
    def root(self) -> Part:
        """The MIME tree, parsed on first use (``BODY[]``, ``RFC822`` and ``RFC822.SIZE``
        never need it).  Raises :class:`MalformedMessage` when it cannot be parsed."""
        if self._root is None:
            try:
                self._root = parse_part(self.data)
            except SMIMEProxyError:
                raise
            except (ValueError, IndexError, KeyError, TypeError, UnicodeError) as e:
                raise MalformedMessage(
                    f"message structure could not be parsed: {type(e).__name__}"
                ) from None
        return self._root

    def warm(self, structure: bool = True) -> None:
        """Parse now (in a worker thread, say) rather than on first use; with
        ``structure`` also compute ``BODYSTRUCTURE``.  Raises :class:`MalformedMessage`
        as :attr:`root` does."""
        if structure:
            self.bodystructure(True)
        else:
            self.root  # noqa: B018

    # -- sections -------------------------------------------------------------------
    def _resolve(self, spec: str) -> tuple[Part | None, str, list[str], bool]:
        """(part, text specifier upper-cased, header names, reached-a-message)."""
        m = _SECTION.match(spec.strip())
        if m is None:
            raise MalformedMessage(f"invalid section specifier {spec[:100]!r}")
        numbers = [int(x) for x in m.group("part").split(".")] if m.group("part") else []
        text = (m.group("text") or "").upper()
        names_text = m.group("names")
        if text.startswith("HEADER.FIELDS") != (names_text is not None):
            raise MalformedMessage(f"invalid section specifier {spec[:100]!r}")
        names = [_astring(n) for n in _HEADER_NAME.findall(names_text or "")]
        if text == "MIME" and not numbers:
            raise MalformedMessage("MIME needs a part number")
        if text.startswith("HEADER.FIELDS") and not names:
            raise MalformedMessage("HEADER.FIELDS needs at least one field name")
        part: Part | None = self.root
        is_message = True
        wants_message = text.startswith("HEADER") or text == "TEXT"
        for i, num in enumerate(numbers):
            assert part is not None
            more_numbers = i + 1 < len(numbers)
            is_message = False
            if part.is_multipart:
                part = part.children[num - 1] if num <= len(part.children) else None
            elif num != 1 or (more_numbers and not part.is_rfc822):
                part = None
            if part is None:
                return None, text, names, False
            if part.message is not None and (more_numbers or wants_message):
                part = part.message
                is_message = True
        return part, text, names, is_message

    def section(self, spec: str) -> bytes:
        """``BODY[spec]`` exactly as the server would send it (before any partial).

        ``spec`` is the text between the brackets, e.g. ``""``, ``"1.2.MIME"``,
        ``"HEADER.FIELDS (From To)"``. A part that does not exist gives ``b""``.
        Raises :class:`MalformedMessage` for a specifier that is not valid syntax.
        """
        if not spec.strip():
            return self.data  # the whole message: no parse needed
        part, text, names, is_message = self._resolve(spec)
        if part is None:
            return b""
        if text == "":
            return part.body
        if text == "MIME":
            return part.header
        if not is_message:
            return b""
        if text == "TEXT":
            return part.body
        if text == "HEADER":
            return part.header
        return _filter_header(part, names, negate=text == "HEADER.FIELDS.NOT")

    def header_fields(self, names: Iterable[str], negate: bool = False) -> bytes:
        """``BODY[HEADER.FIELDS (names)]`` (or ``.NOT``) of the top-level message."""
        return _filter_header(self.root, list(names), negate)

    # -- BINARY (RFC 3516) ------------------------------------------------------------
    def binary(self, spec: str) -> bytes | None:
        """``BINARY[spec]``: the part with its transfer encoding removed.

        ``None`` when the encoding is unknown (answer ``NO [UNKNOWN-CTE]``). Only part
        numbers and the empty section are valid (RFC 3516 section 4.1); anything else
        raises :class:`MalformedMessage`, as does base64 that cannot be decoded.
        """
        if not spec.strip():
            return binary_entity(self.root)
        part, text, _, _ = self._resolve(spec)
        if text:
            raise MalformedMessage("BINARY takes part numbers only")
        if part is None:
            return b""
        if part.message is not None:
            return binary_entity(part.message)
        if part.is_multipart:
            whole = binary_entity(part)
            return None if whole is None else whole[len(part.header) :]
        cte = part.transfer_encoding().lower()
        if cte not in KNOWN_ENCODINGS:
            return None
        return decode_body(part.body, cte)

    def binary_size(self, spec: str) -> int | None:
        """``BINARY.SIZE[spec]``: length of :meth:`binary`, ``None`` for an unknown CTE."""
        content = self.binary(spec)
        return None if content is None else len(content)

    # -- BODYSTRUCTURE ----------------------------------------------------------------
    def bodystructure(self, extended: bool = True) -> bytes:
        """The parenthesised ``BODYSTRUCTURE`` (``extended``) or ``BODY`` value."""
        cached = self._structure.get(extended)
        if cached is None:
            cached = encode(body_structure(self.root, extended))
            self._structure[extended] = cached
        return cached


def binary_entity(part: Part) -> bytes | None:
    """A whole entity with every leaf decoded and its CTE field rewritten to ``binary``.

    What Dovecot sends for ``BINARY[]``; ``None`` when any leaf has an unknown encoding.
    """
    if part.is_multipart:
        out = bytearray(part.header)
        body = part.body
        pos = 0
        for (start, end), child in zip(part.spans, part.children, strict=True):
            inner = binary_entity(child)
            if inner is None:
                return None
            out += body[pos:start] + inner
            pos = end
        return bytes(out + body[pos:])
    if part.message is not None:
        inner = binary_entity(part.message)
        return None if inner is None else part.header + inner
    cte = part.transfer_encoding().lower()
    if cte not in KNOWN_ENCODINGS:
        return None
    if cte in IDENTITY_ENCODINGS:
        return part.header + part.body
    # Dovecot drops the field where it stood and appends the new one to the header block
    kept = b"".join(raw for key, raw in part.fields if key != "content-transfer-encoding")
    blank = part.header[sum(len(raw) for _, raw in part.fields) :]
    return kept + b"Content-Transfer-Encoding: binary\r\n" + blank + decode_body(part.body, cte)


def _filter_header(part: Part, names: Sequence[str], negate: bool) -> bytes:
    """Matching (or, negated, non-matching) header fields in order, then an empty line.

    Like Dovecot: ``HEADER.FIELDS`` always ends with an empty line; ``.NOT`` keeps the
    original end of the header block (so a message without one gets none).
    """
    wanted = {n.lower() for n in names}
    kept = [raw for key, raw in part.fields if (key in wanted) != negate]
    if negate:
        end = part.header[sum(len(raw) for _, raw in part.fields) :]
        return b"".join(kept) + end
    return b"".join(kept) + CRLF


def decode_body(body: bytes, cte: str) -> bytes:
    """Remove a known Content-Transfer-Encoding, leniently where servers are lenient."""
    if cte in IDENTITY_ENCODINGS:
        return body
    if cte == "base64":
        return decode_base64(body)
    if cte == "quoted-printable":
        return decode_quoted_printable(body)
    raise MalformedMessage(f"unknown Content-Transfer-Encoding {cte[:40]!r}")


_BASE64 = re.compile(rb"[A-Za-z0-9+/ \t\r\n]*(?:=[ \t\r\n]*){0,2}")


def decode_base64(body: bytes) -> bytes:
    """Base64 with whitespace anywhere (RFC 2045 section 6.8); other characters are
    refused with :class:`MalformedMessage`, as Dovecot answers ``NO [PARSE]``."""
    if _BASE64.fullmatch(body) is None:
        raise MalformedMessage("base64 body holds characters outside the alphabet")
    cleaned = re.sub(rb"[^A-Za-z0-9+/]", b"", body)
    if len(cleaned) % 4 == 1:
        raise MalformedMessage("base64 body has a dangling character")
    try:
        return binascii.a2b_base64(cleaned + b"=" * (-len(cleaned) % 4))
    except binascii.Error:
        raise MalformedMessage("base64 body could not be decoded") from None


_QP_TRAILING_SPACE = re.compile(rb"[ \t]+(?=\r\n|\n|\Z)")
_QP_BAD_ESCAPE = re.compile(rb"=(?![0-9A-Fa-f]{2}|\r\n|\n)")


def decode_quoted_printable(body: bytes) -> bytes:
    """RFC 2045 section 6.7: trailing whitespace dropped, soft line breaks joined.

    An ``=`` not followed by two hex digits or a line end (a soft break at the very end
    included) raises :class:`MalformedMessage`, as Dovecot answers ``NO [PARSE]``.
    """
    body = _QP_TRAILING_SPACE.sub(b"", body)
    if _QP_BAD_ESCAPE.search(body):
        raise MalformedMessage("invalid quoted-printable escape")
    return binascii.a2b_qp(body)
