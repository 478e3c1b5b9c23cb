"""SEARCH and UID SEARCH with BODY or TEXT over encrypted messages (RFC 3501 6.4.4).

The server cannot see inside an encrypted message, so the proxy evaluates BODY and TEXT
keys itself on the decrypted views of the mailbox's S/MIME messages and hands the server
an equivalent query: each ``BODY x`` becomes

    (OR UID <S/MIME messages whose decrypted body contains x> (BODY x NOT UID <S/MIME messages>))

(or just the second half when none matches).  Every other key, and the way keys
combine (AND, OR, NOT, sequence sets, RETURN options of ESEARCH), stays the server's,
so the result is exact for any combination and comes back in the server's own form.

Not guaranteed: a search key this module does not know (a vendor extension) makes the
proxy forward the query unchanged, so BODY/TEXT then match only plaintext messages.
Searching decrypts every S/MIME message of the mailbox not yet in the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred

from smimeproxy.errors import MalformedMessage
from smimeproxy.imap.wire import Atom, Message, String, Token, build_message, tokenize

if TYPE_CHECKING:  # pragma: no cover
    from smimeproxy.imap.session import ProxySession

#: number of arguments of each search key (RFC 3501 6.4.4, RFC 4551 MODSEQ separately,
#: RFC 5032 OLDER/YOUNGER, RFC 8514 SAVEDATE, RFC 8474 EMAILID/THREADID)
ARITY = {
    **dict.fromkeys(
        "ALL ANSWERED DELETED DRAFT FLAGGED NEW OLD RECENT SEEN UNANSWERED UNDELETED "
        "UNDRAFT UNFLAGGED UNSEEN NOT OR FUZZY SAVEDATESUPPORTED".split(),
        0,
    ),
    **dict.fromkeys(
        "BCC BEFORE BODY CC FROM KEYWORD LARGER ON SENTBEFORE SENTON SENTSINCE SINCE "
        "SMALLER SUBJECT TEXT TO UID UNKEYWORD OLDER YOUNGER EMAILID THREADID "
        "SAVEDBEFORE SAVEDON SAVEDSINCE".split(),
        1,
    ),
    "HEADER": 2,
}
_SEQSET = frozenset(b"0123456789:,*$")


def text_keys(tokens: list[Token]) -> list[int] | None:
    """Indexes of BODY/TEXT keys at this list level (recursing into sub-lists is done
    by :func:`_rewrite`); None when a key is not understood."""
    out = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if isinstance(token, list):
            i += 1
            continue
        word = bytes(token).upper().decode("latin-1")
        if i == 0 and word in ("CHARSET",):
            i += 2
            continue
        if word == "RETURN" and i + 1 < len(tokens) and isinstance(tokens[i + 1], list):
            i += 2
            continue
        if word == "MODSEQ":
            i += 4 if i + 1 < len(tokens) and isinstance(tokens[i + 1], String) else 2
            continue
        if isinstance(token, Atom) and set(bytes(token)) <= _SEQSET:
            i += 1
            continue
        if word not in ARITY:
            return None
        if word in ("BODY", "TEXT"):
            out.append(i)
        i += 1 + ARITY[word]
    return out


def _uidset(uids: set[int]) -> Atom:
    return Atom(b",".join(b"%d" % u for u in sorted(uids)))


def plan(
    session: ProxySession, tag: bytes, word: bytes, message: Message
) -> Callable[[], Deferred[Any]] | None:
    try:
        tokens = tokenize(message)
    except MalformedMessage:
        return None
    args = tokens[3:] if word == b"UID SEARCH" else tokens[2:]
    if not _has_text_key(args):
        return None
    try:
        from smimeproxy.imap.search import matches_text  # noqa: F401 (the content layer)
    except ImportError:
        return None
    return lambda: Deferred.fromCoroutine(search_intercept(session, tag, word, args))


def _has_text_key(tokens: list[Token]) -> bool:
    keys = text_keys(tokens)
    if keys is None:
        return False
    return bool(keys) or any(isinstance(t, list) and _has_text_key(t) for t in tokens)


def _charset(tokens: list[Token]) -> str:
    for i, token in enumerate(tokens[:-1]):
        if isinstance(token, Atom) and bytes(token).upper() == b"CHARSET":
            return bytes(tokens[i + 1]).decode("ascii", "replace")  # type: ignore[arg-type]
    return "utf-8"


def _rewrite(tokens: list[Token], views: dict[int, Any], charset: str) -> list[Token]:
    from smimeproxy.imap.search import matches_text

    keys = text_keys(tokens)
    if keys is None:
        raise MalformedMessage("search key not understood")
    out: list[Token] = []
    i = 0
    encrypted = _uidset(set(views))
    while i < len(tokens):
        token = tokens[i]
        if isinstance(token, list):
            out.append(_rewrite(token, views, charset))
            i += 1
            continue
        if i in keys and i + 1 < len(tokens):
            key, needle = bytes(token).upper().decode(), tokens[i + 1]
            try:
                text = bytes(needle).decode(charset)  # type: ignore[arg-type]
            except (LookupError, UnicodeDecodeError):
                text = bytes(needle).decode("utf-8", "replace")  # type: ignore[arg-type]
            matched = {uid for uid, view in views.items() if matches_text(view, key, text)}
            plain: list[Token] = [token, needle, Atom(b"NOT"), Atom(b"UID"), encrypted]
            if matched:
                out.append([Atom(b"OR"), Atom(b"UID"), _uidset(matched), plain])
            else:
                out.append(plain)
            i += 2
            continue
        out.append(token)
        i += 1
    return out


async def search_intercept(
    session: ProxySession, tag: bytes, word: bytes, args: list[Token]
) -> None:
    from smimeproxy.imap.intercept import SMIME_SEARCH, search_uids, views_for

    uids = search_uids(await session.command(b"UID SEARCH " + SMIME_SEARCH))
    views = await views_for(session, uids) if uids else {}
    prefix = tag + (b" UID SEARCH" if word == b"UID SEARCH" else b" SEARCH")  # one space follows
    message = build_message(prefix, args)
    if views:
        try:
            message = build_message(prefix, _rewrite(args, views, _charset(args)))
        except MalformedMessage:
            pass
    done: Deferred[None] = Deferred()
    session.forward(tag, word, message, done)
    await done
