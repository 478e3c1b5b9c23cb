"""A throwaway Dovecot IMAP server on 127.0.0.1 for the demo and integration tests.

``start_dovecot(workdir, {"alice": "pw"})`` writes its own configuration (base_dir,
state, logs, Maildirs, passwd-file), starts ``dovecot -F`` in the foreground on a free
port and waits until it greets.  Users are virtual (passwd-file, ``{PLAIN}``
passwords) and all share the uid/gid of the calling process (``nobody`` when run as
root: Dovecot refuses root for mail; files dropped into a Maildir then need
``Dovecot.own(path)``); Sent (``\\Sent``), Drafts (``\\Drafts``), Trash (``\\Trash``)
and Junk (``\\Junk``) are created and subscribed on first login.
``master_user=("admin", "pw")`` adds a master passdb: log in as ``"alice*admin"``
with the master password.

TLS only when asked for (``tls=``).  Not for production: plaintext passwords, no
quotas, no sieve; not guaranteed that two servers started in the same second get
distinct ports if some other process grabs the chosen port in between (start retries
once).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from smimeproxy.errors import ConfigError, UpstreamError

_CONF = """\
base_dir = {base}/run
state_dir = {base}/state
instance_name = dovecot-test-{port}
protocols = imap
listen = 127.0.0.1
ssl = {ssl}
{ssl_files}disable_plaintext_auth = no
auth_mechanisms = plain login
log_path = {base}/dovecot.log
info_log_path = {base}/dovecot.log
mail_location = maildir:{base}/mail/%n/Maildir:LAYOUT=fs
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = {uid}
last_valid_uid = 0
first_valid_gid = {gid}
default_login_user = {login_user}
default_internal_user = {internal_user}
default_internal_group = {internal_group}
login_trusted_networks = 127.0.0.0/8
imap_max_line_length = 65536
mail_max_userip_connections = 1000
auth_master_user_separator = *
auth_cache_size = 0
mail_fsync = never
protocol imap {{
  mail_max_userip_connections = 1000
}}

service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps_port}
    ssl = yes
  }}
  process_min_avail = 1
  service_count = 0
  client_limit = 1000
}}
service imap {{
  process_limit = 1024
}}
service auth {{
  user = {auth_user}
}}
service anvil {{
  chroot =
}}
{master}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%n {base}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={base}/mail/%n
}}
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Sent {{
    special_use = \\Sent
    auto = subscribe
  }}
  mailbox Drafts {{
    special_use = \\Drafts
    auto = subscribe
  }}
  mailbox Trash {{
    special_use = \\Trash
    auto = subscribe
  }}
  mailbox Junk {{
    special_use = \\Junk
    auto = subscribe
  }}
}}
"""

_MASTER = """\
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%n {base}/master-passwd
  master = yes
  result_success = continue
}}
"""


#: where Debian installs the daemon; not on an unprivileged user's PATH
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def find_dovecot() -> str | None:
    """Path of the ``dovecot`` binary (PATH, then the sbin directories), or None."""
    return shutil.which("dovecot") or shutil.which("dovecot", path=os.pathsep.join(_SBIN))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Dovecot:
    """A running server; ``stop()`` it (the fixture does) to end it and delete its files
    (``base`` is a private directory outside tmp_path, see :func:`start_dovecot`)."""

    host: str
    port: int
    base: Path
    users: dict[str, str]
    master_user: tuple[str, str] | None
    process: subprocess.Popen[bytes] = field(repr=False)
    mail_ids: tuple[int, int] = (0, 0)
    imaps_port: int | None = None

    def maildir(self, user: str) -> Path:
        """The user's INBOX Maildir (``cur``/``new``/``tmp``); folders are subdirectories."""
        return self.base / "mail" / user / "Maildir"

    def own(self, path: Path) -> None:
        """Give ``path`` (and all below it) to the mail uid, e.g. after writing a Maildir file."""
        uid, gid = self.mail_ids
        for p in [Path(path), *Path(path).rglob("*")]:
            os.chown(p, uid, gid)

    def endpoint(self) -> str:
        """Twisted client endpoint string for this server."""
        return f"tcp:{self.host}:{self.port}"

    def log(self) -> str:
        path = self.base / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process.stderr is not None:
            self.process.stderr.close()  # else a ResourceWarning when the Popen is collected
        shutil.rmtree(self.base, ignore_errors=True)


def _wait_greeting(host: str, port: int, process: subprocess.Popen[bytes], deadline: float) -> bool:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                if s.recv(1024).startswith(b"* OK"):
                    return True
        except OSError:
            time.sleep(0.05)
    return False


def start_dovecot(
    tmp_path: Path,
    users: dict[str, str],
    master_user: tuple[str, str] | None = None,
    tls: tuple[Path, Path] | None = None,
    *,
    binary: str | None = None,
) -> Dovecot:
    """Start Dovecot for ``users`` (login -> password), linked from ``tmp_path/dovecot``.

    ``tls=(cert_pem_path, key_pem_path)`` turns on STARTTLS on ``port`` and implicit TLS
    on ``imaps_port``. ``binary`` defaults to :func:`find_dovecot`; without one this
    raises ConfigError (tests wrap it to skip or fail instead), and a server that does not
    greet within 20 seconds raises UpstreamError with the end of its log.
    """
    binary = binary or find_dovecot()
    if binary is None:
        raise ConfigError("dovecot is not installed (Debian: apt-get install -y dovecot-imapd)")
    # Dovecot's unprivileged helpers (auth, login, mail as "nobody") must reach their
    # files, and pytest keeps its own base temp directory owner-only (re-tightened by
    # every concurrent pytest run): so the server lives in its own 0755 directory under
    # the system temp dir, linked from tmp_path as "dovecot" and removed by stop().
    base = Path(tempfile.mkdtemp(prefix="smimeproxy-dovecot-"))
    base.chmod(0o755)
    link = Path(tmp_path) / "dovecot"
    if link.is_symlink() and not link.exists():  # left by a server that was killed
        link.unlink()
    if not link.exists():
        link.symlink_to(base)
    (base / "mail").mkdir(exist_ok=True)
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:
        # Dovecot never accesses mail as root: mail belongs to "nobody" then.
        import pwd

        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
        os.chown(base / "mail", uid, gid)
        login_user, internal_user, internal_group, auth_user = (
            "dovenull",
            "dovecot",
            "dovecot",
            "root",
        )
    else:  # unprivileged: everything runs as us
        import pwd

        me = pwd.getpwuid(uid).pw_name
        login_user = internal_user = auth_user = me
        import grp

        internal_group = grp.getgrgid(gid).gr_name
    (base / "passwd").write_text("".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in users.items()))
    master = ""
    if master_user is not None:
        (base / "master-passwd").write_text(f"{master_user[0]}:{{PLAIN}}{master_user[1]}::::::\n")
        master = _MASTER.format(base=base)
    for name in ("passwd", "master-passwd"):
        if (base / name).exists():
            (base / name).chmod(0o644)
    last_error = ""
    for _attempt in range(2):
        port = _free_port()
        imaps_port = _free_port()
        shutil.rmtree(base / "run", ignore_errors=True)
        conf = base / "dovecot.conf"
        conf.write_text(
            _CONF.format(
                base=base,
                port=port,
                uid=uid,
                gid=gid,
                login_user=login_user,
                internal_user=internal_user,
                internal_group=internal_group,
                auth_user=auth_user,
                master=master,
                ssl="yes" if tls else "no",
                ssl_files=f"ssl_cert = <{tls[0]}\nssl_key = <{tls[1]}\n" if tls else "",
                imaps_port=imaps_port if tls else 0,
            )
        )
        process = subprocess.Popen(
            [binary, "-F", "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if _wait_greeting("127.0.0.1", port, process, time.monotonic() + 20):
            return Dovecot(
                "127.0.0.1",
                port,
                base,
                dict(users),
                master_user,
                process,
                (uid, gid),
                imaps_port if tls else None,
            )
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=10)
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
        last_error = (
            stderr + (base / "dovecot.log").read_text(errors="replace")
            if (base / "dovecot.log").exists()
            else stderr
        )
    shutil.rmtree(base, ignore_errors=True)
    raise UpstreamError(f"dovecot did not start: {last_error[-2000:]}")
