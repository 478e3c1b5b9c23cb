"""The status headers a reader (and a mail filter) sees on an opened message.

``Authentication-Results`` (RFC 8601, which obsoletes RFC 7601) with the ``smime``
method of RFC 7281 tells the reader's software what the gateway verified; our own
``X-SMIMEProxy-*`` headers say how the message was decrypted. Both are only worth
anything if nobody outside can forge them, so :func:`strip_lookalikes` removes every
incoming ``Authentication-Results`` field that claims our authserv-id and every header
that starts with our prefix (RFC 8601 section 5) *before* the gateway adds its own.

Everything that goes into a value here may come from an attacker (a signer's address,
a subject name, an error text quoting the input), so it is reduced to printable ASCII,
stripped of anything that could close a comment or start a new result, and bounded.

Not guaranteed: the values are *unfolded* (the raw MIME codec takes no line breaks); they
stay well below the 998-octet line limit of RFC 5322 section 2.1.1 but may exceed 78.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from cryptography.x509.oid import NameOID

from smimeproxy.errors import ConfigError
from smimeproxy.smime.mime import Entity
from smimeproxy.smime.status import Check, MessageStatus, Outcome, SignerStatus, SMIMEResult

#: our own headers; any header with this prefix arriving from outside is removed on entry
STATUS_HEADER_PREFIX = "X-SMIMEProxy-"
#: how the message was decrypted (or why not)
DECRYPTION_HEADER = "X-SMIMEProxy-Decryption"
#: e.g. "malformed; passed on unchanged" (set by the orchestration)
STATUS_HEADER = "X-SMIMEProxy-Status"
#: RFC 8601 section 2.2
AUTHENTICATION_RESULTS = "Authentication-Results"
#: RFC 7281 section 3.1: the method name and the property naming the signer
METHOD = "smime"
IDENTIFIER_PROPERTY = "body.smime-identifier"

#: comments and reasons longer than this are cut (RFC 5322 2.1.1 allows 998 per line)
MAX_COMMENT = 300
MAX_IDENTIFIER = 254  # RFC 5321 4.5.3.1.3: the longest path

# RFC 2045 section 5.1: token := 1*<any (US-ASCII) CHAR except SPACE, CTLs, or tspecials>
_TSPECIALS = set('()<>@,;:\\"/[]?=')
_TOKEN_CHARS = {chr(c) for c in range(33, 127)} - _TSPECIALS
# RFC 5322 3.2.3 dot-atom-text and RFC 1034 domain names: an addr-spec that needs no quotes
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM_ADDRESS = re.compile(
    rf"^{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    rf"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$"
)
_WS = re.compile(r"\s+")


# -- sanitising -------------------------------------------------------------------------
def _printable_ascii(text: str, limit: int) -> str:
    """Printable ASCII only, whitespace collapsed, cut to ``limit`` characters."""
    if text.isascii() and text.isprintable():
        cleaned = text  # the common case: every character is kept as it is
    else:
        cleaned = "".join(
            ch if 32 <= ord(ch) < 127 else ("?" if not ch.isspace() else " ") for ch in text
        )
    cleaned = _WS.sub(" ", cleaned).strip()
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 3].rstrip() + "..."
    return cleaned


def comment_text(text: str, limit: int = MAX_COMMENT) -> str:
    """``text`` made safe for an RFC 5322 comment: no parentheses, backslashes or CR/LF.

    Parentheses become brackets, so that nothing inside can close the comment and be
    read as a result or a property by the reader's software.
    """
    text = text.replace("(", "[").replace(")", "]").replace("\\", "/")
    return _printable_ascii(text, limit)


def quoted_string(text: str, limit: int = MAX_COMMENT) -> str:
    """An RFC 5322 quoted-string holding ``text`` (printable ASCII, quotes escaped)."""
    cleaned = _printable_ascii(text, limit)
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def pvalue(identifier: str) -> str:
    """``identifier`` as an RFC 8601 pvalue: a bare addr-spec or token if it is one, else quoted."""
    cleaned = _printable_ascii(identifier, MAX_IDENTIFIER)
    if cleaned and (_DOT_ATOM_ADDRESS.match(cleaned) or set(cleaned) <= _TOKEN_CHARS):
        return cleaned
    return quoted_string(cleaned, MAX_IDENTIFIER)


def _checked_authserv_id(authserv_id: str) -> str:
    if authserv_id and set(authserv_id) <= _TOKEN_CHARS:
        return authserv_id
    raise ConfigError(
        "authserv_id must be a domain name or another RFC 2045 token", key="authserv_id"
    )


# -- Authentication-Results -------------------------------------------------------------
def _issuer_name(signer: SignerStatus) -> str:
    cert = signer.certificate
    if cert is None:
        return "unknown issuer"
    names = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    if names:
        return str(names[0].value)
    return cert.issuer.rfc4514_string()


def _failed(checks: Iterable[Check]) -> list[str]:
    """``name: detail`` of every check that did not pass."""
    return [
        f"{c.name}: {c.detail}" if c.detail else c.name
        for c in checks
        if c.outcome is not Outcome.PASS and c.outcome is not Outcome.SKIPPED
    ]


def result_reason(status: MessageStatus) -> str:
    """Why the ``smime`` result is what it is, in a few words (not yet sanitised)."""
    result = status.smime_result
    if result is SMIMEResult.NONE:
        if status.malformed:
            return "malformed: " + ("; ".join(status.errors) or "structure not understood")
        return ""
    if result is SMIMEResult.NEUTRAL:
        if status.partially_signed:
            return "only part of the message is signed"
        return "text outside the signed part is not covered by the signature"
    if result is SMIMEResult.PERMERROR:
        return "signature could not be checked: " + (
            "; ".join(status.errors + tuple(e for s in status.signers for e in s.errors))
            or "no certificate for the signer"
        )
    reasons: list[str] = []
    for signer in status.signers:
        if not signer.cryptographically_valid:
            reasons.extend(_failed(signer.checks) or list(signer.errors) or ["bad signature"])
            continue
        cs = signer.certificate_status
        if cs is not None and not cs.trusted:
            reasons.extend(_failed(cs.checks) or ["no path to a trust anchor"])
    if result is SMIMEResult.PASS:
        issuers = ", ".join(dict.fromkeys(_issuer_name(s) for s in status.signers))
        return f"signature verified, certificate issued by {issuers}"
    if result is SMIMEResult.FAIL:
        return "signature NOT valid: " + "; ".join(reasons)
    if result is SMIMEResult.TEMPERROR:
        return "signature valid, revocation status unknown: " + "; ".join(reasons)
    # POLICY
    return "signature valid, signer not trusted: " + "; ".join(reasons)


def authentication_results(authserv_id: str, status: MessageStatus) -> str:
    """The *value* of an ``Authentication-Results`` field for ``status``.

    For example ``acme.test; smime=pass (signature verified, certificate issued by
    Acme CA) body.smime-identifier=alice@acme.test`` or ``acme.test; smime=none``.
    ``authserv_id`` comes from the configuration and must be a token (a domain name);
    anything else raises :class:`ConfigError`. The comment and the identifier come from
    the message and are sanitised (printable ASCII, no parentheses, bounded).
    """
    server = _checked_authserv_id(authserv_id)
    result = status.smime_result
    value = f"{server}; {METHOD}={result}"
    reason = comment_text(result_reason(status))
    if reason:
        value += f" ({reason})"
    identifier = status.identifier
    if identifier is not None and result is not SMIMEResult.NONE:
        value += f" {IDENTIFIER_PROPERTY}={pvalue(identifier)}"
    return value


# -- our decryption header ----------------------------------------------------------------
def _token(text: str | None, default: str = "unknown") -> str:
    cleaned = "".join(ch for ch in (text or "") if ch in _TOKEN_CHARS)[:64]
    return cleaned or default


def decryption_header(status: MessageStatus) -> str | None:
    """The value of :data:`DECRYPTION_HEADER`, or ``None`` if the message was not encrypted.

    ``decrypted; cipher=aes256_gcm; key=rsaes_oaep; integrity=protected`` or
    ``failed; reason="no key for any recipient"``. ``integrity=none`` means CBC content
    without a valid signature inside: it could have been altered on the way.
    """
    dec = status.decryption
    if dec is None:
        return None
    if not dec.decrypted:
        return f"failed; reason={quoted_string(dec.error or 'unknown error', 200)}"
    integrity = "protected" if status.integrity_protected else "none"
    return (
        f"decrypted; cipher={_token(dec.cipher)}; key={_token(dec.key_algorithm)}; "
        f"integrity={integrity}"
    )


# -- removing forgeries ------------------------------------------------------------------
def _skip_cfws(value: str, i: int) -> int:
    """Index of the first character after comments and white space (RFC 5322 3.2.2)."""
    n = len(value)
    while i < n:
        ch = value[i]
        if ch in " \t\r\n":
            i += 1
        elif ch == "(":
            depth = 0
            while i < n:
                ch = value[i]
                if ch == "\\":
                    i += 2
                    continue
                if ch == "(":
                    depth += 1
                elif ch == ")":
                    depth -= 1
                    if depth == 0:
                        i += 1
                        break
                i += 1
            else:
                return n  # unclosed comment: nothing follows
        else:
            break
    return i


def parse_authserv_id(value: str) -> str | None:
    """The authserv-id of an ``Authentication-Results`` value, or ``None`` if there is none.

    Leading comments and white space are skipped; the id is a token or a quoted-string
    (RFC 8601 section 2.2, ``authserv-id = value``). A version number or the results
    that follow are not returned. Not guaranteed: this does not validate the rest.
    """
    i = _skip_cfws(value, 0)
    n = len(value)
    if i >= n:
        return None
    if value[i] == '"':
        out = []
        i += 1
        while i < n and value[i] != '"':
            if value[i] == "\\" and i + 1 < n:
                i += 1
            out.append(value[i])
            i += 1
        if i >= n:
            return None  # unterminated quoted-string
        return "".join(out).strip() or None
    start = i
    # RFC 8616 allows UTF-8 domain names: accept any non-ASCII character in the token too
    while i < n and (value[i] in _TOKEN_CHARS or ord(value[i]) > 127):
        i += 1
    return value[start:i] or None


def _same_id(a: str, b: str) -> bool:
    return a.rstrip(".").casefold() == b.rstrip(".").casefold()


def strip_lookalikes(entity: Entity, authserv_id: str) -> list[str]:
    """Remove forged status headers from ``entity`` (in place); return the names removed.

    Removed: every ``Authentication-Results`` field whose authserv-id equals ours
    (case-insensitively, a trailing dot ignored), and one whose authserv-id cannot be
    parsed but which mentions ours; every header whose name starts with
    :data:`STATUS_HEADER_PREFIX` (case-insensitively). Other ADMDs' results are kept.
    Not guaranteed: only top-level header fields are looked at; ``ARC-*`` fields are
    left alone (they are covered by their own seals).
    """
    prefix = STATUS_HEADER_PREFIX.lower()
    ours = authserv_id.casefold()
    kept = []
    removed: list[str] = []
    for h in entity.headers:
        drop = h.key.startswith(prefix)
        if h.key == AUTHENTICATION_RESULTS.lower():
            value = h.value()
            found = parse_authserv_id(value)
            if found is None:
                drop = ours in value.casefold()
            else:
                drop = _same_id(found, authserv_id)
        if drop:
            removed.append(h.name)
        else:
            kept.append(h)
    entity.headers = kept
    return removed
