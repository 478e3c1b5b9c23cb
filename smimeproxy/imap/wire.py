"""IMAP wire codec, sans-I/O: bytes in, events out (RFC 3501 section 4 and 7, RFC 7888).

Both directions share one lexical shape: a line ends in CRLF, and a line that ends in a
literal header (``{n}``, ``{n+}`` LITERAL+/LITERAL-, ``~{n}`` RFC 3516 binary) is
followed by exactly ``n`` octets, after which the same logical line continues.
:class:`Splitter` cuts a byte stream into :class:`Fragment` events (one physical line,
with the literal header it ends in, if any) and :class:`LiteralData` events (literal
octets, streamed in whatever chunks arrived).  The proxy forwards those events as they
come, so a literal of any size passes through without being buffered.  Where the proxy
has to understand a whole command or response it uses :class:`Assembler` (bounded) and
:func:`tokenize`.

Not guaranteed: a free-text response (``* OK some text {5}``) that happens to end in
something shaped like a literal header is taken as one, as every IMAP implementation
does; :func:`tokenize` is lenient (it accepts what servers and clients send, not only
what the ABNF allows) and raises :class:`~smimeproxy.errors.MalformedMessage` on input it
cannot split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from smimeproxy.errors import MalformedMessage

#: RFC 7888 section 4: a LITERAL- server accepts non-synchronising literals up to this size.
LITERAL_MINUS_MAX = 4096

_LITERAL_HEADER = re.compile(rb"(~?)\{([0-9]{1,19})(\+?)\}\r\n\Z")


@dataclass(frozen=True)
class LiteralHeader:
    """The ``{n}`` at the end of a line: ``nonsync`` for ``{n+}``, ``binary`` for ``~{n}``."""

    size: int
    nonsync: bool = False
    binary: bool = False

    def encode(self) -> bytes:
        return b"%s{%d%s}\r\n" % (
            b"~" if self.binary else b"",
            self.size,
            b"+" if self.nonsync else b"",
        )


@dataclass(frozen=True)
class Fragment:
    """One physical line including its CRLF; ``first`` is False when it continues a
    logical line after a literal; ``literal`` is set when it ends in a literal header."""

    data: bytes
    first: bool
    literal: LiteralHeader | None = None


@dataclass(frozen=True)
class LiteralData:
    """Octets of the current literal; ``end`` on the chunk that completes it."""

    data: bytes
    end: bool


@dataclass(frozen=True)
class LineTooLong:
    """A line passed ``max_line`` octets without CRLF; its rest is skipped up to the CRLF."""

    size: int


Event = Fragment | LiteralData | LineTooLong


class Splitter:
    """Cut an IMAP byte stream into fragments and literal chunks.

    ``max_line`` bounds the octets buffered for one physical line (literals are not
    lines and are never buffered here).  Feeding arbitrary bytes never raises.
    """

    def __init__(self, max_line: int = 65536):
        self.max_line = max_line
        self._buffer = bytearray()
        self._literal_left = 0
        self._literal_size = 0
        self._first = True
        self._skipping = False

    @property
    def in_literal(self) -> bool:
        return self._literal_left > 0

    @property
    def at_boundary(self) -> bool:
        """True between logical lines (nothing partial buffered, no literal pending)."""
        return self._first and not self._buffer and not self._literal_left and not self._skipping

    @property
    def line_pending(self) -> bool:
        """Part of a physical line is buffered (or being skipped): the next event's
        octets do not all come from the next feed."""
        return bool(self._buffer) or self._skipping

    def cancel_literal(self) -> None:
        """The literal just announced will not come (its command was refused)."""
        self._literal_left = 0
        self._first = True

    @property
    def literal_untouched(self) -> bool:
        """A literal was announced and none of its octets has arrived yet."""
        return self._literal_left > 0 and self._literal_left == self._literal_size

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            if self._literal_left:
                take = min(self._literal_left, len(view) - pos)
                self._literal_left -= take
                # a read that is all literal passes on as it is (no copy of the octets)
                whole = take == len(data) and type(data) is bytes
                chunk = data if whole else bytes(view[pos : pos + take])
                events.append(LiteralData(chunk, self._literal_left == 0))
                pos += take
                continue
            end = data.find(b"\n", pos)
            if end < 0:
                chunk = view[pos:]
                pos = len(view)
                if self._skipping:
                    continue
                self._buffer += chunk
                if len(self._buffer) > self.max_line:
                    events.append(LineTooLong(len(self._buffer)))
                    self._buffer.clear()
                    self._skipping = True
                continue
            chunk = view[pos : end + 1]
            pos = end + 1
            if self._skipping:
                self._skipping = False
                self._first = True
                continue
            self._buffer += chunk
            if len(self._buffer) > self.max_line:
                events.append(LineTooLong(len(self._buffer)))
                self._buffer.clear()
                self._first = True
                continue
            line = bytes(self._buffer)
            self._buffer.clear()
            header = literal_header(line)
            events.append(Fragment(line, self._first, header))
            if header is not None:
                self._first = False
                self._literal_left = self._literal_size = header.size
                if header.size == 0:
                    events.append(LiteralData(b"", True))
            else:
                self._first = True
        return events


def literal_header(line: bytes) -> LiteralHeader | None:
    """The literal header a physical line ends in, if any."""
    if not line.endswith(b"}\r\n"):
        return None
    match = _LITERAL_HEADER.search(line[-26:])
    if match is None:
        return None
    return LiteralHeader(int(match.group(2)), bool(match.group(3)), bool(match.group(1)))


@dataclass
class Message:
    """One logical line: its physical lines (each with CRLF) and the literals between."""

    lines: list[bytes] = field(default_factory=list)
    literals: list[bytes] = field(default_factory=list)

    @property
    def text(self) -> bytes:
        return b"".join(self.lines)

    @property
    def size(self) -> int:
        return sum(map(len, self.lines)) + sum(map(len, self.literals))

    def encode(self) -> bytes:
        out = bytearray()
        for i, line in enumerate(self.lines):
            out += line
            if i < len(self.literals):
                out += self.literals[i]
        return bytes(out)

    def head(self, limit: int = 200) -> bytes:
        return self.lines[0][:limit] if self.lines else b""


class Assembler:
    """Collect events into whole :class:`Message` objects, at most ``max_size`` octets each.

    ``add`` returns the finished message, or None while one is still incomplete; it
    raises MalformedMessage when the message outgrows ``max_size`` (the rest of it is then
    dropped event by event until the next logical line).
    """

    def __init__(self, max_size: int):
        self.max_size = max_size
        self._current: Message | None = None
        self._literal: list[bytes] = []
        self._size = 0
        self._dropping = False

    def add(self, event: Event) -> Message | None:
        if isinstance(event, LineTooLong):
            self._reset()
            raise MalformedMessage("line too long")
        if isinstance(event, LiteralData):
            if self._dropping or self._current is None:
                return None
            self._size += len(event.data)
            if self._size > self.max_size:
                self._reset(dropping=True)
                raise MalformedMessage("message too large")
            self._literal.append(event.data)
            if event.end:
                # a literal that came in one piece is kept as it is: no copy
                pieces = self._literal
                self._current.literals.append(pieces[0] if len(pieces) == 1 else b"".join(pieces))
                self._literal = []
            return None
        if event.first:
            self._reset()
            self._current = Message()
        elif self._current is None:
            return None
        self._size += len(event.data)
        if self._size > self.max_size:
            self._reset(dropping=event.literal is not None)
            raise MalformedMessage("message too large")
        self._current.lines.append(event.data)
        if event.literal is None:
            done, self._current = self._current, None
            self._size = 0
            return done
        return None

    def peek(self) -> Message | None:
        """The message being collected so far (its completed lines and literals)."""
        return self._current

    def _reset(self, dropping: bool = False) -> None:
        self._current = None
        self._literal.clear()
        self._size = 0
        self._dropping = dropping


# -- tokens ---------------------------------------------------------------------------


class Atom(bytes):
    """An atom (also numbers, flags, sequence sets, ``BODY[...]<n>`` and NIL)."""


class String(bytes):
    """A quoted string or a literal, already unquoted."""


Token = Atom | String | list  # lists nest


_ATOM_END = frozenset(b' ()\r\n"{')
#: an atom; brackets keep spaces and parentheses inside one atom (fetch-att, resp-text-code)
_ATOM = re.compile(rb'(?:[^ ()\r\n"{\[]|\[[^\]\r\n]*\]?)+')
_QUOTED = re.compile(rb'"((?:[^"\\\r\n]|\\[^\r\n])*)"')
_UNESCAPE = re.compile(rb"\\(.)")


def tokenize(message: Message, start: int = 0) -> list[Token]:
    """Split a whole logical line into tokens (parenthesised lists become Python lists).

    Brackets keep their content inside one atom (``BODY[HEADER.FIELDS (A B)]<0.5>``),
    as in RFC 3501's fetch-att and resp-text-code.  ``start`` skips a prefix (e.g. the
    tag).  Raises MalformedMessage for unbalanced lists, bad quoting or a literal header
    without its literal.
    """
    text = message.text
    literals = iter(message.literals)
    stack: list[list[Token]] = [[]]
    i = start
    n = len(text)
    while i < n:
        c = text[i]
        if c in (0x20, 0x0D, 0x0A):
            i += 1
        elif c == 0x28:  # (
            stack.append([])
            i += 1
        elif c == 0x29:  # )
            if len(stack) == 1:
                raise MalformedMessage("unbalanced parenthesis")
            done = stack.pop()
            stack[-1].append(done)
            i += 1
        elif c == 0x22:  # "
            match = _QUOTED.match(text, i)
            if match is None:
                raise MalformedMessage("unterminated quoted string")
            value = match.group(1)
            if b"\\" in value:
                value = _UNESCAPE.sub(rb"\1", value)
            stack[-1].append(String(value))
            i = match.end()
        elif c == 0x7B or (c == 0x7E and i + 1 < n and text[i + 1] == 0x7B):  # { or ~{
            j = text.find(b"}\r\n", i)
            if j < 0:
                raise MalformedMessage("bad literal header")
            try:
                value = next(literals)
            except StopIteration:
                raise MalformedMessage("literal missing") from None
            stack[-1].append(String(value))
            i = j + 3
        else:
            match = _ATOM.match(text, i)
            if match is None or match.end() == i:
                raise MalformedMessage("unexpected character")
            stack[-1].append(Atom(match.group(0)))
            i = match.end()
    if len(stack) != 1:
        raise MalformedMessage("unbalanced parenthesis")
    return stack[0]


def split_tag(line: bytes) -> tuple[bytes, bytes, bytes]:
    """``(tag, word, rest)`` of a command or response line: ``b"a1 UID FETCH ..."`` ->
    ``(b"a1", b"UID", b"FETCH ...")``; empty parts for missing ones.  Word upper-cased."""
    line = line.rstrip(b"\r\n")
    parts = line.split(b" ", 2)
    tag = parts[0] if parts else b""
    word = parts[1].upper() if len(parts) > 1 else b""
    rest = parts[2] if len(parts) > 2 else b""
    return tag, word, rest


_QUOTABLE = re.compile(rb"[\x01-\x09\x0b\x0c\x0e-\x7f]*\Z")


def astring(value: bytes) -> bytes:
    """Encode ``value`` as a quoted string, or as a synchronising literal if it must be."""
    if _QUOTABLE.match(value) and len(value) < 1024:
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(value) + value


def literal(value: bytes, nonsync: bool = False) -> bytes:
    """``value`` as a literal (header plus octets)."""
    return LiteralHeader(len(value), nonsync).encode() + value


def encode_token(token: Token) -> bytes:
    """Serialise a token back (strings quoted or as literal; lists parenthesised)."""
    if isinstance(token, list):
        return b"(" + b" ".join(encode_token(t) for t in token) + b")"
    if isinstance(token, String):
        return astring(bytes(token))
    return bytes(token)


def build_message(prefix: bytes, tokens: list[Token]) -> Message:
    """A :class:`Message` for ``prefix`` followed by ``tokens`` (strings that cannot be
    quoted become synchronising literals, each ending a physical line)."""
    message = Message()
    line = bytearray(prefix)

    def emit(token: Token, first: bool) -> None:
        nonlocal line
        if not first:
            line += b" "
        if isinstance(token, list):
            line += b"("
            for i, sub in enumerate(token):
                emit(sub, i == 0)
            line += b")"
        elif isinstance(token, String) and not (_QUOTABLE.match(token) and len(token) < 1024):
            line += b"{%d}\r\n" % len(token)
            message.lines.append(bytes(line))
            message.literals.append(bytes(token))
            line = bytearray()
        else:
            line += encode_token(token)

    for i, token in enumerate(tokens):
        emit(token, i == 0 and not prefix)
    line += b"\r\n"
    message.lines.append(bytes(line))
    return message
