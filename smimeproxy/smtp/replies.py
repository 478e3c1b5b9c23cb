"""Every reply the gateway gives, in one table (like aiosmtpd's ``statuscodes.py``).

Codes are RFC 5321 section 4.2 (AUTH: RFC 4954 section 6; SMTPUTF8: RFC 6531); enhanced status codes
RFC 3463 (and the registry of RFC 5248). A reply is a code and one or more text lines;
:func:`render` puts them on the wire with the continuation markers of RFC 5321
section 4.2.1.

Not guaranteed: texts are for humans; operators' scripts should match codes only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """An SMTP reply: ``code`` and its text lines (the enhanced code starts the text)."""

    code: int
    text: str

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def positive(self) -> bool:
        return self.code < 400

    def lines(self) -> list[str]:
        return self.text.split("\n") or [""]


@functools.lru_cache(maxsize=512)
def render(reply: Reply) -> bytes:
    """The reply on the wire; texts are reduced to printable ASCII (they may quote peers)."""
    lines = [_clean(line) for line in reply.lines()]
    out = []
    for i, line in enumerate(lines):
        sep = " " if i == len(lines) - 1 else "-"
        out.append(f"{reply.code}{sep}{line}".rstrip() + "\r\n")
    return "".join(out).encode("ascii")


def challenge(data: str) -> bytes:
    """A ``334`` continuation of AUTH (RFC 4954 section 4: ``"334" SP [base64]``): unlike
    :func:`render` it keeps the space when the challenge is empty. ``data`` is base64
    (the Dovecot codec checked it)."""
    return b"334 " + data.encode("ascii") + b"\r\n"


def _clean(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:480]


OK = Reply(250, "2.0.0 OK")
SENDER_OK = Reply(250, "2.1.0 Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5 Recipient OK")
RESET_OK = Reply(250, "2.0.0 Reset")
NOOP_OK = Reply(250, "2.0.0 OK")
VRFY_NO = Reply(252, "2.5.0 Cannot VRFY; send some mail and it will be tried")
START_DATA = Reply(354, "End data with <CR><LF>.<CR><LF>")
READY_TLS = Reply(220, "2.0.0 Ready to start TLS")
BYE = Reply(221, "2.0.0 Bye")
AUTH_OK = Reply(235, "2.7.0 Authentication successful")

SHUTTING_DOWN = Reply(421, "4.3.2 Service shutting down, try again later")
IDLE_TIMEOUT = Reply(421, "4.4.2 Idle for too long, closing connection")
TOO_MANY_ERRORS = Reply(421, "4.7.0 Too many errors, closing connection")
LOCAL_ERROR = Reply(451, "4.3.0 Local error in processing, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3 Too many recipients")
TLS_UNAVAILABLE = Reply(454, "4.7.0 TLS not available")
AUTH_TEMPORARY = Reply(454, "4.7.0 Temporary authentication failure")
AUTH_TOO_MANY = Reply(421, "4.7.0 Too many failed authentication attempts, closing connection")

SYNTAX_ERROR = Reply(500, "5.5.2 Syntax error, command unrecognised")
LINE_TOO_LONG = Reply(500, "5.5.6 Line too long")
BAD_LINE = Reply(500, "5.5.2 Bare CR or LF, NUL or 8-bit octet in a command line")
ARGUMENT_ERROR = Reply(501, "5.5.4 Syntax error in parameters or arguments")
BAD_ADDRESS = Reply(501, "5.1.3 Bad address syntax")
NOT_IMPLEMENTED = Reply(502, "5.5.1 Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1 Bad sequence of commands")
NEED_MAIL = Reply(503, "5.5.1 Need MAIL command first")
NEED_RCPT = Reply(503, "5.5.1 Need RCPT command first")
NEED_EHLO = Reply(503, "5.5.1 Say EHLO or HELO first")
ALREADY_TLS = Reply(503, "5.5.1 TLS already active")
UNKNOWN_PARAMETER = Reply(555, "5.5.4 MAIL FROM/RCPT TO parameter not recognised")
TOO_BIG = Reply(552, "5.3.4 Message size exceeds the fixed limit")
BARE_LINE_END = Reply(550, "5.5.2 Bare CR or LF in the message content refused (RFC 5321 2.3.8)")
TLS_REQUIRED = Reply(530, "5.7.0 Must issue a STARTTLS command first")
AUTH_CANCELLED = Reply(501, "5.7.0 Authentication cancelled")
AUTH_BAD_BASE64 = Reply(501, "5.5.2 Cannot decode the base64 response")
AUTH_NOT_ENABLED = Reply(503, "5.5.1 Authentication not enabled")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1 Already authenticated")
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4 Unrecognized authentication type")
AUTH_REQUIRED = Reply(530, "5.7.0 Authentication required")
AUTH_FAILED = Reply(535, "5.7.8 Authentication credentials invalid")
AUTH_NEEDS_TLS = Reply(538, "5.7.11 Encryption required for requested authentication mechanism")
#: RFC 6531 section 3.5 and RFC 5248's X.6.7: a non-ASCII address without SMTPUTF8
NON_ASCII_ADDRESS = Reply(553, "5.6.7 Non-ASCII address requires the SMTPUTF8 parameter on MAIL")
#: RFC 6531 section 3.2: a message that needs SMTPUTF8 is not sent to a next hop that
#: does not announce it; a relaying MTA refuses it in the transaction (X.6.7 addresses,
#: X.6.9 UTF-8 header fields)
UTF8_NOT_RELAYABLE = Reply(
    553, "5.6.7 Non-ASCII addresses not permitted: the next hop does not support SMTPUTF8"
)
UTF8_HEADERS_NOT_RELAYABLE = Reply(
    554, "5.6.9 UTF-8 header fields cannot be transferred: the next hop does not support SMTPUTF8"
)
NOT_OWNED = Reply(553, "5.7.1 Sender address not owned by the authenticated user")
FROM_NOT_OWNED = Reply(550, "5.7.1 From address not owned by the authenticated user")
