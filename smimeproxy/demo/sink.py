"""The demo's stand-in for the organisation's mail server: an SMTP listener that files
every message for a known recipient into that recipient's Dovecot Maildir.

Dovecot 2.3 delivers over LMTP, and its submission service relays rather than
delivers, while the gateway's next hop speaks SMTP: in production Postfix sits there
(docs/postfix.md). This sink is the few lines that make the demo self-contained. Not
guaranteed: queueing, retries, DSNs, size limits, or any authentication — it is a demo
fixture on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import smtp
from zope.interface import implementer

#: recipient address -> the Maildir (``cur``/``new``/``tmp``) it is filed into
MaildirFor = Callable[[str], "Path | None"]


@implementer(smtp.IMessage)
class _MaildirMessage:
    _log = Logger()
    _serial = 0

    def __init__(self, maildir: Path, own: Callable[[Path], None]):
        self._maildir = maildir
        self._own = own
        self._lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self._lines.append(line)

    def eomReceived(self) -> defer.Deferred[None]:
        _MaildirMessage._serial += 1
        name = f"{time.time_ns()}.P{os.getpid()}Q{_MaildirMessage._serial}.{socket.gethostname()}"
        tmp = self._maildir / "tmp" / name
        for sub in ("tmp", "new", "cur"):
            (self._maildir / sub).mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(b"\n".join(self._lines) + b"\n")
        self._own(self._maildir)
        tmp.rename(self._maildir / "new" / name)  # Maildir: atomic appearance in new/
        self._log.info("demo sink filed a message", event="demo.sink.filed")
        self._lines = []
        return defer.succeed(None)

    def connectionLost(self) -> None:
        self._lines = []


@implementer(smtp.IMessageDelivery)
class _Delivery:
    def __init__(self, maildir_for: MaildirFor, own: Callable[[Path], None]):
        self._maildir_for = maildir_for
        self._own = own

    def receivedHeader(self, helo: object, origin: object, recipients: object) -> None:
        return None

    def validateFrom(self, helo: object, origin: smtp.Address) -> smtp.Address:
        return origin

    def validateTo(self, user: smtp.User) -> Callable[[], _MaildirMessage]:
        maildir = self._maildir_for(str(user.dest).lower())
        if maildir is None:
            raise smtp.SMTPBadRcpt(user)
        return lambda: _MaildirMessage(maildir, self._own)


class MaildirSinkFactory(smtp.SMTPFactory):
    """ESMTP server factory filing mail into Maildirs (see the module docstring)."""

    protocol = smtp.ESMTP

    def __init__(self, maildir_for: MaildirFor, own: Callable[[Path], None]):
        super().__init__()
        self.domain = b"mail.acme.test"
        self._delivery = _Delivery(maildir_for, own)

    def buildProtocol(self, addr: object) -> smtp.ESMTP:
        protocol = super().buildProtocol(addr)
        protocol.delivery = self._delivery
        return protocol
