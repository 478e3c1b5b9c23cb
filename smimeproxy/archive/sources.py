"""Where archived mail comes from: Maildir trees, mbox files and the IMAP server.

Each source yields :class:`Mailbox` objects (one per folder, Sent and every other
folder included); a mailbox names the messages not yet seen and fetches them. The
identity rules are in :mod:`smimeproxy.archive.state`.

Faults are data, not crashes: a message that vanished between listing and reading is
fetched as ``None``; a folder deleted mid-run raises :class:`MailboxGone` (the pass
notes it and goes on); an IMAP server that disconnects raises
:class:`~smimeproxy.errors.UpstreamError` (the pass keeps what it committed and the
next run resumes).

IMAP is blocking :mod:`imaplib` (the command line and the service's thread pool run
it), logging in per user either as the Dovecot master user (``user*master``, Dovecot's
``auth_master_user_separator``) or with per-user credentials. Not guaranteed: only
``tcp:`` (plain, loopback or trusted network) and ``tls:``/``ssl:`` upstreams; no
STARTTLS.
"""

from __future__ import annotations

import hashlib
import imaplib
import mailbox as stdmailbox
import os
import re
import ssl
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from smimeproxy.archive import ArchiveError
from smimeproxy.errors import UpstreamError

#: UIDs fetched per IMAP command
FETCH_BATCH = 50
_MAILDIR_PARTS = ("cur", "new", "tmp")
#: a file-based mailbox has no UIDVALIDITY: one constant stands in
FILE_UIDVALIDITY = "file"


class MailboxGone(ArchiveError):
    """The folder disappeared while it was being read."""


class Mailbox(Protocol):
    key: str  # stable identity (see state.py)
    owner: str
    folder: str
    uidvalidity: str

    def pending(self, seen: set[str]) -> list[str]:
        """UIDs not in ``seen``, in mailbox order."""
        ...

    def fetch(self, uids: Sequence[str]) -> Iterator[tuple[str, bytes | None]]:
        """``(uid, bytes)`` for each UID; ``None`` for a message that vanished."""
        ...


# -- Maildir ---------------------------------------------------------------------------


@dataclass
class MaildirFolder:
    path: Path
    key: str
    owner: str
    folder: str
    uidvalidity: str = FILE_UIDVALIDITY

    def _box(self) -> stdmailbox.Maildir:
        if not (self.path / "cur").is_dir() and not (self.path / "new").is_dir():
            raise MailboxGone(f"Maildir folder {self.folder} of {self.owner} is gone")
        return stdmailbox.Maildir(self.path, factory=None, create=False)

    def pending(self, seen: set[str]) -> list[str]:
        try:
            keys = self._box().keys()
        except OSError:
            raise MailboxGone(f"Maildir folder {self.folder} of {self.owner} is gone") from None
        return sorted(k for k in keys if k not in seen)

    def fetch(self, uids: Sequence[str]) -> Iterator[tuple[str, bytes | None]]:
        box = self._box()
        for uid in uids:
            try:
                yield uid, box.get_bytes(uid)
            except (KeyError, OSError):
                yield uid, None


def maildir_folders(root: Path, owner: str) -> list[MaildirFolder]:
    """The INBOX at ``root`` and its subfolders: Maildir++ (``.Sent``, ``.Archive.2024``)
    and plain subdirectories (Dovecot's ``LAYOUT=fs``: ``Sent/``, ``Archive/2024/``)."""
    root = Path(root).resolve()
    if not (root / "cur").is_dir() and not (root / "new").is_dir():
        raise ArchiveError(f"{root} is not a Maildir (no cur/ or new/)")
    owner = owner.lower()
    out = [MaildirFolder(root, f"maildir:{owner}:{root}", owner, "INBOX")]
    try:
        names = stdmailbox.Maildir(root, factory=None, create=False).list_folders()
    except OSError as e:
        raise ArchiveError(f"cannot list {root}: {e.strerror}") from None
    for name in sorted(names):
        path = root / f".{name}"
        out.append(MaildirFolder(path, f"maildir:{owner}:{path}", owner, name))
    # Dovecot's LAYOUT=fs: folders are plain subdirectories (Sent/, Archive/2024/)
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d not in _MAILDIR_PARTS and d[0] != ".")
        if here != root and ((here / "cur").is_dir() or (here / "new").is_dir()):
            name = here.relative_to(root).as_posix()
            out.append(MaildirFolder(here, f"maildir:{owner}:{here}", owner, name))
    return out


# -- mbox ------------------------------------------------------------------------------


@dataclass
class MboxFile:
    path: Path
    key: str
    owner: str
    folder: str
    uidvalidity: str = FILE_UIDVALIDITY
    #: uid -> the mailbox module's key, from the last ``pending`` (the file as it was)
    _keys: dict[str, str] | None = field(default=None, repr=False)

    def _index(self) -> dict[str, str]:
        """uid (hash + occurrence) -> the mailbox module's key, for the file as it is now."""
        if not self.path.is_file():
            raise MailboxGone(f"mbox {self.path} is gone")
        box = stdmailbox.mbox(self.path, factory=None, create=False)
        out: dict[str, str] = {}
        counts: dict[str, int] = {}
        try:
            for key in box.iterkeys():
                digest = hashlib.sha256(box.get_bytes(key)).hexdigest()[:32]
                counts[digest] = counts.get(digest, 0) + 1
                out[f"{digest}-{counts[digest]}"] = key
        except (OSError, KeyError) as e:
            raise MailboxGone(f"mbox {self.path} could not be read: {e}") from None
        finally:
            box.close()
        return out

    def pending(self, seen: set[str]) -> list[str]:
        self._keys = self._index()
        return [uid for uid in self._keys if uid not in seen]

    def fetch(self, uids: Sequence[str]) -> Iterator[tuple[str, bytes | None]]:
        keys = self._keys if self._keys is not None else self._index()
        box = stdmailbox.mbox(self.path, factory=None, create=False)
        try:
            for uid in uids:
                try:
                    data = box.get_bytes(keys[uid])
                except (KeyError, OSError):
                    yield uid, None
                    continue
                # the file changed since ``pending``: never file a message under another's id
                same = hashlib.sha256(data).hexdigest()[:32] == uid.split("-", 1)[0]
                yield uid, data if same else None
        finally:
            box.close()


def mbox_file(path: Path, owner: str, folder: str | None = None) -> MboxFile:
    path = Path(path).resolve()
    if not path.is_file():
        raise ArchiveError(f"{path} is not an mbox file")
    owner = owner.lower()
    return MboxFile(path, f"mbox:{owner}:{path}", owner, folder or path.stem)


# -- IMAP ------------------------------------------------------------------------------

_LIST = re.compile(rb'^\((?P<flags>[^)]*)\) (?P<delim>"(?:[^"\\]|\\.)*"|NIL) (?P<name>.*)$')
_UID = re.compile(rb"UID (\d+)")
_IMAP_ERRORS = (imaplib.IMAP4.error, OSError, EOFError, ssl.SSLError)


def _quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unquote(raw: bytes) -> str:
    if raw.startswith(b'"') and raw.endswith(b'"'):
        raw = re.sub(rb"\\(.)", rb"\1", raw[1:-1])
    return raw.decode("utf-8", "replace")


@dataclass(frozen=True)
class IMAPAccount:
    """One user of the IMAP server: ``login`` logs in, ``owner`` owns the keys."""

    login: str
    owner: str


def parse_endpoint(endpoint: str) -> tuple[str, int, bool]:
    """(host, port, implicit TLS) from a Twisted client endpoint string
    (``tcp:HOST:PORT``, ``tcp:host=HOST:port=PORT``, ``tls:...``)."""
    kind, _, rest = endpoint.partition(":")
    if kind.lower() not in ("tcp", "tls", "ssl"):
        raise ArchiveError(f"the archive reads IMAP over tcp:, tls: or ssl: only, not {endpoint}")
    positional: list[str] = []
    named: dict[str, str] = {}
    for arg in rest.split(":"):
        name, eq, value = arg.partition("=")
        if eq:
            named[name] = value
        else:
            positional.append(arg)
    host = named.get("host") or (positional[0] if positional else "")
    port_text = named.get("port") or (positional[1] if len(positional) > 1 else "")
    if not host or not port_text.isdigit():
        raise ArchiveError(f"no host and port in {endpoint}")
    return host, int(port_text), kind.lower() != "tcp"


Connector = Callable[[], imaplib.IMAP4]


def connector(endpoint: str, timeout: float = 60.0) -> Connector:
    host, port, tls = parse_endpoint(endpoint)

    def connect() -> imaplib.IMAP4:
        try:
            if tls:
                return imaplib.IMAP4_SSL(host, port, timeout=timeout)
            return imaplib.IMAP4(host, port, timeout=timeout)
        except _IMAP_ERRORS as e:
            raise UpstreamError(f"cannot connect to the IMAP server {host}:{port}: {e}") from None

    return connect


@dataclass
class IMAPFolder:
    conn: imaplib.IMAP4
    key: str
    owner: str
    folder: str
    uidvalidity: str

    def pending(self, seen: set[str]) -> list[str]:
        try:
            typ, data = self.conn.uid("SEARCH", "ALL")
        except _IMAP_ERRORS as e:
            raise UpstreamError(f"IMAP server failed during SEARCH: {e}") from None
        if typ != "OK":
            raise MailboxGone(f"IMAP folder {self.folder} of {self.owner} cannot be searched")
        uids = [u.decode() for u in (data[0] or b"").split()]
        return [u for u in uids if u not in seen]

    def fetch(self, uids: Sequence[str]) -> Iterator[tuple[str, bytes | None]]:
        for i in range(0, len(uids), FETCH_BATCH):
            batch = uids[i : i + FETCH_BATCH]
            try:
                typ, data = self.conn.uid("FETCH", ",".join(batch), "(UID BODY.PEEK[])")
            except _IMAP_ERRORS as e:
                raise UpstreamError(f"IMAP server failed during FETCH: {e}") from None
            if typ != "OK":
                raise MailboxGone(f"IMAP folder {self.folder} of {self.owner} is gone")
            got: dict[str, bytes] = {}
            for item in data:
                if isinstance(item, tuple) and len(item) == 2:
                    m = _UID.search(item[0])
                    if m:
                        got[m.group(1).decode()] = item[1]
            for uid in batch:
                yield uid, got.get(uid)


class IMAPSource:
    """Every selectable folder of every account on one IMAP server.

    A folder's identity is ``imap:LOGIN:FOLDER`` with its UIDVALIDITY, not the
    server's address: the same server reached on another address or port (a restart,
    a new load balancer) is not indexed again. ``name`` is for messages only.
    """

    def __init__(
        self,
        connect: Connector,
        accounts: Sequence[IMAPAccount],
        *,
        name: str,
        master_user: str | None = None,
        master_password: str | None = None,
        passwords: Callable[[IMAPAccount], str] | None = None,
    ):
        if master_user is None and passwords is None:
            raise ArchiveError("IMAP needs a master user or per-user passwords")
        self.connect = connect
        self.accounts = list(accounts)
        self.name = name
        self.master_user = master_user
        self.master_password = master_password
        self.passwords = passwords

    def login(self, account: IMAPAccount) -> imaplib.IMAP4:
        conn = self.connect()
        try:
            if self.master_user is not None:
                conn.login(f"{account.login}*{self.master_user}", self.master_password or "")
            else:
                assert self.passwords is not None
                conn.login(account.login, self.passwords(account))
        except imaplib.IMAP4.error:
            _close(conn)
            raise UpstreamError(f"the IMAP server refused the login for {account.login}") from None
        except _IMAP_ERRORS as e:
            _close(conn)
            raise UpstreamError(f"IMAP server failed during LOGIN: {e}") from None
        return conn

    def folders(self, account: IMAPAccount) -> Iterator[IMAPFolder]:
        """Each selectable folder of ``account``, selected read-only in turn (one
        connection per account, closed when the iteration ends)."""
        conn = self.login(account)
        try:
            try:
                typ, data = conn.list('""', "*")
            except _IMAP_ERRORS as e:
                raise UpstreamError(f"IMAP server failed during LIST: {e}") from None
            names = []
            for item in data or []:
                raw = item[0] + item[1] if isinstance(item, tuple) else item
                m = _LIST.match(raw or b"")
                if m and b"\\noselect" not in m.group("flags").lower():
                    names.append(_unquote(m.group("name").strip()))
            for name in names:
                try:
                    typ, _ = conn.select(_quote(name), readonly=True)
                    if typ != "OK":
                        continue  # deleted between LIST and SELECT
                    _, validity = conn.response("UIDVALIDITY")
                except _IMAP_ERRORS as e:
                    raise UpstreamError(f"IMAP server failed during SELECT: {e}") from None
                uidvalidity = (validity[0] or b"0").decode() if validity else "0"
                yield IMAPFolder(
                    conn,
                    f"imap:{account.login}:{name}",
                    account.owner,
                    name,
                    uidvalidity,
                )
        finally:
            _close(conn)


def _close(conn: imaplib.IMAP4) -> None:
    try:
        conn.logout()
    except _IMAP_ERRORS:
        try:
            conn.shutdown()
        except _IMAP_ERRORS:
            pass
