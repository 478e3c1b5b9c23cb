"""What the gateway does to one message: the copies it sends on, or why it refuses.

Blocking (key store reads and CMS work through :class:`MessageProcessor`): the server
calls it in a thread pool. No Twisted and no sockets here, so it is tested with plain
bytes.

Per recipient the direction comes from the configured local domains: *outbound*
(sender local, recipient elsewhere), *inbound* (recipient local, sender elsewhere),
*internal* (both local: ``internal_policy``) and *transit* (neither: passed on). The
recipients that need the same treatment share one copy; recipients that need
different treatment get separate copies (one next-hop transaction each). Inbound
encrypted mail gets one copy per local recipient, opened with that recipient's keys
only (key isolation: Bob's key never opens Alice's copy).

Decisions written down here:

* ``keep-encrypted``: the body is passed on byte for byte; only the status headers
  (``Authentication-Results``, ``X-SMIMEProxy-*``) are added, for every message in that
  mode, so the reader's client sees the verdict and the IMAP proxy decrypts later.
* ``encrypt-at-rest``: plaintext inbound mail is opened (verified, footer) and then
  encrypted to the recipient alone; mail that arrived encrypted is stored as it came
  (with the status headers). A recipient without a certificate gets the opened message
  with a status header saying it is *not* encrypted at rest: refusing inbound mail for a
  local configuration gap would lose more than it protects.
* The force-encryption keyword is matched case-insensitively in the Subject and left
  there (removing it would change a header the sender may have signed already).
* Look-alike status headers are removed from every message on entry, in every
  direction, before anything else.
* Internationalised domains (RFC 5890): a domain is compared in its A-label form, so a
  local domain, policy or storage key written as ``xn--fsqu00a.xn--0zwm56d`` in the
  configuration matches an address at ``例子.测试`` and the other way round. Key store
  lookups use the form the store holds certificates under (:func:`store_address`).
* A message the engine cannot process is relayed unchanged with an ``X-SMIMEProxy-Status``
  header, never dropped; except under ``must-encrypt``, where it is refused rather than
  sent in clear. A key store failure is temporary (451): the sending MTA retries.
"""

from __future__ import annotations

import email.utils
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

from twisted.logger import Logger

from smimeproxy.bugs import log_bug
from smimeproxy.config import OUTBOUND_POLICIES, SMTPConfig
from smimeproxy.errors import KeyNotFound, KeystoreError, SMIMEProxyError
from smimeproxy.pki.validation import a_label_domain as ascii_domain
from smimeproxy.pki.validation import u_label_domain as unicode_domain
from smimeproxy.processing import MessageProcessor, RecipientCertificate
from smimeproxy.smime import mime
from smimeproxy.smime.authresults import (
    AUTHENTICATION_RESULTS,
    DECRYPTION_HEADER,
    STATUS_HEADER,
    STATUS_HEADER_PREFIX,
    comment_text,
    strip_lookalikes,
)
from smimeproxy.smime.opener import is_pkcs7_mime
from smimeproxy.smtp.replies import Reply

OUTBOUND = "outbound"
INBOUND = "inbound"
INTERNAL = "internal"
TRANSIT = "transit"

#: the smime-type values of an encrypted root (RFC 8551 section 3.2.2)
_ENCRYPTED_TYPES = ("enveloped-data", "authenveloped-data")


@dataclass(frozen=True)
class Copy:
    """One message to send on, to ``recipients``, and what was done to make it."""

    recipients: tuple[str, ...]
    data: bytes
    direction: str
    action: str
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TransformResult:
    """The copies to send, or the reply refusing the whole message."""

    copies: tuple[Copy, ...] = ()
    refusal: Reply | None = None


def domain_of(address: str) -> str:
    """The domain of ``address`` as compared (:func:`ascii_domain`)."""
    return ascii_domain(address.rpartition("@")[2])


def store_address(address: str) -> str:
    """``address`` as the key store holds it (:func:`smimeproxy.keystore.certificates.normalise`
    then compares it). An ASCII local part gets an A-label domain, the form a
    certificate's rfc822Name carries (RFC 5280 section 7.5, RFC 8398 section 3): the
    store only lower-cases ASCII addresses. A UTF-8 local part is an SmtpUTF8Mailbox
    (RFC 8398), which the store reads from certificates and keys with the local part
    exact and the domain in U-labels, whichever form either side wrote it in; the
    U-labels here only say so."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address
    if local.isascii():
        return f"{local}@{ascii_domain(domain)}"
    return f"{local}@{unicode_domain(domain)}"


@functools.lru_cache(maxsize=64)
def _local_set(local_domains: tuple[str, ...]) -> frozenset[str]:
    return frozenset(ascii_domain(d) for d in local_domains)


def is_local(address: str, local_domains: Sequence[str]) -> bool:
    return bool(address) and domain_of(address) in _local_set(tuple(local_domains))


def _forms(address: str) -> tuple[str, str]:
    """``address`` with its domain in A-labels and in U-labels."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, address
    return f"{local}@{ascii_domain(domain)}", f"{local}@{unicode_domain(domain)}"


def policy_for(config: SMTPConfig, sender: str, recipient: str) -> str:
    """:meth:`SMTPConfig.policy_for` whichever form (A-labels or U-labels) the
    configuration wrote a domain in. Not guaranteed: an override equal to the default
    policy for one form loses to a stricter override found for the other form."""
    if sender.isascii() and recipient.isascii() and "xn--" not in sender + recipient:
        return config.policy_for(sender, recipient)
    (s_ascii, s_unicode), (r_ascii, r_unicode) = _forms(sender), _forms(recipient)
    found = {
        config.policy_for(sender, recipient),
        config.policy_for(s_ascii, r_ascii),
        config.policy_for(s_unicode, r_unicode),
    }
    overrides = found - {config.outbound_policy} or found
    return min(overrides, key=OUTBOUND_POLICIES.index)


def storage_for(config: SMTPConfig, domain: str) -> str:
    """:meth:`SMTPConfig.storage_for` whichever form the configuration wrote it in."""
    table = config.inbound_storage_by_domain
    for form in (domain.lower(), ascii_domain(domain), unicode_domain(domain)):
        if form in table:
            return table[form]
    return config.inbound_storage


def direction_of(sender: str, recipient: str, local_domains: Sequence[str]) -> str:
    sender_local = is_local(sender, local_domains)
    if is_local(recipient, local_domains):
        return INTERNAL if sender_local else INBOUND
    return OUTBOUND if sender_local else TRANSIT


def strip_status_headers(data: bytes, authserv_id: str) -> tuple[bytes, list[str]]:
    """``data`` without look-alikes of our status headers; only the header block is
    parsed (a 30 MB body is not copied around more than once)."""
    data, _, removed = _strip(data, authserv_id)
    return data, removed


def _strip(data: bytes, authserv_id: str) -> tuple[bytes, mime.Entity, list[str]]:
    """(data without look-alikes, its parsed header block, the names removed)."""
    end = _header_end(data)
    head = mime.parse_entity(data[:end])
    consumed = len(head.header_bytes())  # header fields start at offset 0
    removed = strip_lookalikes(head, authserv_id)
    if not removed:
        return data, head, []
    return head.header_bytes() + data[consumed:], head, removed


def _header_end(data: bytes) -> int:
    """Offset just after the empty line ending the header block (or the length)."""
    candidates = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
    if not candidates:
        return len(data)
    i = min(candidates)
    return i + (4 if data[i : i + 4] == b"\r\n\r\n" else 2)


DECRYPTION_KEY = DECRYPTION_HEADER.lower()


def add_status(data: bytes, text: str) -> bytes:
    """Put ``X-SMIMEProxy-Status: text`` at the top of the message."""
    eol = mime.detect_eol(data)
    return f"{STATUS_HEADER}: {comment_text(text)}".encode("ascii") + eol + data


def _headers(data: bytes) -> mime.Entity:
    return mime.parse_entity(data[: _header_end(data)])


def _subject_has(head: mime.Entity, keyword: str | None) -> bool:
    if not keyword:
        return False
    return any(keyword.casefold() in s.casefold() for s in head.get_all("Subject"))


def _is_encrypted(head: mime.Entity) -> bool:
    if not is_pkcs7_mime(head):
        return False
    smime_type = head.content_type()[1].get("smime-type", "").lower()
    # without smime-type the name or the content decides: treat as encrypted (opened per
    # recipient), which is never wrong, only slower
    return smime_type in _ENCRYPTED_TYPES or not smime_type


def _from_address(head: mime.Entity) -> str | None:
    values = head.get_all("From")
    if len(values) != 1:
        return None
    found = [a for _, a in email.utils.getaddresses(values) if a]
    return found[0].lower() if len(found) == 1 else None


class MessageTransform:
    """Applies the configured policy to messages (blocking; thread-safe)."""

    _log = Logger()

    def __init__(self, processor: MessageProcessor, config: SMTPConfig):
        self.processor = processor
        self.config = config
        self.authserv_id = config.authserv_id or processor.settings.authserv_id

    def direction(self, sender: str, recipient: str) -> str:
        """inbound, outbound, internal or transit, from the configured local domains."""
        return direction_of(sender, recipient, self.config.local_domains)

    # -- at RCPT time -------------------------------------------------------------------
    def needs_recipient_check(self, sender: str, recipient: str) -> bool:
        """Whether :meth:`check_recipient` has to look in the store (cheap, no I/O)."""
        return (
            direction_of(sender, recipient, self.config.local_domains) == OUTBOUND
            and policy_for(self.config, sender, recipient) == "must-encrypt"
        )

    def check_recipient(self, sender: str, recipient: str) -> Reply | None:
        """A 5xx for a must-encrypt recipient without a usable certificate, else None."""
        if not self.needs_recipient_check(sender, recipient):
            return None
        found = self.processor.certificate_for(store_address(recipient))
        if found.target is not None:
            return None
        return _must_encrypt_refusal([(recipient, found.reason)])

    # -- at end of DATA -----------------------------------------------------------------
    def engine_free(self, sender: str, recipients: Sequence[str]) -> bool:
        """True when no recipient's copy needs the engine or the store (only look-alike
        headers are removed): cheap enough to run without a thread hop."""
        if self.config.force_encrypt_keyword:
            return all(
                direction_of(sender, r, self.config.local_domains) == TRANSIT for r in recipients
            )
        for rcpt in recipients:
            direction = direction_of(sender, rcpt, self.config.local_domains)
            if direction == INBOUND:
                return False
            if direction == INTERNAL and self.config.internal_policy != "pass-through":
                return False
            if direction == OUTBOUND and policy_for(self.config, sender, rcpt) != "pass-through":
                return False
        return True

    def transform(self, sender: str, recipients: Sequence[str], data: bytes) -> TransformResult:
        data, head, removed = _strip(data, self.authserv_id)
        if removed:
            self._log.info("smtp.status_headers_removed count={count}", count=len(removed))
        groups: dict[str, list[str]] = {}
        for rcpt in recipients:
            groups.setdefault(direction_of(sender, rcpt, self.config.local_domains), []).append(
                rcpt
            )
        copies: list[Copy] = []
        if TRANSIT in groups:
            copies.append(Copy(tuple(groups[TRANSIT]), data, TRANSIT, "pass"))
        for direction in (OUTBOUND, INTERNAL):
            if direction in groups:
                result = self._outbound(sender, groups[direction], data, head, direction)
                if result.refusal is not None:
                    return result
                copies.extend(result.copies)
        if INBOUND in groups:
            copies.extend(self._inbound(groups[INBOUND], data, head))
        return TransformResult(tuple(copies))

    # -- outbound and internal ----------------------------------------------------------
    def _outbound(
        self,
        sender: str,
        recipients: list[str],
        data: bytes,
        head: mime.Entity,
        direction: str,
    ) -> TransformResult:
        forced = _subject_has(head, self.config.force_encrypt_keyword)
        policies: dict[str, str] = {}
        for rcpt in recipients:
            if forced:
                policies[rcpt] = "must-encrypt"
            elif direction == INTERNAL:
                policies[rcpt] = self.config.internal_policy
            else:
                policies[rcpt] = policy_for(self.config, sender, rcpt)
        signer = self._signer(head, sender)
        must = {r for r, p in policies.items() if p == "must-encrypt"}
        wanting = [r for r, p in policies.items() if p in ("must-encrypt", "encrypt-if-possible")]
        groups: dict[str, list[str]] = {
            "pass": [r for r, p in policies.items() if p == "pass-through"],
            "sign": [r for r, p in policies.items() if p == "sign-only"],
            "sign+encrypt": [],
        }
        copies: list[Copy] = []
        # certificates validated while splitting: seal_for need not validate them again
        resolved: list[RecipientCertificate] = []
        if wanting:
            # optimistic: usually every recipient has a certificate, and one seal_for
            # (which looks them up itself) is all it takes
            try:
                copies.append(self._seal(data, signer, wanting, True, direction))
            except KeyNotFound:
                refused: list[tuple[str, str]] = []
                for rcpt in wanting:
                    found = self.processor.certificate_for(store_address(rcpt))
                    if found.target is not None:
                        groups["sign+encrypt"].append(rcpt)
                        resolved.append(found)
                    elif rcpt in must:
                        refused.append((rcpt, found.reason))
                    else:
                        groups["sign"].append(rcpt)
                if refused:
                    reason = "the subject keyword asks for encryption; " if forced else ""
                    return TransformResult(refusal=_must_encrypt_refusal(refused, reason))
            except KeystoreError:
                raise
            except SMIMEProxyError as e:
                failed = self._failed(data, wanting, must, direction, e)
                if isinstance(failed, TransformResult):
                    return failed
                copies.append(failed)
        for action, group in groups.items():
            if not group:
                continue
            if action == "pass":
                copies.append(Copy(tuple(group), data, direction, "pass"))
                continue
            try:
                encrypt = action == "sign+encrypt"
                copies.append(
                    self._seal(data, signer, group, encrypt, direction, resolved if encrypt else ())
                )
            except KeystoreError:
                raise
            except SMIMEProxyError as e:
                failed = self._failed(data, group, must, direction, e)
                if isinstance(failed, TransformResult):
                    return failed
                copies.append(failed)
        return TransformResult(tuple(copies))

    def _failed(
        self, data: bytes, group: list[str], must: set[str], direction: str, error: Exception
    ) -> Copy | TransformResult:
        """The engine could not seal: refuse under must-encrypt, else pass unchanged."""
        if must & set(group):
            text = f"5.7.1 cannot encrypt this message: {comment_text(str(error), 200)}"
            return TransformResult(refusal=Reply(554, text))
        self._log.warn(
            "smtp.seal_failed direction={direction} error={error}",
            direction=direction,
            error=str(error),
        )
        return Copy(
            tuple(group), add_status(data, f"unprocessed; {error}"), direction, "unprocessed"
        )

    def _signer(self, head: mime.Entity, sender: str) -> str:
        """Whose key signs: the From address when it is local, else the envelope sender."""
        found = _from_address(head)
        if found and is_local(found, self.config.local_domains):
            return found
        return sender.lower()

    def _can_sign(self, signer: str) -> bool:
        try:
            self.processor.store.signing_key(store_address(signer))
        except KeyNotFound:
            return False
        return True

    def _seal(
        self,
        data: bytes,
        signer: str,
        group: list[str],
        encrypt: bool,
        direction: str,
        targets: Sequence[RecipientCertificate] = (),
    ) -> Copy:
        """Sign (and encrypt); a sender without a key gets encryption only (or nothing).

        Raises KeyNotFound when a recipient has no usable certificate."""
        signer, keys = store_address(signer), [store_address(r) for r in group]
        try:
            result = self.processor.seal_for(
                data, signer, keys, sign=True, encrypt=encrypt, targets=targets
            )
            signed = True
        except KeyNotFound:
            if self._can_sign(signer):
                raise  # so it was a recipient's certificate
            if not encrypt:
                return Copy(tuple(group), data, direction, "pass", {"note": "no key to sign with"})
            result = self.processor.seal_for(
                data, signer, keys, sign=False, encrypt=True, targets=targets
            )
            signed = False
        action = ("sign+" if signed else "") + "encrypt" if encrypt else "sign"
        details = {"cipher": result.cipher or ("default" if encrypt else "")}
        if not signed:
            details["note"] = "no key to sign with"
        return Copy(tuple(group), result.data, direction, action, details)

    # -- inbound ------------------------------------------------------------------------
    def _inbound(self, recipients: list[str], data: bytes, head: mime.Entity) -> list[Copy]:
        encrypted = _is_encrypted(head)
        copies: list[Copy] = []
        if encrypted:
            # key isolation: each recipient's copy is opened with that recipient's keys
            for rcpt in recipients:
                opened = self._open(data, [rcpt])
                copies.append(self._store_as(rcpt, (rcpt,), data, opened, encrypted))
            return copies
        by_mode: dict[str, list[str]] = {}
        for rcpt in recipients:
            by_mode.setdefault(storage_for(self.config, domain_of(rcpt)), []).append(rcpt)
        opened = self._open(data, [])
        for mode, group in by_mode.items():
            if mode == "encrypt-at-rest":
                for rcpt in group:
                    copies.append(self._store_as(rcpt, (rcpt,), data, opened, encrypted))
            else:
                copies.append(self._store_as(group[0], tuple(group), data, opened, encrypted))
        return copies

    def _open(self, data: bytes, owners: list[str]) -> tuple[bytes, dict[str, str]] | None:
        """(opened message, details) or None when the engine failed outright."""
        try:
            opened = self.processor.open_for(data, [store_address(o) for o in owners])
        except KeystoreError:
            raise
        except Exception:  # a bug in the engine must not lose the message
            log_bug(self._log, "smtp.open_failed")
            return None
        details = {"smime": str(opened.status.smime_result)}
        if opened.status.decryption is not None:
            details["decrypted"] = str(opened.status.decryption.decrypted).lower()
        return opened.data, details

    def _store_as(
        self,
        rcpt: str,
        group: tuple[str, ...],
        data: bytes,
        opened: tuple[bytes, dict[str, str]] | None,
        encrypted: bool,
    ) -> Copy:
        if opened is None:
            return Copy(
                group, add_status(data, "unprocessed; internal error"), INBOUND, "unprocessed"
            )
        opened_data, details = opened
        mode = storage_for(self.config, domain_of(rcpt))
        if mode == "keep-encrypted" or (mode == "encrypt-at-rest" and encrypted):
            return Copy(group, self._status_only(opened_data, data), INBOUND, mode, details)
        if mode == "encrypt-at-rest":
            try:
                key = store_address(rcpt)
                sealed = self.processor.seal_for(opened_data, key, [key], sign=False)
            except KeyNotFound:
                note = "not encrypted at rest: no usable certificate for the recipient"
                return Copy(group, add_status(opened_data, note), INBOUND, "open", details)
            return Copy(
                group, sealed.data, INBOUND, mode, {**details, "cipher": str(sealed.cipher)}
            )
        return Copy(group, opened_data, INBOUND, "open", details)

    def _status_only(self, opened_data: bytes, original: bytes) -> bytes:
        """The gateway's verdict on top of the untouched original.

        ``Authentication-Results`` says what the gateway verified; the decryption header
        is *not* copied, because the stored message is still encrypted: a status line says
        so instead (the IMAP proxy decrypts on reading and writes its own headers).
        """
        opened = _headers(opened_data)
        ours = [
            h
            for h in opened.headers
            if h.key == AUTHENTICATION_RESULTS.lower()
            or (h.key.startswith(STATUS_HEADER_PREFIX.lower()) and h.key != DECRYPTION_KEY)
        ]
        # the original had its look-alikes removed on entry, so these are all ours
        kept = b"".join(h.raw for h in ours) + original
        if _is_encrypted(_headers(original)):
            return add_status(kept, "stored encrypted; decrypted when read through the proxy")
        return kept


def _must_encrypt_refusal(refused: list[tuple[str, str]], prefix: str = "") -> Reply:
    lines = [
        f"5.7.1 <{rcpt}>: {prefix}must-encrypt and no usable certificate"
        f" ({comment_text(reason, 160)})"
        for rcpt, reason in refused
    ]
    return Reply(550, "\n".join(lines))
