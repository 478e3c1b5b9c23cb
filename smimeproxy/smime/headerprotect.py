"""Header protection (RFC 9788): the real headers travel inside the signed/encrypted part.

Sending (:func:`protect`): the message's user-facing header fields are copied into the
header section of the Cryptographic Payload (the entity that gets signed and/or
encrypted), whose ``Content-Type`` gets ``hp="clear"`` (signed only) or ``hp="cipher"``
(encrypted). When encrypting, the default Header Confidentiality Policy ``hcp_baseline``
(RFC 9788 section 3.2.1) obscures the outer ``Subject`` as ``[...]`` and removes
``Comments`` and ``Keywords``; an ``HP-Outer`` field inside records each protected field
left outside (section 2.2), and optionally a Legacy Display Element (section 5.2.2/5.2.3)
shows the hidden values to readers whose software does not know header protection.

Opening (:func:`unprotect`): if the payload root has ``hp=``, its header fields replace
the outer ones, and every difference between what the sender put outside and what
arrived outside is reported. The From field is special (section 4.4): a protected From
whose address differs from the outer one is only shown when a verified signature binds
it; otherwise the outer From (checked by the receiving MTA) stays, and the difference is
reported. The 2019 predecessor (``protected-headers="v1"``, draft-autocrypt-lamps-
protected-headers) is read the same way, with the intent inferred from the structure as
RFC 9788 section 4.10.2 does for RFC 8551 messages.

Not guaranteed: RFC 8551 style ``message/rfc822`` wrapping is not unwrapped here;
``hcp_shy`` is not offered; replies (``ReferenceHCP``) are the mail client's business.
"""

from __future__ import annotations

import email.errors
import email.header
import email.utils
import html
import quopri
import re
from collections.abc import Iterable

from smimeproxy.errors import MalformedMessage
from smimeproxy.smime.footer import clean, part_spans
from smimeproxy.smime.mime import (
    CONTENT_HEADER_PREFIX,
    Entity,
    HeaderField,
    base64_body,
    parse_entity,
    split_multipart,
    to_eol,
)
from smimeproxy.smime.status import HeaderProtectionStatus

#: header fields copied into the payload (RFC 5322 3.6 originator, destination,
#: identification and informational fields, plus the reply-steering ones of RFC 9788 6.2).
#: Trace and transit fields (Received, DKIM-Signature, List-*) are not the composer's.
#: Bcc is never copied inside (RFC 9788 section 11.4).
PROTECTED_HEADERS = (
    "From",
    "Sender",
    "Reply-To",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "Comments",
    "Keywords",
    "Mail-Followup-To",
    "Mail-Reply-To",
)
_PROTECTED_KEYS = {name.lower() for name in PROTECTED_HEADERS}
#: RFC 9788 section 2.2
HP_OUTER = "HP-Outer"
#: RFC 9788 section 2.1.1 and 2.1.2
HP_PARAM = "hp"
LEGACY_DISPLAY_PARAM = "hp-legacy-display"
LEGACY_DISPLAY_CLASS = "header-protection-legacy-display"
#: RFC 9788 section 3.2.1 (hcp_baseline)
OBSCURED_SUBJECT = "[...]"
_BASELINE_REMOVED = {"comments", "keywords"}
#: draft-autocrypt-lamps-protected-headers (RFC 9788 appendix F.3)
V1_PARAM = "protected-headers"
MAX_DEPTH = 32
_QUOTE_LIMIT = 80


def hcp_baseline(name: str, value: str) -> str | None:
    """RFC 9788 section 3.2.1: Subject -> ``[...]``, Comments/Keywords removed (None)."""
    key = name.lower()
    if key == "subject":
        return OBSCURED_SUBJECT
    if key in _BASELINE_REMOVED:
        return None
    return value


# -- small helpers -------------------------------------------------------------------------
def set_param(value: str, name: str, param: str | None) -> str:
    """``value`` (a Content-Type) with parameter ``name`` replaced by ``param`` (or removed)."""
    pattern = re.compile(
        r";\s*" + re.escape(name) + r'\s*=\s*(?:"(?:[^"\\]|\\.)*"|[^;\s]*)', re.IGNORECASE
    )
    value = pattern.sub("", value).rstrip().rstrip(";")
    if param is not None:
        value += f'; {name}="{param}"'
    return value


def display_value(value: str) -> str:
    """An unfolded header value with RFC 2047 words decoded, white space collapsed."""
    try:
        decoded = str(email.header.make_header(email.header.decode_header(value)))
    except (ValueError, LookupError, UnicodeError, email.errors.MessageError):
        decoded = value
    return re.sub(r"\s+", " ", decoded).strip()


def _address(value: str) -> str:
    """The addr-spec of a From value, compared as RFC 9788 section 4.4.5 says (simplified)."""
    _, addr = email.utils.parseaddr(value)
    local, _, domain = addr.rpartition("@")
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        pass
    return f"{local}@{domain}".lower() if local else addr.lower()


def _quote(values: Iterable[str]) -> str:
    return ", ".join(f"'{clean(v, _QUOTE_LIMIT)}'" for v in values) or "nothing"


def _copy(field: HeaderField, eol: bytes) -> HeaderField:
    return HeaderField(field.name, to_eol(field.raw, eol))


def _is_multipart_container(entity: Entity) -> bool:
    return entity.is_multipart() and entity.mime_type not in (
        "multipart/signed",
        "multipart/encrypted",
    )


# -- body rewriting (legacy display) -----------------------------------------------------
def _newline(data: bytes, default: bytes) -> bytes:
    if b"\r\n" in data:
        return b"\r\n"
    return b"\n" if b"\n" in data else default


def _encode_body(part: Entity, content: bytes) -> bytes:
    """``content`` encoded with the part's Content-Transfer-Encoding (which must fit it)."""
    cte = part.transfer_encoding()
    if cte == "base64":
        return base64_body(content, part.eol)
    if cte == "quoted-printable":
        lf = content.replace(b"\r\n", b"\n")
        return quopri.encodestring(lf).replace(b"\n", part.eol)
    return content


def _charset_encode(text: str, part: Entity) -> bytes:
    """``text`` in the part's charset; a us-ascii part becomes utf-8 when it must."""
    charset = part.content_type()[1].get("charset", "us-ascii").lower()
    try:
        return text.encode(charset)
    except LookupError:
        return text.encode("ascii", "replace")
    except UnicodeEncodeError:
        if charset in ("us-ascii", "ascii"):
            ctype = part.get("Content-Type") or "text/plain"
            part.set("Content-Type", set_param(ctype, "charset", "utf-8"))
            return text.encode("utf-8")
        return text.encode(charset, "replace")


def _add_legacy_display(part: Entity, fields: list[tuple[str, str]]) -> None:
    """Put a Legacy Display Element into a text/plain or text/html leaf (in place)."""
    ctype = part.mime_type
    content = part.decoded_body()
    nl = _newline(content, part.eol)
    lines = [f"{name}: {display_value(value)}" for name, value in fields]
    if ctype == "text/plain":
        block = _charset_encode("\n".join(lines) + "\n\n", part).replace(b"\n", nl)
        content = block + content
    else:
        pre = html.escape("\n".join(lines), quote=False)
        div = _charset_encode(
            f'<div class="{LEGACY_DISPLAY_CLASS}">\n<pre>{pre}</pre></div>\n', part
        ).replace(b"\n", nl)
        m = re.search(rb"<body\b[^>]*>", content, re.IGNORECASE)
        at = m.end() if m else 0  # first child of <body> (RFC 9788 section 5.2.3.1)
        content = content[:at] + div + content[at:]
    if part.transfer_encoding() in ("7bit", "") and not content.isascii():
        part.set("Content-Transfer-Encoding", "quoted-printable")
    part.body = _encode_body(part, content)
    ctype_value = part.get("Content-Type") or "text/plain; charset=us-ascii"
    part.set("Content-Type", set_param(ctype_value, LEGACY_DISPLAY_PARAM, "1"))


def _main_body_parts(entity: Entity, fields: list[tuple[str, str]], depth: int = 0) -> bool:
    """Add the element to every Main Body Part below ``entity`` (RFC 9788 5.2.4); changed?"""
    if depth > MAX_DEPTH:
        raise MalformedMessage("MIME nesting too deep")
    disposition = (entity.get("Content-Disposition") or "").strip().lower()
    if disposition.startswith("attachment"):
        return False
    mime_type = entity.mime_type
    if mime_type in ("text/plain", "text/html"):
        _add_legacy_display(entity, fields)
        return True
    if mime_type not in ("multipart/alternative", "multipart/mixed", "multipart/related"):
        return False
    boundary = entity.content_type()[1].get("boundary", "")
    preamble, parts, epilogue, _ = split_multipart(entity.body, boundary)
    if not parts:
        return False
    indexes = range(len(parts)) if mime_type == "multipart/alternative" else range(1)
    changed = False
    for i in indexes:
        child = parse_entity(parts[i])
        if _main_body_parts(child, fields, depth + 1):
            parts[i] = child.to_bytes()
            changed = True
    if changed:
        eol, delim = entity.eol, b"--" + boundary.encode()
        body = preamble + (eol if preamble else b"")
        body += b"".join(delim + eol + p + eol for p in parts)
        entity.body = body + delim + b"--" + eol + epilogue
    return changed


def _strip_leaf_display(part: Entity) -> bool:
    content = part.decoded_body()
    if part.mime_type == "text/plain":
        lines = content.splitlines(keepends=True)
        for i, line in enumerate(lines):
            if line.strip(b"\r\n") == b"":
                content = b"".join(lines[i + 1 :])
                break
        else:
            return False  # no blank line: not a Legacy Display Element, keep the text
    else:
        pattern = (
            rb"<div\b[^>]*class\s*=\s*[\"']?"
            + LEGACY_DISPLAY_CLASS.encode()
            + rb".*?</div>(?:\r\n|\n)?"
        )
        content, n = re.subn(pattern, b"", content, count=1, flags=re.IGNORECASE | re.DOTALL)
        if not n:
            return False
    part.body = _encode_body(part, content)
    part.set("Content-Type", set_param(part.get("Content-Type") or "", LEGACY_DISPLAY_PARAM, None))
    return True


def _remove_legacy_display(entity: Entity, v1: bool, depth: int = 0) -> bool:
    """Drop Legacy Display Elements (RFC 9788 4.5.3) or v1 display parts below ``entity``."""
    if depth > MAX_DEPTH:
        raise MalformedMessage("MIME nesting too deep")
    ctype, params = entity.content_type()
    if not v1 and ctype in ("text/plain", "text/html") and params.get(LEGACY_DISPLAY_PARAM) == "1":
        return _strip_leaf_display(entity)
    if not _is_multipart_container(entity):
        return False
    body = entity.body
    spans, closing = part_spans(body, params.get("boundary", ""))
    if not spans:
        return False
    pieces, changed = [body[: spans[0].delim_start]], False
    for span in spans:
        raw = body[span.start : span.end]
        child = parse_entity(raw)
        child_type, child_params = child.content_type()
        if v1 and depth == 0 and child_type == "text/plain" and V1_PARAM in child_params:
            changed = True  # the draft's separate "legacy display part"
            continue
        if not v1 and _remove_legacy_display(child, v1, depth + 1):
            raw = child.to_bytes()
            changed = True
        pieces.append(body[span.delim_start : span.start] + raw)
    if closing is not None:
        pieces.append(body[closing:])
    if changed:
        entity.body = b"".join(pieces)
    return changed


# -- sending -------------------------------------------------------------------------------
def protect(
    message: Entity, *, encrypting: bool, legacy_display: bool = False
) -> tuple[list[HeaderField], Entity]:
    """Split ``message`` into (outer header fields, Cryptographic Payload root).

    The payload root has the message's Content-* fields (Content-Type with ``hp=``), a
    copy of each :data:`PROTECTED_HEADERS` field, and when ``encrypting`` one ``HP-Outer``
    field per protected field left outside. The outer list is every non-content field of
    ``message`` (MIME-Version excluded) with ``hcp_baseline`` applied when encrypting.
    With ``legacy_display`` (only when encrypting and something was hidden) the hidden
    values are also written into the main text/plain and text/html parts. ``message``
    itself is not modified. Not guaranteed: other Content-Type parameters are re-written
    unfolded.
    """
    eol = message.eol
    outer: list[HeaderField] = []
    hp_outer: list[HeaderField] = []
    hidden: list[tuple[str, str]] = []
    for field in message.other_headers():
        if not encrypting or field.key not in _PROTECTED_KEYS:
            outer.append(_copy(field, eol))
            continue
        value = field.value()
        new = hcp_baseline(field.name, value)
        if new is None:
            hidden.append((field.name, value))
            continue
        if new != value:
            hidden.append((field.name, value))
            outer.append(HeaderField.make(field.name, new, eol))
        else:
            outer.append(_copy(field, eol))
        hp_outer.append(HeaderField.make(HP_OUTER, f"{field.name}: {new}", eol))

    payload = Entity([_copy(h, eol) for h in message.content_headers()], message.body, eol, True)
    if encrypting and legacy_display and hidden:
        _main_body_parts(payload, hidden)
    ctype = payload.get("Content-Type") or "text/plain; charset=us-ascii"
    payload.set("Content-Type", set_param(ctype, HP_PARAM, "cipher" if encrypting else "clear"))
    copies = [_copy(h, eol) for h in message.headers if h.key in _PROTECTED_KEYS]
    payload.headers = copies + hp_outer + payload.headers
    return outer, payload


# -- opening -------------------------------------------------------------------------------
def _is_encrypted(outer: Entity) -> bool:
    ctype, params = outer.content_type()
    if ctype == "multipart/encrypted":
        return True
    smime_type = params.get("smime-type", "").lower()
    return ctype in ("application/pkcs7-mime", "application/x-pkcs7-mime") and smime_type in (
        "enveloped-data",
        "authenveloped-data",
    )


def _group(fields: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in fields:
        out.setdefault(name.lower(), []).append(display_value(value))
    return out


def unprotect(
    outer: Entity, inner: Entity, *, signer_addresses: Iterable[str] = ()
) -> tuple[list[HeaderField], Entity, HeaderProtectionStatus]:
    """Restore protected headers: (merged non-content fields, payload entity, status).

    ``outer`` is the message as it arrived, ``inner`` the opened Cryptographic Payload
    root. Without ``hp=`` (or the draft's ``protected-headers="v1"``) the outer
    non-content fields and ``inner`` come back unchanged with an empty status. With it,
    each protected field replaces the outer fields of that name, and protected-class
    fields that exist only outside are dropped (a Cc added on the way must not steer a
    reply). ``signer_addresses`` are the addresses bound to a *verified* signature: a
    protected From whose address differs from the outer From is used only if it is one of
    them. The returned payload has only its Content-* fields and no Legacy Display
    Element. Mismatches are reported in the status, never raised.
    """
    params = inner.content_type()[1]
    scheme = params.get(HP_PARAM, "").lower()
    v1 = False
    if scheme not in ("clear", "cipher"):
        if params.get(V1_PARAM, "").lower() != "v1":
            return (
                [_copy(h, outer.eol) for h in outer.other_headers()],
                inner,
                HeaderProtectionStatus(),
            )
        v1 = True
        scheme = "cipher" if _is_encrypted(outer) else "clear"

    protected = [
        h
        for h in inner.headers
        if not h.key.startswith(CONTENT_HEADER_PREFIX) and h.key not in ("mime-version", "hp-outer")
    ]
    outer_fields = outer.other_headers()
    prot = _group((h.name, h.value()) for h in protected)
    actual = _group((h.name, h.value()) for h in outer_fields)
    if scheme == "clear":
        expected = prot  # signed only: the composer left every field as it was
    elif v1:
        expected = actual  # no HP-Outer in the draft: infer from the outside (RFC 9788 4.10.2)
    else:
        records = []
        for h in inner.headers:
            if h.key == "hp-outer":
                name, sep, value = h.value().partition(":")
                if sep:
                    records.append((name.strip(), value.strip()))
        expected = _group(records)

    names = {h.key: h.name for h in [*outer_fields, *protected] if h.key in _PROTECTED_KEYS}
    names.update({h.key: h.name for h in protected})
    mismatches: list[str] = []

    keep_outer_from = from_reported = False
    if "from" in prot and "from" in actual:
        inner_addr = {_address(v) for v in prot["from"]}
        outer_addr = {_address(v) for v in actual["from"]}
        if inner_addr != outer_addr:
            verified = {a.lower() for a in signer_addresses}
            keep_outer_from = not inner_addr <= verified
            shown = "the outer one is shown: no verified signature binds the protected address"
            if not keep_outer_from:
                shown = "the protected one is shown: a verified signature binds it"
            mismatches.append(
                f"From: outer {_quote(actual['from'])} differs from protected "
                f"{_quote(prot['from'])}; {shown}"
            )
            from_reported = True

    for key, name in names.items():
        if key == "from" and from_reported:
            continue
        got, want = actual.get(key, []), expected.get(key, [])
        if sorted(got) == sorted(want):
            continue
        if scheme == "clear":
            if key not in prot:
                mismatches.append(f"{name}: {_quote(got)} is outside only, not protected")
            elif not got:
                mismatches.append(f"{name}: missing outside, protected {_quote(want)}")
            else:
                mismatches.append(
                    f"{name}: outer {_quote(got)} differs from protected {_quote(want)}"
                )
        elif not want:
            mismatches.append(f"{name}: outer {_quote(got)} was not put outside by the sender")
        else:
            mismatches.append(
                f"{name}: outer {_quote(got)} differs from what the sender put outside "
                f"{_quote(want)}"
            )

    # merge: protected fields take the place of the outer ones
    eol = outer.eol
    by_key: dict[str, list[HeaderField]] = {}
    for h in protected:
        by_key.setdefault(h.key, []).append(h)
    if keep_outer_from:
        by_key.pop("from", None)
    merged: list[HeaderField] = []
    placed: set[str] = set()
    for h in outer_fields:
        if h.key in by_key:
            if h.key not in placed:
                merged.extend(_copy(p, eol) for p in by_key[h.key])
                placed.add(h.key)
            continue
        if h.key in _PROTECTED_KEYS and h.key != "from" and h.key not in prot:
            continue  # an unprotected copy of a field the sender protects: not shown
        merged.append(_copy(h, eol))
    for key, fields in by_key.items():
        if key not in placed:
            merged.extend(_copy(p, eol) for p in fields)
    restored = tuple(fields[0].name for fields in by_key.values())

    payload = Entity(
        [h for h in inner.headers if h.key.startswith(CONTENT_HEADER_PREFIX)],
        inner.body,
        inner.eol,
        inner.terminated,
    )
    if scheme == "cipher":
        _remove_legacy_display(payload, v1)
    return merged, payload, HeaderProtectionStatus(restored=restored, mismatches=tuple(mismatches))
