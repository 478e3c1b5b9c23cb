"""The client side of Dovecot's authentication protocol, without I/O: bytes in, events out.

This is the SASL backend Postfix uses with ``smtpd_sasl_type = dovecot``: the gateway
keeps no passwords, it hands the client's SASL messages to Dovecot's ``auth-client``
socket and passes Dovecot's challenges back. Reference: "Dovecot Authentication
Protocol" (doc.dovecot.org, developers/design/auth_protocol; v1.2 is what Dovecot 2.3
speaks). One connection carries many requests, told apart by a number the client picks.

The dialogue::

    C: VERSION 1 2 / CPID <pid>
    S: VERSION 1 2 / MECH <name> [<flags>] ... / SPID / CUID / COOKIE / DONE
    C: AUTH <id> <mech> service=smtp [secured] [resp=<base64>]
    S: CONT <id> <base64>       C: CONT <id> <base64>      (as often as the mechanism needs)
    S: OK <id> user=<name> | FAIL <id> [user=<name>] [code=temp_fail] [reason=<text>]
    C: CANCEL <id>              (the SMTP client gave up with "*" or went away)

Lines end with LF and fields are separated by TAB; values use Dovecot's tab-escaping
(``\\x01`` then ``1``, ``t``, ``r``, ``n``, ``0``). Base64 data is checked to be base64
before it is put on a line, so a client's response can never add a field (``resp=`` must
be the last field for the same reason).

Decisions written down here:

* An ``OK`` carrying ``nologin`` or ``proxy`` is a refusal: the credentials were right but
  this user must not be given access here (a passdb extra field); its ``reason=`` is kept.
* An ``OK`` without ``user=`` is a refusal too: the gateway must know whose mail it takes.
* ``FAIL`` with ``code=temp_fail`` is temporary (SMTP 454), every other ``FAIL`` is a
  wrong credential or a disabled user (535).
* A server whose major version is not 1, an over-long line or a line without a request
  number raises :class:`AuthProtocolError`: the caller drops the connection.

Not guaranteed: that ``reason=`` texts are fit for the SMTP client (the caller decides
whether to show them); the ``MECH`` flags are parsed but not interpreted.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass

from smimeproxy.errors import UpstreamError

#: the protocol version this client speaks (Dovecot 2.3 answers 1.2; only the major counts)
MAJOR_VERSION = 1
MINOR_VERSION = 2
#: Dovecot expects lines to fit in 16384 bytes; allow some room before calling it broken
MAX_LINE = 65536
#: request numbers are 32-bit and never 0
MAX_REQUEST_ID = 2**32 - 1

_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}\Z")
_FIELD_NAME = re.compile(r"[a-z_][a-z0-9_-]*\Z")
_ESCAPE = {"\x01": "\x011", "\t": "\x01t", "\r": "\x01r", "\n": "\x01n", "\0": "\x010"}
_UNESCAPE = {"1": "\x01", "t": "\t", "r": "\r", "n": "\n", "l": "\n", "0": "\0"}


class AuthProtocolError(UpstreamError):
    """Dovecot's auth service said something this client cannot follow."""


@dataclass(frozen=True)
class Ready:
    """The server finished its handshake (``DONE``): requests may be sent."""

    mechanisms: tuple[str, ...]


@dataclass(frozen=True)
class Challenge:
    """``CONT``: pass ``data`` (base64, possibly empty) to the SMTP client as ``334``."""

    request: int
    data: str


@dataclass(frozen=True)
class Success:
    """``OK``: the credentials are right and ``user`` (Dovecot's name for them) may log in."""

    request: int
    user: str


@dataclass(frozen=True)
class Refusal:
    """``FAIL`` (or an ``OK`` that does not grant access)."""

    request: int
    user: str | None
    temporary: bool
    reason: str | None = None
    code: str | None = None


Event = Ready | Challenge | Success | Refusal


def tab_escape(value: str) -> str:
    """Dovecot's tab-escaping of one field value."""
    return "".join(_ESCAPE.get(c, c) for c in value)


def tab_unescape(value: str) -> str:
    """The inverse of :func:`tab_escape`; an escape before an unknown letter is dropped."""
    if "\x01" not in value:
        return value
    out = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "\x01" and i + 1 < len(value):
            out.append(_UNESCAPE.get(value[i + 1], value[i + 1]))
            i += 2
            continue
        if c != "\x01":
            out.append(c)
        i += 1
    return "".join(out)


def is_base64(data: str) -> bool:
    """True for canonical-looking base64 (alphabet, padding, length a multiple of 4)."""
    if len(data) % 4 or not _BASE64.match(data):
        return False
    try:
        binascii.a2b_base64(data.encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _options(fields: list[str]) -> dict[str, str | None]:
    """``name=value`` and bare flags; the first occurrence of a name wins."""
    out: dict[str, str | None] = {}
    for item in fields:
        name, eq, value = item.partition("=")
        out.setdefault(name, tab_unescape(value) if eq else None)
    return out


class AuthClientCodec:
    """Dovecot's auth protocol for one connection.

    :meth:`hello` is what to send right after connecting; feed what the server sends to
    :meth:`receive` and act on the events; :meth:`start`, :meth:`respond` and
    :meth:`cancel` give the lines for requests. The codec does not number requests nor
    remember which are open: that is the caller's (one connection's) business.
    """

    def __init__(self, pid: int):
        self.pid = pid
        self.ready = False
        self.mechanisms: list[str] = []
        self.server_pid: str | None = None
        self._version_seen = False
        self._buffer = bytearray()

    def hello(self) -> bytes:
        """The client handshake (VERSION and CPID, sent together)."""
        return f"VERSION\t{MAJOR_VERSION}\t{MINOR_VERSION}\nCPID\t{self.pid}\n".encode("ascii")

    # -- requests ---------------------------------------------------------------------------
    def start(
        self,
        request: int,
        mechanism: str,
        *,
        service: str = "smtp",
        secured: bool = False,
        initial: str | None = None,
        fields: Mapping[str, str] | None = None,
    ) -> bytes:
        """``AUTH``: ``initial`` is the client's initial response in base64 (``""`` for an
        empty one, None for none); ``fields`` adds ``name=value`` fields (``rip``,
        ``lip``, ``session`` ...)."""
        _check_request(request)
        if not mechanism.isascii() or not mechanism.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"not a SASL mechanism name: {mechanism!r}")
        parts = ["AUTH", str(request), mechanism.upper(), f"service={tab_escape(service)}"]
        if secured:
            parts.append("secured")
        for name, value in (fields or {}).items():
            if not _FIELD_NAME.match(name) or name in ("resp", "service", "secured"):
                raise ValueError(f"not an AUTH field this client may set: {name!r}")
            parts.append(f"{name}={tab_escape(value)}")
        if initial is not None:
            parts.append(f"resp={_checked_base64(initial)}")  # must be the last field
        return ("\t".join(parts) + "\n").encode("ascii", "backslashreplace")

    def respond(self, request: int, data: str) -> bytes:
        """``CONT``: the client's response (base64) to a challenge."""
        _check_request(request)
        return f"CONT\t{request}\t{_checked_base64(data)}\n".encode("ascii")

    def cancel(self, request: int) -> bytes:
        """``CANCEL``: forget a request (the SMTP client aborted or disconnected)."""
        _check_request(request)
        return f"CANCEL\t{request}\n".encode("ascii")

    # -- what the server says ---------------------------------------------------------------
    def receive(self, data: bytes) -> list[Event]:
        """Every event the bytes complete (raises :class:`AuthProtocolError`)."""
        self._buffer += data
        events: list[Event] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE:
                    raise AuthProtocolError("auth server line too long")
                return events
            raw = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if len(raw) > MAX_LINE:
                raise AuthProtocolError("auth server line too long")
            event = self._line(raw.decode("utf-8", "replace").rstrip("\r"))
            if event is not None:
                events.append(event)

    def _line(self, line: str) -> Event | None:
        fields = line.split("\t")
        command = fields[0]
        if command == "VERSION":
            if len(fields) < 2 or fields[1] != str(MAJOR_VERSION):
                raise AuthProtocolError(f"auth server speaks protocol version {fields[1:2]}")
            self._version_seen = True
            return None
        if not self._version_seen:
            raise AuthProtocolError(f"auth server sent {command!r} before VERSION")
        if command == "MECH" and len(fields) >= 2:
            self.mechanisms.append(fields[1].upper())
            return None
        if command == "SPID" and len(fields) >= 2:
            self.server_pid = fields[1]
            return None
        if command == "DONE":
            self.ready = True
            return Ready(tuple(self.mechanisms))
        if command in ("OK", "FAIL", "CONT"):
            if not self.ready:
                raise AuthProtocolError(f"auth server sent {command} before DONE")
            if len(fields) < 2 or not fields[1].isdigit():
                raise AuthProtocolError(f"auth server sent {command} without a request number")
            request = int(fields[1])
            if command == "CONT":
                data = fields[2] if len(fields) > 2 else ""
                if not is_base64(data):
                    raise AuthProtocolError("auth server sent a challenge that is not base64")
                return Challenge(request, data)
            options = _options(fields[2:])
            user = options.get("user") or None
            if command == "OK":
                if "nologin" in options or "proxy" in options:
                    return Refusal(request, user, False, options.get("reason"), "nologin")
                if user is None:
                    return Refusal(request, None, False, None, "no_user")
                return Success(request, user)
            code = options.get("code")
            temporary = code == "temp_fail" or "temp" in options
            return Refusal(request, user, temporary, options.get("reason"), code)
        return None  # COOKIE, CUID and what later versions add: not needed here


def _check_request(request: int) -> None:
    if not 0 < request <= MAX_REQUEST_ID:
        raise ValueError(f"request number out of range: {request}")


def _checked_base64(data: str) -> str:
    if not is_base64(data):
        raise ValueError("not base64")  # never echo the data: it may be a password
    return data


__all__ = [
    "AuthClientCodec",
    "AuthProtocolError",
    "Challenge",
    "Event",
    "Ready",
    "Refusal",
    "Success",
    "is_base64",
    "tab_escape",
    "tab_unescape",
]
