"""``twistd smimeproxy --config FILE``: every face the configuration enables."""

from twisted.application.service import ServiceMaker

smimeproxy = ServiceMaker(
    "smimeproxy",
    "smimeproxy.tap",
    "Gateway-level S/MIME: SMTP gateway, IMAP proxy, archive and certificate directory.",
    "smimeproxy",
)
