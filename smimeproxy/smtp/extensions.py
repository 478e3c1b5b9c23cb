"""MAIL and RCPT parameters the gateway understands, without I/O: parsing, checking,
and what is passed on to the next hop.

* SMTPUTF8 (RFC 6531): the ``SMTPUTF8`` keyword on MAIL (no value) allows UTF-8 in
  the addresses of the transaction and in the header fields of the message (RFC 6532).
  Without it a non-ASCII address is refused with ``553 5.6.7`` (RFC 6531 section 3.5,
  the X.6.7 code of RFC 5248's registry). Whether the *message* needs SMTPUTF8 at the
  next hop is :func:`needs_smtputf8`: the client said so and an address or a header
  field is not ASCII (a body in UTF-8 needs only 8BITMIME).
* DSN (RFC 3461): ``RET=FULL|HDRS`` and ``ENVID=xtext`` on MAIL (section 4.3 and 4.4),
  ``NOTIFY=NEVER`` or a comma list of ``SUCCESS``, ``FAILURE``, ``DELAY`` and
  ``ORCPT=addr-type;xtext`` on RCPT (section 4.1 and 4.2). Values are checked for their
  syntax only and kept exactly as received (xtext stays encoded): the gateway does not
  generate notifications, it carries the parameters to the next hop (see
  :mod:`.relay`). Under SMTPUTF8 an ORCPT value may hold UTF-8 (RFC 6533 section 3's
  ``utf-8-addr-unitext``).

A parameter given twice, an unknown parameter value, or a value of the wrong syntax is
``501 5.5.4`` (RFC 3461 section 4, RFC 5321 section 4.2.3); an unknown parameter name
``555 5.5.4`` (RFC 5321 section 4.1.1.11). Not guaranteed: that an ORCPT's address-type
is one IANA registered (any atom is accepted, as RFC 3461 section 4.2 allows).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from smimeproxy.smtp import replies as R
from smimeproxy.smtp.replies import Reply

#: RFC 3461 section 4: xtext = *( xchar / hexchar ); xchar is "!" to "~" except "+" and
#: "="; hexchar is "+" and two upper-case hex digits
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")
#: RFC 5322 atom text (RFC 3461 section 4.2: addr-type = atom)
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
_NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
#: RFC 3461 section 4.4: an ENVID is at most 100 characters
MAX_ENVID = 100
#: RFC 3461 section 4.2: an ORCPT (addr-type, ";" and xtext) at most 500 characters
MAX_ORCPT = 500


@dataclass(frozen=True)
class RecipientParameters:
    """A recipient's DSN parameters as received (None: not given)."""

    notify: str | None = None
    orcpt: str | None = None

    def wire(self, smtputf8: bool) -> bytes:
        """The parameters for RCPT; a UTF-8 ORCPT only in an SMTPUTF8 transaction (else
        it is left out: it is optional, and the next hop would refuse the line)."""
        out = b""
        if self.notify is not None:
            out += b" NOTIFY=" + self.notify.encode("ascii")
        if self.orcpt is not None and (smtputf8 or self.orcpt.isascii()):
            out += b" ORCPT=" + self.orcpt.encode("utf-8")
        return out


_NONE = RecipientParameters()


@dataclass(frozen=True)
class Envelope:
    """What the client asked for on MAIL and RCPT beyond the addresses."""

    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    recipients: Mapping[str, RecipientParameters] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def for_recipient(self, address: str) -> RecipientParameters:
        return self.recipients.get(address, _NONE)

    def dsn_mail(self) -> bytes:
        """The RET and ENVID parameters for MAIL (empty when none were given)."""
        out = b""
        if self.ret is not None:
            out += b" RET=" + self.ret.encode("ascii")
        if self.envid is not None:
            out += b" ENVID=" + self.envid.encode("ascii")
        return out


@dataclass(frozen=True)
class MailParameters:
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    size: int | None = None


def _split(params: str) -> list[tuple[str, str | None]] | Reply:
    seen: set[str] = set()
    out: list[tuple[str, str | None]] = []
    for param in params.split():
        name, eq, value = param.partition("=")
        name = name.upper()
        if name in seen or (eq and not value):
            return R.ARGUMENT_ERROR
        seen.add(name)
        out.append((name, value if eq else None))
    return out


def parse_mail(params: str) -> MailParameters | Reply:
    """The parameters after ``MAIL FROM:<...>``, or the reply refusing them."""
    found = _split(params)
    if isinstance(found, Reply):
        return found
    smtputf8, ret, envid, size = False, None, None, None
    for name, value in found:
        if name == "SIZE":
            if value is None or not value.isdigit() or not value.isascii():
                return R.ARGUMENT_ERROR
            size = int(value)
        elif name == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                return R.ARGUMENT_ERROR
        elif name == "SMTPUTF8":
            if value is not None:  # RFC 6531 section 3.4: a keyword without a value
                return R.ARGUMENT_ERROR
            smtputf8 = True
        elif name == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                return R.ARGUMENT_ERROR
            ret = value.upper()
        elif name == "ENVID":
            if value is None or len(value) > MAX_ENVID or not is_xtext(value):
                return R.ARGUMENT_ERROR
            envid = value
        else:
            return R.UNKNOWN_PARAMETER
    return MailParameters(smtputf8, ret, envid, size)


def parse_rcpt(params: str, smtputf8: bool) -> RecipientParameters | Reply:
    """The parameters after ``RCPT TO:<...>`` (``smtputf8``: the transaction's MAIL
    had SMTPUTF8), or the reply refusing them."""
    found = _split(params)
    if isinstance(found, Reply):
        return found
    notify, orcpt = None, None
    for name, value in found:
        if name == "NOTIFY":
            if value is None or not _notify_ok(value):
                return R.ARGUMENT_ERROR
            notify = value.upper()
        elif name == "ORCPT":
            if value is None or not _orcpt_ok(value, smtputf8):
                return R.ARGUMENT_ERROR
            orcpt = value
        else:
            return R.UNKNOWN_PARAMETER
    return RecipientParameters(notify, orcpt)


def is_xtext(value: str) -> bool:
    return value.isascii() and _XTEXT.fullmatch(value) is not None


def _notify_ok(value: str) -> bool:
    words = value.upper().split(",")
    if words == ["NEVER"]:
        return True
    return len(set(words)) == len(words) and set(words) <= _NOTIFY_WORDS


def _orcpt_ok(value: str, smtputf8: bool) -> bool:
    addr_type, semicolon, address = value.partition(";")
    if not semicolon or not address or len(value) > MAX_ORCPT:
        return False
    if not addr_type.isascii() or _ATOM.fullmatch(addr_type) is None:
        return False
    if is_xtext(address):
        return True
    # RFC 6533 section 3: with SMTPUTF8 the address may be UTF-8 itself (unitext); the
    # characters xtext excludes stay excluded, and no controls or spaces
    if not smtputf8:
        return False
    ascii_part = "".join(c for c in address if c.isascii())
    return is_xtext(ascii_part) and all(c.isprintable() and not c.isspace() for c in address)


def needs_smtputf8(envelope: Envelope, sender: str, recipients: Sequence[str], data: bytes) -> bool:
    """Whether sending this copy on requires SMTPUTF8 at the next hop."""
    if not envelope.smtputf8:
        return False
    if not (sender.isascii() and all(r.isascii() for r in recipients)):
        return True
    return not header_block(data).isascii()


def utf8_refusal(sender: str, recipients: Sequence[str]) -> Reply:
    """The reply when a copy needs SMTPUTF8 and the next hop did not announce it."""
    if sender.isascii() and all(r.isascii() for r in recipients):
        return R.UTF8_HEADERS_NOT_RELAYABLE
    return R.UTF8_NOT_RELAYABLE


def header_block(data: bytes) -> bytes:
    """The header fields of ``data`` (up to the first empty line)."""
    ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
    return data[: min(ends)] if ends else data


__all__ = [
    "Envelope",
    "MailParameters",
    "RecipientParameters",
    "header_block",
    "is_xtext",
    "needs_smtputf8",
    "parse_mail",
    "parse_rcpt",
    "utf8_refusal",
]
