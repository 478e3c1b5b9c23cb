"""The server side of SMTP on the wire, without I/O: bytes in, events out.

Why our own codec and not ``twisted.mail.smtp.ESMTP``: the gateway must decide exactly
where a message ends, because a disagreement between two SMTP hops about that is what
SMTP smuggling (CVE-2023-51766, CVE-2023-51764, CVE-2023-51765 and the SEC Consult
report of December 2023) exploits. Twisted's server splits lines on CRLF but lets bare
LF and bare CR through into the content, and offers no hook to refuse them; it also
buffers the whole message in its own way. Here the rules are ours and tested:

* a command line ends with CRLF only (RFC 5321 section 2.3.8); a bare LF or CR in a
  command line makes it a syntax error (``BadLine``), never two commands;
* in DATA only ``CRLF . CRLF`` ends the message (RFC 5321 section 4.1.1.4): a line
  starts only after CRLF, so ``<LF>.<CR><LF>`` is content, not an end. A bare LF
  or bare CR anywhere in the content taints the message: the codec still finds the real
  end, then reports ``DataEnd(bare_line_end=True)`` and the server refuses it (550), so
  ``\\n.\\n``, ``\\r.\\r``, ``\\r\\n.\\n`` and friends can never become a second message
  at the next hop, whatever that hop's parser believes;
* dot-stuffing is removed (RFC 5321 section 4.5.2); a line longer than
  :data:`MAX_COMMAND_LINE` in command mode is reported, not buffered without bound;
* a command line is UTF-8 (RFC 6531 section 3.3 allows it in MAIL and RCPT once
  SMTPUTF8 is announced); an octet sequence that is not UTF-8, or NUL, makes it a
  ``BadLine``. Which commands may carry non-ASCII is the server's decision. A SASL
  response line stays ASCII (base64).

The content is delivered in chunks (``DataChunk``) so the caller can enforce the size
limit while the message streams in. Not guaranteed: command arguments are not
validated here (see :mod:`smimeproxy.smtp.session`); BDAT/CHUNKING is not implemented
(and not announced).
"""

from __future__ import annotations

from dataclasses import dataclass

#: RFC 5321 section 4.5.3.1.4 says 512 octets for a command line; extensions (SIZE,
#: BODY, SMTPUTF8 ...) make it longer, so allow some room like Postfix (2048).
MAX_COMMAND_LINE = 2048

CRLF = b"\r\n"


@dataclass(frozen=True)
class Command:
    """One command line: the verb upper-cased and the rest as given (without CRLF),
    decoded as UTF-8 (the server refuses non-ASCII where it is not allowed)."""

    verb: str
    argument: str


@dataclass(frozen=True)
class Response:
    """The line after a ``334`` challenge (RFC 4954 section 4): a SASL response in base64
    or ``*``, exactly as sent (without CRLF), never upper-cased or split."""

    line: str


@dataclass(frozen=True)
class BadLine:
    """A command line that cannot be a command: too long, bare CR/LF, NUL, not UTF-8."""

    reason: str


@dataclass(frozen=True)
class DataChunk:
    """Message content (dot-stuffing removed, CRLF line ends kept)."""

    data: bytes


@dataclass(frozen=True)
class DataEnd:
    """The ``CRLF.CRLF`` that ends the content was seen."""

    bare_line_end: bool


Event = Command | Response | BadLine | DataChunk | DataEnd


class ServerCodec:
    """Feed it what the client sent; take the events out one at a time, in order.

    Pull-based so that a server busy with a command (an RCPT lookup, the end of DATA)
    simply stops pulling: pipelined input waits in the buffer, and replies go out in
    command order (RFC 2920). After a ``DATA`` command :meth:`next_event` returns None
    until the server calls :meth:`start_data` (it answered 354: content follows) or
    :meth:`cancel_data` (it refused: commands follow). The codec returns to command mode
    by itself after :class:`DataEnd`.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._data_mode = False
        self._held = False  # a DATA command was returned and not yet answered
        self._bare = False
        self._at_line_start = True
        self._discarding = False  # inside an over-long command line
        self._response = False  # the next line answers a 334 (AUTH)

    @property
    def in_data(self) -> bool:
        return self._data_mode

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into events."""
        return len(self._buffer)

    def receive(self, data: bytes) -> None:
        self._buffer += data

    def discard_buffer(self) -> None:
        """Forget unprocessed input (after STARTTLS: RFC 3207 section 4.2, CVE-2011-0411)."""
        self._buffer.clear()

    def start_data(self) -> None:
        """The server accepted DATA (354): parse what follows as content."""
        self._held = False
        self._data_mode = True
        self._bare = False
        self._at_line_start = True

    def cancel_data(self) -> None:
        """The server refused DATA: what follows is commands again."""
        self._held = False

    def expect_response(self) -> None:
        """The server sent ``334``: the next line is a :class:`Response`, not a command
        (it has the same rules: CRLF only, ASCII, bounded length)."""
        self._response = True

    def next_event(self) -> Event | None:
        """The next event, or None when more input (or a DATA decision) is needed."""
        if self._held:
            return None
        event = self._data_step() if self._data_mode else self._command_step()
        if isinstance(event, Command) and event.verb == "DATA":
            self._held = True
        return event

    def feed(self, data: bytes) -> list[Event]:
        """Receive ``data`` and return every event available now (for tests and fuzzing)."""
        self.receive(data)
        events = []
        while (event := self.next_event()) is not None:
            events.append(event)
        return events

    # -- command mode -------------------------------------------------------------------
    def _command_step(self) -> Event | None:
        buf = self._buffer
        i = buf.find(b"\n")
        if i < 0:
            if len(buf) > MAX_COMMAND_LINE:
                # keep the last byte: it may be the CR of the CRLF to come
                del buf[:-1]
                if not self._discarding:
                    self._discarding = True
                    self._response = False
                    return BadLine("line too long")
            return None
        line = bytes(buf[: i + 1])
        del buf[: i + 1]
        if self._discarding:
            self._discarding = False
            return self._command_step()
        response, self._response = self._response, False
        if len(line) > MAX_COMMAND_LINE:
            return BadLine("line too long")
        if not line.endswith(CRLF) or b"\r" in line[:-2]:
            return BadLine("bare CR or LF in a command line (RFC 5321 2.3.8)")
        text = line[:-2]
        if b"\0" in text or (response and not text.isascii()):
            return BadLine("NUL or non-ASCII octet in a command line")
        try:
            decoded = text.decode("utf-8")
        except UnicodeDecodeError:
            return BadLine("an octet that is not UTF-8 in a command line")
        if response:
            return Response(decoded)
        verb, _, argument = decoded.partition(" ")
        return Command(verb.upper(), argument)

    # -- data mode ----------------------------------------------------------------------
    def _data_step(self) -> Event | None:
        """One event from the content, or None when more input is needed.

        Works line by line (lines end at LF); a line that does not end in CRLF, or has
        a CR before its end, sets the bare-line-end flag. Only a line that is exactly
        ``.`` CRLF at the start of a line ends the content.
        """
        buf = self._buffer
        if not buf:
            return None
        out = bytearray()
        pos = 0
        n = len(buf)
        # fast path: the whole lines before the first one that starts with a dot
        first_dot = buf.find(b"\n.")
        last = buf.rfind(b"\n") if first_dot < 0 else first_dot
        if last >= 0 and not (self._at_line_start and buf[:1] == b"."):
            region = bytes(buf[: last + 1])
            crlf = region.count(CRLF)
            if crlf != region.count(b"\n") or crlf != region.count(b"\r"):
                self._bare = True
            del buf[: last + 1]
            self._at_line_start = region.endswith(CRLF)
            return DataChunk(region)
        while pos < n:
            i = buf.find(b"\n", pos)
            if i < 0:
                # a partial line: pass on what cannot be a terminator or a stuffed dot
                rest = n - pos
                if self._at_line_start and rest < 3 and buf[pos : pos + 1] == b".":
                    break
                if self._at_line_start and buf[pos : pos + 1] == b".":
                    # a stuffed dot (or a bare "." followed by more): drop one dot
                    pos += 1
                    self._at_line_start = False
                # keep a trailing CR back: it may be the start of CRLF
                end = n - 1 if buf[n - 1 : n] == b"\r" else n
                if end > pos:
                    chunk = buf[pos:end]
                    if b"\r" in chunk:
                        self._bare = True
                    out += chunk
                    self._at_line_start = False
                    pos = end
                break
            line_start = self._at_line_start
            line = buf[pos : i + 1]
            if line_start and line == b".\r\n":
                del buf[: i + 1]
                self._data_mode = False
                self._at_line_start = True
                bare = self._bare
                if out:
                    # the terminator comes after this chunk: put it back for next call
                    buf[0:0] = b".\r\n"
                    self._data_mode = True
                    return DataChunk(bytes(out))
                return DataEnd(bare)
            if line_start and line[:1] == b".":
                line = line[1:]
            crlf = line.endswith(CRLF)
            if not crlf or b"\r" in line[:-2]:
                self._bare = True
            out += line
            # only CRLF starts a line: after a bare LF a dot is content, never an end
            # (the "<LF>.<CR><LF>" smuggling variant)
            self._at_line_start = crlf
            pos = i + 1
        del buf[:pos]
        if out:
            return DataChunk(bytes(out))
        return None
