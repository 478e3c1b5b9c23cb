"""The SMTP gateway (issue 4): sign and encrypt outbound, decrypt and verify inbound.

Layout: :mod:`.codec` (the wire, sans-I/O), :mod:`.replies` (every reply),
:mod:`.extensions` (SMTPUTF8 and DSN parameters, sans-I/O),
:mod:`.transform` (policy and the engine, blocking), :mod:`.relay` (the next hop),
:mod:`.server` (the Twisted protocol), :mod:`.service` (assembly: ``make_service``).
Submission (AUTH before MAIL): :mod:`.submission` (the session's side), :mod:`.sasl`
(RFC 4954 parsing, who may send as whom), :mod:`.dovecot_auth` (Dovecot's auth protocol,
sans-I/O) and :mod:`.dovecot_client` (its Twisted client).
"""

from smimeproxy.smtp.service import make_service

__all__ = ["make_service"]
