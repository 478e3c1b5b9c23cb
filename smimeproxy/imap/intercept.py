"""The commands the proxy steps into: FETCH of content, SEARCH by text, APPEND to Sent.

Each intercept runs with the session otherwise idle (no earlier command outstanding,
later ones held) and issues its own tagged commands on the session's upstream.

FETCH: the mailbox's S/MIME messages are found once and kept per mailbox (UID FETCH:
the highest UID, then ``UID SEARCH UID n:m HEADER Content-Type pkcs7-mime`` for those not
classified yet; a FETCH by number asks ``FETCH set (UID BODY.PEEK[HEADER.FIELDS
(CONTENT-TYPE)])``, :func:`smimeproxy.imap.fetch.is_smime`); those the command names and
the cache lacks are fetched whole by UID (``BODY.PEEK[]``, never setting ``\\Seen``),
opened with the user's keys (engine workers or the thread pool) and cached; then the
client's own command goes upstream unchanged and :class:`FetchRewrite` replaces the
content items of the responses for the opened messages.  The server therefore still
sets ``\\Seen`` for non-PEEK fetches and reports FLAGS, MODSEQ and VANISHED itself.

SEARCH: see :mod:`smimeproxy.imap.searchkeys`.

APPEND to Sent: the whole command is read (bounded by ``max_append``), each message is
encrypted to the user's own certificate only (``seal_for(..., recipients=[], sign=False)``
encrypts to the sender's current certificate), and the APPEND goes upstream with the
same mailbox, flags and internal date.  A message that cannot be encrypted is refused
with NO (it is never stored in plaintext by mistake); a client that disconnects before
the end sends nothing upstream.

A FETCH by sequence number needs the server to map numbers to UIDs: one round trip
(the mailbox's classification is brought up to date in the same one), except in a
mailbox whose classification is current and holds no S/MIME message, where it is
forwarded at once like a UID FETCH that names no S/MIME message.

Not guaranteed: a message of more than ``max_append`` octets appended to Sent is refused
with NO [TOOBIG]; message sets whose S/MIME messages are not yet cached cost one extra
round trip per 50 messages; a non-UID FETCH in a mailbox with S/MIME messages costs one
extra round trip (the proxy keeps no sequence-number map).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from smimeproxy.bugs import log_bug
from smimeproxy.errors import MalformedMessage, SMIMEProxyError
from smimeproxy.imap import fetch
from smimeproxy.imap.wire import (
    Atom,
    Message,
    String,
    Token,
    build_message,
    encode_token,
    literal,
    tokenize,
)

if TYPE_CHECKING:  # pragma: no cover
    from smimeproxy.imap.session import ProxySession

_log = Logger(namespace="smimeproxy.imap.intercept")
BATCH = 50
#: rewritten FETCH lines remembered per decrypted message (server line + items -> answer)
MEMO_PER_VIEW = 4
#: only short answers (structure, sizes) are remembered: content stays in ``view.data``
#: alone, so the cache's byte bound still holds (up to 4 x 8 KB more per message)
MEMO_MAX_LINE = 8192


def decode_mailbox(name: bytes) -> str:
    """A mailbox name in modified UTF-7 (RFC 3501 5.1.3) as text; INBOX case-folded."""
    out = []
    i = 0
    while i < len(name):
        c = name[i : i + 1]
        if c != b"&":
            out.append(c.decode("latin-1"))
            i += 1
            continue
        j = name.find(b"-", i)
        if j < 0:
            out.append(name[i:].decode("latin-1"))
            break
        chunk = name[i + 1 : j]
        if not chunk:
            out.append("&")
        else:
            import base64

            b64 = chunk.replace(b",", b"/")
            b64 += b"=" * (-len(b64) % 4)
            try:
                out.append(base64.b64decode(b64).decode("utf-16-be"))
            except (ValueError, UnicodeDecodeError):
                out.append(name[i : j + 1].decode("latin-1"))
        i = j + 1
    text = "".join(out)
    return "INBOX" if text.upper() == "INBOX" else text


@dataclass(frozen=True)
class Opener:
    """The owners' keys (whole history) and a validator, resolved once per batch of
    messages rather than once per message (key unsealing and trust lookups are the
    expensive part); what :meth:`MessageProcessor.open_for` does, hoisted."""

    processor: Any
    keys: list[Any]
    validator: Any

    @classmethod
    def load(cls, processor: Any, owners: list[str]) -> Opener:
        with processor.batch():  # one store-generation read for keys and trust
            return cls(processor, processor.keys_for(owners), processor.validator())

    def open(self, data: bytes) -> Any:
        from smimeproxy.smime.opener import open_message

        opened = open_message(
            data,
            keys=self.keys,
            validator=self.validator,
            options=self.processor.open_options(stored=True),
        )
        self.processor.harvest(opened)
        return opened


def open_view(opener: Opener, data: bytes, warm: bool = True) -> Any:
    """Blocking: the decrypted :class:`MessageView`, or None when it stays as stored;
    with ``warm`` its MIME tree and structure are computed here (in the worker thread)
    instead of on the reactor thread when first asked for, and a message whose tree
    cannot be parsed stays as stored.  Not guaranteed: without ``warm`` such a message
    (not one the engine produces in practice) is served decrypted for ``BODY[]`` and
    falls back to the server's answer for items that need the tree."""
    from smimeproxy.imap.views import MessageView

    opened = opener.open(data)
    status = opened.status
    if not opened.changed or status.malformed:
        return None
    if status.decryption is not None and not status.decryption.decrypted:
        return None
    view = MessageView(opened.data, crlf=opened.crlf)
    if warm:
        view.warm()
    return view


#: content items answered without the MIME tree (RFC 3501 6.4.5)
_TREELESS = frozenset({b"RFC822", b"RFC822.SIZE"})


def needs_tree(items: list[fetch.ContentItem]) -> bool:
    """Whether answering ``items`` parses the message (anything but the whole of it)."""
    return any(
        not (item.kind in _TREELESS or (item.kind == b"BODY[" and not item.section))
        for item in items
    )


@dataclass
class FetchRewrite:
    """Answers for the responses of one client FETCH, by UID (and sequence number).

    Only the server's responses to the FETCH the proxy sent are rewritten: a response
    must carry a content item of a kind that FETCH asked the server for (``asked``,
    see :func:`upstream_kinds`; the proxy always asks for one), and each message is
    answered once.  An unsolicited ``* n FETCH (UID u FLAGS (...))`` for the same
    message (another session changed its flags; RFC 9051 7.5.2 allows it at any time,
    Dovecot sends it before the tagged reply) carries none and passes through
    unchanged, before or after the real response.  Not guaranteed: a server that
    answered the FETCH without any of the content items asked for gets its response
    passed through as stored."""

    views: dict[int, Any]
    seq_to_uid: dict[int, int]
    items: list[fetch.ContentItem]
    #: content item kinds of the FETCH sent upstream (empty: any response is its own)
    asked: frozenset[bytes] = frozenset()
    done: Deferred[None] = field(default_factory=Deferred)
    #: tagged answers that replace the server's OK (e.g. ``NO [UNKNOWN-CTE]``)
    failures: list[bytes] = field(default_factory=list)
    #: the UIDs whose response has been rewritten (each is answered once)
    answered: set[int] = field(default_factory=set)
    #: messages still being opened: UID -> Deferred firing with the view (or None)
    pending: dict[int, Deferred[Any]] = field(default_factory=dict)

    def _uid(self, seq: int, uid: int | None) -> int | None:
        return uid if uid is not None else self.seq_to_uid.get(seq)

    def wants(self, line: bytes) -> bool:
        ids = fetch.fetch_response_ids(line)
        if ids is None:
            return False
        uid = self._uid(*ids)
        return uid in self.views or uid in self.pending

    def observe(self, line: bytes) -> None:
        """Keep the sequence map right across EXPUNGE responses (RFC 3501 7.4.1)."""
        match = re.match(rb"\* ([0-9]+) EXPUNGE", line, re.IGNORECASE)
        if match:
            gone = int(match.group(1))
            self.seq_to_uid = {
                (s - 1 if s > gone else s): u for s, u in self.seq_to_uid.items() if s != gone
            }

    def render(self, message: Message) -> bytes | Deferred[bytes]:
        """The response as the client gets it; a Deferred (that never fails) while its
        message is still being opened."""
        ids = fetch.fetch_response_ids(message.lines[0])
        uid = self._uid(*ids) if ids else None
        if uid is not None and uid not in self.views and uid in self.pending:
            later: Deferred[bytes] = Deferred()

            def opened(view: Any) -> Any:
                later.callback(self._render(uid, view, message))
                return view  # the next waiter gets the view too

            self.pending[uid].addBoth(opened)
            return later
        return self._render(uid, self.views.get(uid) if uid is not None else None, message)

    def _render(self, uid: int | None, view: Any, message: Message) -> bytes:
        if view is None or uid is None or uid in self.answered:
            return message.encode()
        # a re-sync gets byte-identical server lines: answer those from the view's memo
        # (only lines once found to be a FETCH's own response are remembered)
        memo = getattr(view, "rendered", None)
        key = (message.lines[0], tuple(self.items)) if not message.literals else None
        if memo is not None and key is not None:
            known = memo.get(key)
            if known is not None:
                self.answered.add(uid)
                return known  # type: ignore[no-any-return]
        failures: list[bytes] = []
        data = message.encode()
        try:
            seq, pairs = fetch.fetch_items(data)
            if self.asked and not self.asked & fetch.content_kinds([n for n, _v in pairs]):
                return data  # not the answer to the proxy's FETCH (an unsolicited update)
            self.answered.add(uid)
            out = fetch.rewrite_items(seq, pairs, view, self.items, failures)
        except (MalformedMessage, ValueError, LookupError) as exc:
            if isinstance(exc, MalformedMessage):  # our own text: never message content
                _log.warn("imap.fetch.rewrite_failed {error}", error=str(exc))
            else:
                log_bug(_log, "imap.fetch.rewrite_failed", exc)
            return data
        if failures:
            self.failures.extend(failures)
        elif memo is not None and key is not None and len(out) <= MEMO_MAX_LINE:
            if len(memo) >= MEMO_PER_VIEW:
                memo.clear()
            memo[key] = out
        return out


def plan(
    session: ProxySession, tag: bytes, word: bytes, message: Message
) -> Callable[[], Awaitable[Any]] | None:
    """The intercept for this command, or None to forward it."""
    if word in (b"FETCH", b"UID FETCH") and session.mailbox is not None:
        try:
            seqset, content, modifiers = fetch_request(word, message)
        except MalformedMessage:
            return None
        if not content:
            return None
        if not session.mailbox_changed:
            known = session.classification()
            if not known.smime:
                return None  # no S/MIME message in the mailbox: forward, keep pipelining
            if word == b"UID FETCH":
                wanted = in_uid_set(seqset, known.smime, known.upto - 1)
                if not wanted:
                    return None  # nothing to decrypt: forward at once, keep pipelining
                if cached_fetch(session, tag, message, seqset, content, wanted):
                    return HANDLED
        return lambda: Deferred.fromCoroutine(
            fetch_intercept(session, tag, word, message, seqset, content, modifiers)
        )
    if word in (b"SEARCH", b"UID SEARCH") and session.mailbox is not None:
        from smimeproxy.imap import searchkeys

        return searchkeys.plan(session, tag, word, message)
    if word == b"APPEND":
        return lambda: Deferred.fromCoroutine(append_intercept(session, tag, message))
    return None


#: what :func:`plan` returns when it has dealt with the command itself
HANDLED: Callable[[], Awaitable[Any]] = lambda: Deferred()  # noqa: E731


def cached_fetch(
    session: ProxySession,
    tag: bytes,
    message: Message,
    uidset: bytes,
    content: list[fetch.ContentItem],
    wanted: set[int],
) -> bool:
    """A UID FETCH whose S/MIME messages are all in the cache, with nothing else in
    flight: the command goes upstream in this same turn with its rewrite in place (no
    coroutine, no waiting for a turn of the intercept machinery).  What it sends and
    answers is what :func:`fetch_intercept` would; False when it does not apply."""
    cache = session.ctx.cache
    if cache is None or not session.can_rewrite_now():
        return False
    keys = [(uid, cache_key(session, uid)) for uid in wanted]
    if not all(key in cache for _uid, key in keys):
        return False
    views = {}
    for uid, key in keys:
        view = cache.get(key)
        if view is None:  # evicted meanwhile by another session's thread: the slow path
            return False
        views[uid] = view
    metrics = session.ctx.metrics
    if metrics is not None:
        for _ in views:
            metrics.cache_lookup(True)
    upstream = _without_content(tag, message, uidset, set(views), content) or message
    rewrite = FetchRewrite(views, {}, content, upstream_kinds(b"UID FETCH", upstream))
    session.forward_rewritten(tag, b"UID FETCH", upstream, rewrite)
    return True


def upstream_kinds(word: bytes, upstream: Message) -> frozenset[bytes]:
    """The content item kinds of the [UID] FETCH the proxy sends upstream: its own
    responses carry them, an unsolicited ``FETCH (FLAGS ...)`` does not."""
    try:
        return frozenset(item.kind for item in fetch_request(word, upstream)[1])
    except MalformedMessage:  # not expected: the proxy parsed or built it
        return frozenset()


_FETCH_LINE = re.compile(rb"[^ ]+ (?:UID )?FETCH ([^ ]+) ([^\r\n]*)\r\n\Z", re.IGNORECASE)
#: item lists already parsed (clients repeat the same few): ``rest -> (content, mods)``
_ITEM_MEMO: dict[bytes, tuple[list[fetch.ContentItem], list[Token]]] = {}
_ITEM_MEMO_MAX = 512


def fetch_request(
    word: bytes, message: Message
) -> tuple[bytes, list[fetch.ContentItem], list[Token]]:
    """``(sequence set, content items, modifiers)`` of a [UID] FETCH command.

    A one-line command's item list is parsed once per distinct text and remembered.
    Raises MalformedMessage when it is not a FETCH the proxy understands.
    """
    match = _FETCH_LINE.match(message.lines[0]) if len(message.lines) == 1 else None
    if match is not None:
        rest = match.group(2)
        known = _ITEM_MEMO.get(rest)
        if known is None:
            args = [Atom(match.group(1)), *tokenize(Message([rest + b"\r\n"]))]
            _set, item_tokens, modifiers = fetch.fetch_arguments(args)
            known = (fetch.parse_items(item_tokens)[1], modifiers)
            if len(_ITEM_MEMO) >= _ITEM_MEMO_MAX:
                _ITEM_MEMO.clear()
            _ITEM_MEMO[rest] = known
        return match.group(1), known[0], known[1]
    tokens = tokenize(message)
    args = tokens[3:] if word == b"UID FETCH" else tokens[2:]
    seqset, item_tokens, modifiers = fetch.fetch_arguments(args)
    return seqset, fetch.parse_items(item_tokens)[1], modifiers


async def after_login(session: ProxySession) -> None:
    """Map the login to a store user with keys; learn the \\Sent folder (RFC 6154)."""
    processor = session.ctx.processor
    if processor is None or session.login is None:
        return
    # the folder listing runs upstream while the store is asked (one round trip saved
    # per login; for a login without keys the listing is simply not used)
    listing = session.command(b'LIST "" "*" RETURN (SPECIAL-USE)')
    try:
        user = await session.ctx.run_blocking(_user_with_keys, processor.store, session.login)
    finally:
        result = await listing
    if user is None:
        _log.info("imap.session.passthrough")
        return
    session.user = user
    delegated = session.ctx.delegation.get(user.address, ()) or ()
    session.owners = [user.address, *delegated]
    _log.info("imap.session.user {user}", user=user.address)
    for message in result.untagged:
        try:
            tokens = tokenize(message)
        except MalformedMessage:
            continue
        if len(tokens) >= 5 and isinstance(tokens[2], list):
            flags = {bytes(f).lower() for f in tokens[2]}
            wanted = {b"\\sent"} | ({b"\\drafts"} if session.ctx.drafts_folders else set())
            if flags & wanted:
                session.sent.add(decode_mailbox(bytes(tokens[4])).lower())
    for name in session.ctx.drafts_folders:
        session.sent.add(name.lower())


def _user_with_keys(store: Any, login: str) -> Any:
    user = store.find_user(login)
    if user is None or not store.keys(user.address):
        return None
    return user


def cache_key(session: ProxySession, uid: int) -> tuple[str, str, int, int]:
    return (session.user.address, session.mailbox or "", session.uidvalidity or 0, uid)


async def views_for(session: ProxySession, uids: list[int], warm: bool = True) -> dict[int, Any]:
    """Decrypted views of these S/MIME messages (cache first, then upstream); ``warm``
    parses new ones in the worker threads (see :func:`open_view`)."""
    views, pending = await open_views(session, uids, warm)
    await gatherResults(list(pending.values()), consumeErrors=True)
    return views


async def open_views(
    session: ProxySession, uids: list[int], warm: bool = True
) -> tuple[dict[int, Any], dict[int, Deferred[Any]]]:
    """Like :func:`views_for`, but done once every ciphertext has been fetched: the
    views opened by then, and for the others (still in the engine) a Deferred that
    fires with the view, or None when the message stays as stored.  ``views`` gains
    each of them as it is opened."""
    cache = session.ctx.cache
    metrics = session.ctx.metrics
    views: dict[int, Any] = {}
    missing = []
    for uid in uids:
        key = cache_key(session, uid)
        view = cache.get(key) if cache is not None else None
        if metrics is not None and cache is not None:
            metrics.cache_lookup(view is not None)
        if view is not None:
            views[uid] = view
        elif key not in session.undecryptable:
            missing.append(uid)
    opener = None
    if missing and session.ctx.engine is None:  # worker processes load their own
        opener = await session.ctx.run_blocking(Opener.load, session.ctx.processor, session.owners)
    chunks = [missing[i : i + BATCH] for i in range(0, len(missing), BATCH)]
    opening: list[list[Deferred[Any]]] = [[] for _ in chunks]
    pending: dict[int, Deferred[Any]] = {}

    def keep(view: Any, key: tuple[str, str, int, int]) -> Any:
        pending.pop(key[3], None)
        if metrics is not None:
            metrics.decrypted(view is not None)
        if view is None:
            session.undecryptable.add(key)
            return None
        if cache is not None:
            cache.put(key, view)
            if metrics is not None:  # as each lands: some land after this returns
                metrics.cache_size(cache)
        views[key[3]] = view
        return view

    batch_of = {uid: index for index, chunk in enumerate(chunks) for uid in chunk}

    def arrived(message: Message) -> None:
        # each ciphertext goes to the engine as soon as it is here, while the server
        # still sends the rest; by UID, because a server may interleave the responses
        # of pipelined FETCH commands (Dovecot does)
        uid, data = _uid_and_body(message)
        index = batch_of.pop(uid, None) if uid is not None else None
        if index is not None and data is not None:
            # (keep takes it out of ``pending`` again, at once if it opened at once)
            pending[uid] = d = _open(session, opener, data, warm)
            opening[index].append(d.addCallback(keep, cache_key(session, uid)))

    def ask(index: int) -> Deferred[Any]:
        uids = b",".join(b"%d" % u for u in chunks[index])
        return session.command(b"UID FETCH " + uids + b" (UID BODY.PEEK[])", on_fetch=arrived)

    # Two batches are asked for at a time; the next once the one before the last
    # has been opened, so at most about two batches of ciphertext wait for the engine.
    fetches = {i: ask(i) for i in range(min(2, len(chunks)))}
    try:
        for index in range(len(chunks)):
            await fetches.pop(index)
            if index >= 1:
                await gatherResults(opening[index - 1], consumeErrors=True)
            if index + 2 < len(chunks):
                fetches[index + 2] = ask(index + 2)
    finally:
        for fetching in fetches.values():  # given up half way (upstream lost): nobody waits
            fetching.addErrback(lambda _: None)
    return views, pending


def _open(session: ProxySession, opener: Any, data: bytes, warm: bool) -> Deferred[Any]:
    """Open one message in the pool; None when it stays as stored (any failure)."""

    def failed(failure: Any) -> None:
        if failure.check(SMIMEProxyError):
            _log.info("imap.fetch.not_opened {error}", error=failure.type.__name__)
        else:  # a bug in opening or viewing this one message: it passes through as stored
            _log.warn("imap.fetch.open_failed {error}", error=failure.type.__name__)
        return None

    if session.ctx.engine is not None:
        # in a worker process, with the authenticated user's (and delegated) keys only
        d = session.ctx.engine.open_view(session.owners, data, warm)
    else:
        d = session.ctx.run_blocking(open_view, opener, data, warm)
    d.addErrback(failed)
    return d


def _pairs(message: Message) -> dict[bytes, Token]:
    tokens = tokenize(message)
    if len(tokens) < 4 or not isinstance(tokens[3], list):
        raise MalformedMessage("bad FETCH response")
    items = tokens[3]
    out: dict[bytes, Token] = {}
    for i in range(0, len(items) - 1, 2):
        name = items[i]
        if isinstance(name, bytes):
            key = bytes(name).upper()
            out[key.split(b"[")[0] + (b"[" if b"[" in key else b"")] = items[i + 1]
    out[b"*SEQ"] = tokens[1]
    return out


#: FETCH responses as Dovecot (and most servers) send the proxy's own queries: UID, then
#: one section as a literal, or the UID alone; read without the general tokenizer (about
#: 10 us less per response, 2,000 of them for a 2,000-message mailbox)
_UID_SECTION = re.compile(rb"\* ([0-9]+) FETCH \(UID ([0-9]+) BODY\[[^\]\r\n]*\] \{([0-9]+)\}\r\n")
_UID_ONLY = re.compile(rb"\* ([0-9]+) FETCH \(UID ([0-9]+)\)\r\n")


def _simple_response(message: Message) -> tuple[int, int, bytes | None] | None:
    """``(seq, uid, section)`` of a response shaped exactly like one of those, else None."""
    lines, literals = message.lines, message.literals
    if len(lines) == 1 and not literals:
        m = _UID_ONLY.fullmatch(lines[0])
        return None if m is None else (int(m.group(1)), int(m.group(2)), None)
    if len(lines) != 2 or len(literals) != 1 or lines[1] != b")\r\n":
        return None
    m = _UID_SECTION.fullmatch(lines[0])
    if m is None or int(m.group(3)) != len(literals[0]):
        return None
    return int(m.group(1)), int(m.group(2)), literals[0]


def _seq_uid_section(message: Message) -> tuple[int, int, bytes | None] | None:
    """``(seq, uid, BODY[...] content or None)`` of a FETCH response; None when it
    carries no UID (or is not one)."""
    simple = _simple_response(message)
    if simple is not None:
        return simple
    try:
        pairs = _pairs(message)
        uid = int(bytes(pairs[b"UID"]))  # type: ignore[arg-type]
        seq = int(bytes(pairs[b"*SEQ"]))  # type: ignore[arg-type]
    except (MalformedMessage, KeyError, ValueError, TypeError):
        return None
    section = pairs.get(b"BODY[")
    return seq, uid, bytes(section) if isinstance(section, String) else None


def _uid_and_body(message: Message) -> tuple[int | None, bytes | None]:
    found = _seq_uid_section(message)
    return (None, None) if found is None else (found[1], found[2])


_CT_ITEMS = b" (UID BODY.PEEK[HEADER.FIELDS (CONTENT-TYPE)])"


def _uid_seq_smime(messages: list[Message]) -> list[tuple[int, int, bool]]:
    """``(uid, seq, is S/MIME)`` of each Content-Type FETCH response among ``messages``."""
    out = []
    for found in map(_seq_uid_section, messages):
        if found is not None:
            seq, uid, header = found
            out.append((uid, seq, header is not None and fetch.is_smime(header)))
    return out


async def smime_uids(
    session: ProxySession, prefix: bytes, seqset: bytes, mods: bytes
) -> dict[int, int]:
    """``{uid: seq}`` of the S/MIME messages in ``seqset``."""
    result = await session.command(prefix + seqset + _CT_ITEMS + mods)
    return {uid: seq for uid, seq, smime in _uid_seq_smime(result.untagged) if smime}


async def seq_smime_uids(session: ProxySession, seqset: bytes, mods: bytes) -> dict[int, int]:
    """``{uid: seq}`` of the S/MIME messages a non-UID FETCH names (sequence numbers
    need the server to map them to UIDs: one round trip).

    With the mailbox's classification current only the UIDs are asked for; a UID it
    does not cover (new mail in the meantime) falls back to the Content-Type query.
    Otherwise that query runs, and the classification is brought up to date in the
    same round trip (pipelined), so the next non-UID FETCH of a mailbox without S/MIME
    messages is forwarded at once (see :func:`plan`).  The two pipelined commands ask
    for the same items and their responses are read together: Dovecot runs them in
    parallel and answers the non-UID one first, all responses before either tagged
    reply, so which command a response came with says nothing."""
    if session.mailbox_changed:
        known = session.classification()
        session.mailbox_changed = False
        updating = session.command(b"UID FETCH %d:*" % known.upto + _CT_ITEMS)
        try:
            mapped = await session.command(b"FETCH " + seqset + _CT_ITEMS + mods)
        except BaseException:
            updating.addErrback(lambda _: None)  # given up (upstream lost): nobody waits
            raise
        updated = await updating
        found = _uid_seq_smime(updated.untagged + mapped.untagged)
        _classify_from(known, found)
        if not found:
            return {}
        wanted = in_uid_set(seqset, {seq for _u, seq, _s in found}, max(s for _u, s, _s in found))
        return {uid: seq for uid, seq, smime in found if smime and seq in wanted}
    known = session.classification()
    result = await session.command(b"FETCH " + seqset + b" (UID)" + mods)
    found_uids: dict[int, int] = {}
    for found in map(_seq_uid_section, result.untagged):
        if found is None:
            continue
        seq, uid, _ = found
        if uid >= known.upto:
            return await smime_uids(session, b"FETCH ", seqset, mods)
        if uid in known.smime:
            found_uids[uid] = seq
    return found_uids


@dataclass
class Classification:
    """Which messages of one mailbox (user, name, UIDVALIDITY) are S/MIME; shared by the
    user's sessions (a message's Content-Type never changes under one UIDVALIDITY)."""

    smime: set[int] = field(default_factory=set)
    upto: int = 1  # every UID below this one is classified


def _classify_from(known: Classification, found: list[tuple[int, int, bool]]) -> None:
    for uid, _seq, smime in found:
        if smime:
            known.smime.add(uid)
        known.upto = max(known.upto, uid + 1)


#: what S/MIME messages have in common for a SEARCH (is_smime needs a pkcs7-mime
#: Content-Type; the rare one that is not S/MIME, certs-only, is then opened once and
#: stays as stored)
SMIME_SEARCH = b"HEADER Content-Type pkcs7-mime"


def search_uids(result: Any) -> list[int]:
    """The UIDs of a ``* SEARCH`` response among a command's untagged responses."""
    uids: list[int] = []
    for message in result.untagged:
        head = message.lines[0]
        if head.upper().startswith(b"* SEARCH"):
            uids.extend(int(u) for u in head.split()[2:] if u.isdigit())
    return uids


async def classify(session: ProxySession) -> Classification:
    """Bring the selected mailbox's classification up to date: the highest UID, then
    one SEARCH for the S/MIME messages among those not classified yet.  Two short
    answers instead of a FETCH response per message (a first sync of 2,000 messages
    spent 20-35 ms reading those).  The highest UID is asked for first and the SEARCH
    names the range up to it, so a message that arrives in between is left for the
    next classification, never taken for plain."""
    known = session.classification()
    session.mailbox_changed = False
    top = await session.command(b"UID FETCH * (UID)")
    found = [f for f in map(_seq_uid_section, top.untagged) if f is not None]
    highest = max((uid for _seq, uid, _ in found), default=0)
    if highest < known.upto:
        return known
    result = await session.command(b"UID SEARCH UID %d:%d " % (known.upto, highest) + SMIME_SEARCH)
    if result.ok:
        known.smime.update(u for u in search_uids(result) if known.upto <= u <= highest)
        known.upto = highest + 1
    else:  # not classified: ask again at the next FETCH
        session.mailbox_changed = True
    return known


def in_uid_set(uidset: bytes, candidates: set[int], largest: int) -> set[int]:
    """The ``candidates`` inside an IMAP sequence set (``*`` is ``largest``)."""
    if not candidates:
        return set()
    found: set[int] = set()
    for part in uidset.split(b","):
        ends = part.split(b":")
        try:
            bounds = [largest if e == b"*" else int(e) for e in ends]
        except ValueError:
            return set(candidates)  # "$" (SEARCHRES) and the like: assume all
        lo, hi = min(bounds), max(bounds)
        if hi - lo < len(candidates):  # a short range: look its UIDs up
            found.update(u for u in range(lo, hi + 1) if u in candidates)
        else:
            found.update(u for u in candidates if lo <= u <= hi)
    return found


async def fetch_intercept(
    session: ProxySession,
    tag: bytes,
    word: bytes,
    message: Message,
    seqset: bytes,
    content: list[fetch.ContentItem],
    modifiers: list[Token],
) -> None:
    if word == b"UID FETCH":
        # UID FETCH responses carry the UID: classify the mailbox once (and again only
        # after new mail), then decide per response; no extra round trip per command.
        known = await classify(session) if session.mailbox_changed else session.classification()
        uids, seq_to_uid = sorted(in_uid_set(seqset, known.smime, known.upto - 1)), {}
    else:
        mods = b""
        for i, mod in enumerate(modifiers[:-1]):
            if isinstance(mod, Atom) and bytes(mod).upper() == b"CHANGEDSINCE":
                mods = b" (CHANGEDSINCE " + encode_token(modifiers[i + 1]) + b")"
        found = await seq_smime_uids(session, seqset, mods)
        uids, seq_to_uid = sorted(found), {seq: uid for uid, seq in found.items()}
    views, pending = await open_views(session, uids, needs_tree(content)) if uids else ({}, {})
    if pending and not _may_overlap(tag, word, message, seqset, views, pending, content):
        await gatherResults(list(pending.values()), consumeErrors=True)
    if not views and not pending:
        session.forward(tag, word, message)
        return
    if word == b"UID FETCH" and not pending:
        message = _without_content(tag, message, seqset, set(views), content) or message
    rewrite = FetchRewrite(views, seq_to_uid, content, pending=pending)
    rewrite.asked = upstream_kinds(word, message)
    session.rewrite = rewrite
    session.forward(tag, word, message, rewrite.done)
    await rewrite.done


def _may_overlap(
    tag: bytes,
    word: bytes,
    message: Message,
    seqset: bytes,
    views: dict[int, Any],
    pending: dict[int, Any],
    content: list[fetch.ContentItem],
) -> bool:
    """Whether the client's FETCH may go to the server while the last messages are
    still being opened (their responses then wait for them, and everything after them
    waits too: ``ProxySession.send_later``).  The server answers the rest meanwhile,
    which in a first sync is most of it.  Not when a BINARY item may fail the command
    (an unknown transfer encoding must be known before the tagged reply), nor when
    every message named is S/MIME (the server is then asked for no content at all,
    :func:`_without_content`, which needs every message open first)."""
    if any(item.kind.startswith(b"BINARY") for item in content):
        return False
    if word != b"UID FETCH":
        return True
    opened = set(views) | set(pending)
    return _without_content(tag, message, seqset, opened, content) is None


def _without_content(
    tag: bytes, message: Message, uidset: bytes, opened: set[int], content: list[Any]
) -> Message | None:
    """When every message a UID FETCH names is answered from the cache, ask the server
    only for its own items (so it does not send ciphertext the proxy would drop).  A
    non-PEEK fetch still reads a header field non-PEEK, so the server sets \\Seen
    and reports FLAGS; a PEEK fetch asks for RFC822.SIZE, so that every response to it
    carries a content item (how :class:`FetchRewrite` tells it from an unsolicited
    FLAGS update).  None when the set is open-ended or includes other messages."""
    uids: set[int] = set()
    for part in uidset.split(b","):
        ends = part.split(b":")
        if not all(e.isdigit() for e in ends) or len(ends) > 2:
            return None
        lo, hi = min(map(int, ends)), max(map(int, ends))
        if hi - lo > 1000:
            return None
        uids.update(range(lo, hi + 1))
    if not uids <= opened:
        return None
    match = _FETCH_LINE.match(message.lines[0]) if len(message.lines) == 1 else None
    items = _OWN_MEMO.get(match.group(2)) if match is not None else None
    if items is not None:  # this item list was turned into the server's part before
        return Message([tag + b" UID FETCH " + uidset + b" " + items + b"\r\n"])
    try:
        tokens = tokenize(message)
        _set, item_tokens, modifiers = fetch.fetch_arguments(tokens[3:])
        names, _content = fetch.parse_items(item_tokens)
    except MalformedMessage:
        return None
    own: list[Token] = [Atom(n) for n in names if fetch.content_item(n) is None]
    own.append(Atom(b"UID"))
    if any(item.sets_seen for item in content):
        own.append(Atom(b"BODY[HEADER.FIELDS (MESSAGE-ID)]"))
    else:
        # one content item (small, and dropped from the answer): the server's response to
        # this FETCH carries it, an unsolicited FLAGS update does not (FetchRewrite.asked)
        own.append(Atom(b"RFC822.SIZE"))
    rest: list[Token] = [own, modifiers] if modifiers else [own]
    built = build_message(tag + b" UID FETCH " + uidset, rest)  # one space (RFC 3501 9)
    if match is not None and len(built.lines) == 1:
        if len(_OWN_MEMO) >= _ITEM_MEMO_MAX:
            _OWN_MEMO.clear()
        _OWN_MEMO[match.group(2)] = build_message(b"", rest).lines[0][:-2]
    return built


#: the server's part of a client's item list (``rest`` of the line -> encoded items)
_OWN_MEMO: dict[bytes, bytes] = {}


def _append_parts(tokens: list[Token]) -> tuple[bytes, list[tuple[list[bytes], bytes]]]:
    """``(mailbox, [(flags-and-date tokens, message)])`` of an APPEND (RFC 3502 too)."""
    if len(tokens) < 4:
        raise MalformedMessage("APPEND needs a mailbox and a message")
    mailbox = encode_token(tokens[2])
    out: list[tuple[list[bytes], bytes]] = []
    extras: list[bytes] = []
    for token in tokens[3:]:
        if isinstance(token, list):
            extras.append(encode_token(token))
        elif isinstance(token, String) and not _is_date(bytes(token)):
            out.append((extras, bytes(token)))
            extras = []
        else:
            extras.append(encode_token(token))
    if extras or not out:
        raise MalformedMessage("APPEND arguments not understood")
    return mailbox, out


def _is_date(value: bytes) -> bool:
    return len(value) < 40 and re.match(rb"\s?[0-9]{1,2}-[A-Za-z]{3}-[0-9]{4} ", value) is not None


async def append_intercept(session: ProxySession, tag: bytes, message: Message) -> None:
    try:
        mailbox, parts = _append_parts(tokenize(message))
    except MalformedMessage:
        session.send(tag + b" BAD APPEND arguments not understood\r\n")
        return
    if decode_mailbox(bytes(tokenize(message)[2])).lower() not in session.sent:
        session.forward(tag, b"APPEND", message)  # not a protected folder after all
        return
    sealed = []
    for extras, data in parts:
        try:
            result = await session.ctx.run_blocking(
                session.ctx.processor.seal_for, data, session.user.address, [], sign=False
            )
        except SMIMEProxyError as exc:
            _log.warn("imap.append.seal_failed {error}", error=type(exc).__name__)
            result = None
        if result is None or not result.encrypted_to:
            session.send(tag + b" NO [CANNOT] the proxy could not encrypt this message\r\n")
            return
        sealed.append((extras, result.data))
    text = bytearray(b"APPEND " + mailbox)
    literals = []
    for extras, data in sealed:
        for extra in extras:
            text += b" " + extra
        text += b" {%d}\r\n" % len(data)
        literals.append(data)
    # the last literal is followed by the end of the command line
    lines = bytes(text).split(b"\r\n")
    upstream = Message([ln + b"\r\n" for ln in lines[:-1]] + [b"\r\n"], literals)
    upstream.lines[0] = tag + b" " + upstream.lines[0]
    done: Deferred[None] = Deferred()
    _log.info("imap.append.encrypted {count}", count=len(sealed))
    session.forward(tag, b"APPEND", upstream, done)
    await done


def literal_bytes(value: bytes) -> bytes:  # re-exported for callers composing commands
    return literal(value)
