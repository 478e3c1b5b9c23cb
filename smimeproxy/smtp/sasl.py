"""SMTP AUTH (RFC 4954) on the gateway's side, without I/O: what a command or a client
response means, and which addresses an authenticated user may send as.

The mechanisms themselves are Dovecot's (:mod:`.dovecot_auth`): the gateway only checks
that what the client sent is base64 and passes it on, so it never sees a password it
would have to decode. PLAIN (RFC 4616) and LOGIN are offered; both send the password, so
the server offers them only over TLS (or on a listener configured as trusted).

Who may send as whom (the session asks this at ``MAIL FROM`` and at the end of DATA):

* the addresses of the key store user the login belongs to (primary address and
  aliases; :meth:`SyncStore.find_user` finds a user by login name or address), plus the
  login itself when it is an address;
* a login that is no key store user may send only as itself;
* never the null reverse-path ``<>``: a submission client has no business sending
  bounces, and an empty sender would let the From header choose the signing key;
* the From header of the message: every *local* address in it must be one of the above,
  because the gateway signs with the key of a local From address
  (:meth:`MessageTransform._signer`); a non-local From is signed (if at all) with the
  envelope sender's key, which is already checked.

Not guaranteed: anything about the header's other fields (Sender, Reply-To are the
user's business); that the login's user still exists when the message is sealed.
"""

from __future__ import annotations

import email.utils
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from smimeproxy.pki.validation import a_label_domain as ascii_domain
from smimeproxy.smime import mime
from smimeproxy.smtp.dovecot_auth import is_base64

#: what EHLO announces, in this order (RFC 4954 section 3)
MECHANISMS = ("PLAIN", "LOGIN")

#: why an AUTH command or response is refused (the server maps these to replies)
SYNTAX = "syntax"  # 501 5.5.4
UNKNOWN_MECHANISM = "mechanism"  # 504 5.5.4
BAD_BASE64 = "base64"  # 501 5.5.2
CANCELLED = "cancelled"  # 501 5.7.0 (the client sent "*")


@dataclass(frozen=True)
class AuthStart:
    """``AUTH <mechanism> [<initial response>]``: ``initial`` is base64, ``""`` for ``=``."""

    mechanism: str
    initial: str | None


@dataclass(frozen=True)
class Invalid:
    """An AUTH command or response that ends the exchange; ``why`` is one of the above."""

    why: str


def parse_auth(argument: str) -> AuthStart | Invalid:
    """The argument of an AUTH command (RFC 4954 section 4)."""
    parts = argument.split(" ")
    if not 1 <= len(parts) <= 2 or not parts[0]:
        return Invalid(SYNTAX)
    mechanism = parts[0].upper()
    if mechanism not in MECHANISMS:
        return Invalid(UNKNOWN_MECHANISM)
    if len(parts) == 1:
        return AuthStart(mechanism, None)
    initial = parts[1]
    if initial == "=":
        return AuthStart(mechanism, "")
    if not initial or not is_base64(initial):
        return Invalid(BAD_BASE64)
    return AuthStart(mechanism, initial)


def parse_response(line: str) -> str | Invalid:
    """A client's answer to a ``334`` challenge: base64 (maybe empty), or why not."""
    if line == "*":
        return Invalid(CANCELLED)
    if not is_base64(line):
        return Invalid(BAD_BASE64)
    return line


def _compared(address: str) -> str:
    """``address`` as compared here: lower-case, its domain in A-labels, so that a user
    may write their own internationalised domain either way."""
    local, at, domain = address.strip().lower().rpartition("@")
    return f"{local}@{ascii_domain(domain)}" if at else domain


def allowed_senders(login: str, user_addresses: Iterable[str] | None) -> frozenset[str]:
    """The addresses ``login`` may send as, as :func:`may_send_as` compares them
    (``user_addresses``: those of the key store user the login belongs to, None when it
    belongs to none)."""
    own = {_compared(login)} if "@" in login else set()
    return frozenset(own | {_compared(a) for a in user_addresses or ()})


def may_send_as(allowed: frozenset[str], address: str) -> bool:
    """True when the reverse-path ``address`` is one of ``allowed`` (never for ``<>``)."""
    return bool(address) and _compared(address) in allowed


def foreign_from(data: bytes, allowed: frozenset[str], local_domains: Sequence[str]) -> str | None:
    """The first local From address of the message that is not in ``allowed``, else None.

    Only the header is read. A From header that cannot be parsed yields no address here;
    the transform then signs with the envelope sender's key (checked at MAIL FROM).
    """
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[: end + 4]
    # the engine's own header reader, as the transform uses to choose the signing key
    # (RFC 6532: a header field may be UTF-8)
    values = mime.parse_entity(head).get_all("From")
    domains = {ascii_domain(d) for d in local_domains}
    for _, address in email.utils.getaddresses(values):
        address = address.strip().lower()
        domain = ascii_domain(address.rpartition("@")[2])
        if address and domain in domains and _compared(address) not in allowed:
            return address
    return None


__all__ = [
    "BAD_BASE64",
    "CANCELLED",
    "MECHANISMS",
    "SYNTAX",
    "UNKNOWN_MECHANISM",
    "AuthStart",
    "Invalid",
    "allowed_senders",
    "foreign_from",
    "may_send_as",
    "parse_auth",
    "parse_response",
]
