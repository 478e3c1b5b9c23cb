"""The submission listener: SMTP AUTH (RFC 4954) against Dovecot, and sending only as
oneself.

A session of a ``submission_listen`` listener must authenticate before ``MAIL``
(``530 5.7.0``). ``AUTH PLAIN LOGIN`` is announced after STARTTLS only (or on every
connection with ``submission_plaintext = true``, meant for a trusted loopback listener,
like the IMAP proxy's ``plaintext_login``); the gateway checks that the client's messages
are base64 and hands them to Dovecot (:mod:`.dovecot_client`), which holds the
passwords. Replies (RFC 4954 section 6, RFC 3463):

* ``235 2.7.0`` authenticated; ``334`` challenges (for PLAIN without an initial response
  an empty one, for LOGIN Dovecot's ``Username:``/``Password:``);
* ``501 5.7.0`` the client cancelled with ``*``; ``501 5.5.2`` not base64;
  ``504 5.5.4`` a mechanism other than PLAIN and LOGIN; ``538 5.7.11`` AUTH in clear on a
  listener that needs TLS first; ``503 5.5.1`` AUTH again after success, during a mail
  transaction, or on a listener without AUTH;
* ``535 5.7.8`` wrong credentials, after :attr:`Submission.failure_delay` seconds (on
  top of Dovecot's own ``auth_failure_delay``); the :attr:`Submission.max_failures`-th
  failure closes the session with ``421 4.7.0``;
* ``454 4.7.0`` Dovecot is down, slow or has a temporary failure: the client may retry,
  and this never counts as a failure;
* ``553 5.7.1`` ``MAIL FROM`` (or a local address in the From header, which chooses the
  signing key) is not the authenticated user's (:mod:`.sasl` says who may send as whom).

Never logged: the client's SASL messages (they carry the password), in any form.
Not guaranteed: that a user removed from Dovecot mid-session loses the session.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from smimeproxy.smtp import replies as R
from smimeproxy.smtp import sasl
from smimeproxy.smtp.dovecot_auth import Challenge, Refusal, Success
from smimeproxy.smtp.dovecot_client import DovecotAuthClient, Step
from smimeproxy.smtp.replies import Reply
from smimeproxy.sockets import write_now

#: failed AUTH attempts in one session before it is closed (Postfix: smtpd_hard_error_limit)
MAX_FAILURES = 3
#: seconds before a 535 (Dovecot already waits auth_failure_delay, 2 s by default)
FAILURE_DELAY = 1.0

_INVALID = {
    sasl.SYNTAX: R.ARGUMENT_ERROR,
    sasl.UNKNOWN_MECHANISM: R.AUTH_UNKNOWN_MECHANISM,
    sasl.BAD_BASE64: R.AUTH_BAD_BASE64,
    sasl.CANCELLED: R.AUTH_CANCELLED,
}


@dataclass
class Submission:
    """What the sessions of submission listeners share."""

    authenticator: DovecotAuthClient
    #: login -> the addresses it may send as (blocking: runs in the thread pool)
    senders: Callable[[str], frozenset[str]]
    #: offer AUTH without TLS (a trusted loopback listener only)
    plaintext: bool = False
    max_failures: int = MAX_FAILURES
    failure_delay: float = FAILURE_DELAY


def store_senders(store: Any) -> Callable[[str], frozenset[str]]:
    """:attr:`Submission.senders` from the key store's users, aliases and login names."""

    def senders(login: str) -> frozenset[str]:
        user = store.find_user(login) if "\0" not in login else None
        return sasl.allowed_senders(login, user.addresses if user is not None else None)

    return senders


class SubmissionMixin:
    """AUTH for :class:`~smimeproxy.smtp.server.SMTPGatewayProtocol` (see the module
    docstring). The protocol provides ``_reply``, ``_close``, ``_error``, ``_resume``,
    ``codec``, ``helo``, ``tls``, ``sender``, ``busy``, ``closing``, ``transport`` and
    ``s`` (the settings: reactor and thread pool)."""

    _log: Logger
    submission: Submission | None = None
    #: Dovecot's name for the authenticated user, and the addresses it may send as
    auth_user: str | None = None
    auth_senders: frozenset[str] = frozenset()
    _auth_request: int | None = None
    _auth_mechanism = "-"
    _auth_failures = 0

    if TYPE_CHECKING:  # provided by the protocol
        s: Any
        codec: Any
        transport: Any
        helo: str | None
        tls: bool
        sender: str | None
        busy: bool
        closing: bool

        def _reply(self, reply: Reply) -> None: ...
        def _close(self, reply: Reply) -> None: ...
        def _error(self, reply: Reply) -> None: ...
        def _resume(self, _: object) -> None: ...

    # -- hooks the protocol calls ---------------------------------------------------------
    def auth_offered(self) -> bool:
        """Whether EHLO announces AUTH now."""
        sub = self.submission
        return sub is not None and self.auth_user is None and (self.tls or sub.plaintext)

    def auth_mail_refusal(self, sender: str) -> Reply | None:
        """The refusal of ``MAIL FROM:<sender>`` on a submission listener, or None."""
        if self.submission is None:
            return None
        if self.auth_user is None:
            return R.AUTH_REQUIRED
        if not sasl.may_send_as(self.auth_senders, sender):
            self._log.info(
                "smtp.auth_sender_refused user={user} sender={sender}",
                user=self.auth_user,
                sender=sender,
            )
            return R.NOT_OWNED
        return None

    def auth_data_refusal(self, data: bytes) -> Reply | None:
        """The refusal of a message whose From header names someone else's local address."""
        if self.submission is None:
            return None
        found = sasl.foreign_from(data, self.auth_senders, self.s.config.local_domains)
        if found is None:
            return None
        self._log.info(
            "smtp.auth_from_refused user={user} from_={address}", user=self.auth_user, address=found
        )
        return R.FROM_NOT_OWNED

    def auth_reset(self) -> None:
        """Forget the authentication (after STARTTLS: RFC 3207 section 4.2)."""
        self.auth_user = None
        self.auth_senders = frozenset()
        self.auth_abandon()

    def auth_abandon(self) -> None:
        """The session ends or restarts: tell Dovecot to forget an exchange in progress."""
        request, self._auth_request = self._auth_request, None
        if request is not None and self.submission is not None:
            self.submission.authenticator.cancel(request)

    # -- the command ----------------------------------------------------------------------
    def smtp_AUTH(self, arg: str) -> None:
        sub = self.submission
        if sub is None:
            return self._error(R.AUTH_NOT_ENABLED)
        if self.helo is None:
            return self._error(R.NEED_EHLO)
        if self.auth_user is not None:
            return self._error(R.ALREADY_AUTHENTICATED)
        if self.sender is not None:
            return self._error(R.BAD_SEQUENCE)
        if not (self.tls or sub.plaintext):
            return self._error(R.AUTH_NEEDS_TLS)
        start = sasl.parse_auth(arg)
        if isinstance(start, sasl.Invalid):
            return self._error(_INVALID[start.why])
        request, d = sub.authenticator.start(
            start.mechanism,
            secured=True,  # TLS, or a listener the operator declared trusted
            initial=start.initial,
            fields=self._auth_fields(),
        )
        self._auth_request = request
        self._auth_mechanism = start.mechanism
        self.busy = True
        d.addCallback(self._auth_step)
        d.addErrback(self._auth_bug)

    def auth_response(self, line: str) -> None:
        """The client's line after a ``334`` (the codec's :class:`Response`)."""
        sub, request = self.submission, self._auth_request
        if sub is None or request is None:
            return self._error(R.BAD_SEQUENCE)
        answer = sasl.parse_response(line)
        if isinstance(answer, sasl.Invalid):
            self.auth_abandon()
            return self._error(_INVALID[answer.why])
        self.busy = True
        d = sub.authenticator.respond(request, answer)
        d.addCallback(self._auth_step)
        d.addErrback(self._auth_bug)

    def _auth_fields(self) -> dict[str, str]:
        fields = {}
        transport = getattr(self, "transport", None)
        for name, get in (("rip", "getPeer"), ("lip", "getHost")):
            address = getattr(transport, get, lambda: None)()
            if isinstance(address, IPv4Address | IPv6Address):
                fields[name] = address.host
                fields[name[0] + "port"] = str(address.port)
        return fields

    def _auth_step(self, step: Step) -> None:
        if self.closing or self._auth_request != step.request:
            return  # the session went away (its request was cancelled) meanwhile
        if isinstance(step, Challenge):
            self.codec.expect_response()
            write_now(self.transport, R.challenge(step.data))
            return self._resume(None)
        self._auth_request = None
        if isinstance(step, Success):
            return self._auth_success(step.user)
        return self._auth_refused(step)

    def _auth_success(self, user: str) -> None:
        sub = self.submission
        assert sub is not None
        d = deferToThreadPool(self.s.reactor, self.s.threadpool, sub.senders, user)

        def done(senders: frozenset[str]) -> None:
            self.auth_user = user
            self.auth_senders = senders
            self._log.info(
                "smtp.auth_ok user={user} mechanism={mechanism} addresses={count}",
                user=user,
                mechanism=self._auth_mechanism,
                count=len(senders),
            )
            self._reply(R.AUTH_OK)

        def failed(f: Failure) -> None:
            self._log.failure("smtp.auth_lookup_failed user={user}", f, user=user)
            self._reply(R.AUTH_TEMPORARY)

        d.addCallbacks(done, failed)
        d.addBoth(self._resume)

    def _auth_refused(self, refusal: Refusal) -> None:
        sub = self.submission
        assert sub is not None
        self._log.info(
            "smtp.auth_failed user={user} mechanism={mechanism} temporary={temporary} code={code}",
            user=refusal.user or "-",
            mechanism=self._auth_mechanism,
            temporary=refusal.temporary,
            code=refusal.code or "-",
        )
        if refusal.temporary:
            self._reply(R.AUTH_TEMPORARY)
            return self._resume(None)
        self._auth_failures += 1
        last = self._auth_failures >= sub.max_failures

        def answer() -> None:
            if last:
                self._close(R.AUTH_TOO_MANY)
            else:
                self._reply(R.AUTH_FAILED)
            self._resume(None)

        self.s.reactor.callLater(sub.failure_delay, answer)

    def _auth_bug(self, f: Failure) -> None:
        self._log.failure("smtp.auth_bug", f)
        self._auth_request = None
        self._reply(R.AUTH_TEMPORARY)
        self._resume(None)


__all__ = ["FAILURE_DELAY", "MAX_FAILURES", "Submission", "SubmissionMixin", "store_senders"]
