"""A throwaway Postfix in front of the gateway, and smtp-sink behind it.

Exactly the deployment of docs/postfix.md: Postfix (Debian's package) accepts mail on
``smtpd_port`` and hands every message to the gateway as an after-queue content filter
(``content_filter = smimeproxy:[127.0.0.1]:<gateway>``); the gateway sends what it
made to Postfix's reinjection smtpd on ``reinject_port`` (no content filter there),
and Postfix relays it on to ``relayhost``: here Postfix's own ``smtp-sink``, which
writes each message it receives to a file.

Everything lives under one temporary directory (config, queue, data, log); the
instance runs as Debian's ``postfix`` user with chroot off, listens on 127.0.0.1 only
and is stopped at the end. Missing Postfix skips locally and fails in CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import require_tool
from tests.ports import free_port, wait_port

#: master.cf services Postfix needs besides ours (chroot "n" everywhere: no jail setup)
_MASTER_BASE = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


#: a domain Postfix routes (transport_maps) to a next hop that offers SMTPUTF8: its own
#: smtp-sink does not (it offers DSN), so UTF-8 mail goes to the tests' in-process sink
UTF8_DOMAIN = "例子.测试"


def main_cf(base: Path, gateway_port: int, relay_port: int, utf8_port: int | None = None) -> str:
    """The main.cf of the front Postfix (docs/postfix.md shows the same settings)."""
    utf8_route = (
        f"# tests only: {UTF8_DOMAIN} goes to a sink that offers SMTPUTF8\n"
        f"transport_maps = inline:{{ {{{UTF8_DOMAIN} = smtp:[127.0.0.1]:{utf8_port}}} }}\n"
        if utf8_port
        else ""
    )
    return f"""\
compatibility_level = 3.6
queue_directory = {base}/spool
data_directory = {base}/data
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = mta.acme.test
mydomain = acme.test
myorigin = acme.test
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relay_domains = acme.test
relayhost = [127.0.0.1]:{relay_port}
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtp_dns_support_level = disabled
# UTF-8 addresses and header fields (RFC 6531): Postfix accepts SMTPUTF8 and passes it
# to the gateway, which announces it (and DSN) and passes both on to the reinjection
smtputf8_enable = yes
# SMTP smuggling (CVE-2023-51764): Postfix 3.7 still ends DATA at "<LF>.<LF>" unless
# told otherwise; the gateway refuses bare line ends, but the front MTA must not split
# a message before the gateway sees it. Empty exclusions: local clients too.
smtpd_forbid_bare_newline = yes
smtpd_forbid_bare_newline_exclusions =
# every message goes through the gateway once (the reinjection port switches it off)
content_filter = smimeproxy:[127.0.0.1]:{gateway_port}
# retry deferred mail quickly in tests (production: the defaults)
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
{utf8_route}"""


def master_cf(smtpd_port: int, reinject_port: int) -> str:
    """master.cf: the public smtpd, the filter transport and the reinjection smtpd."""
    return f"""\
127.0.0.1:{smtpd_port} inet n  -       n       -       -       smtpd
# the gateway as content filter: at most 10 parallel deliveries into it
smimeproxy unix  -       -       n       -       10      smtp
  -o smtp_send_xforward_command=no
  -o disable_mime_output_conversion=yes
  -o smtp_generic_maps=
# where the gateway sends what it made: no filter here, or mail would loop
127.0.0.1:{reinject_port} inet n  -       n       -       -       smtpd
  -o content_filter=
  -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks,no_milters
  -o smtpd_helo_restrictions=
  -o smtpd_client_restrictions=
  -o smtpd_sender_restrictions=
  -o smtpd_relay_restrictions=permit_mynetworks,reject
  -o smtpd_recipient_restrictions=permit_mynetworks,reject
  -o mynetworks=127.0.0.0/8
  -o smtpd_authorized_xforward_hosts=127.0.0.0/8
{_MASTER_BASE}"""


def world_readable_tempdir(prefix: str) -> Path:
    """A temporary directory that the ``postfix`` and ``nobody`` users can enter: not
    under pytest's owner-only base (which parallel pytest runs also reset to 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@dataclass
class SinkMessage:
    sender: str
    recipients: list[str]
    data: bytes  # as smtp-sink wrote it: LF line ends, its Received header removed


@dataclass
class SmtpSink:
    """Postfix's smtp-sink on a port, dumping each message into ``directory``."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = require_tool("smtp-sink")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o777)  # smtp-sink drops privileges to "nobody"
        self.process = subprocess.Popen(
            [binary, "-u", "nobody", "-d", f"{self.directory}/%M.", f"127.0.0.1:{self.port}", "50"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def messages(self) -> list[SinkMessage]:
        out = []
        for path in sorted(self.directory.iterdir()):
            out.append(_parse_dump(path.read_bytes()))
        return out


def _parse_dump(raw: bytes) -> SinkMessage:
    lines = raw.split(b"\n")
    sender, rcpts = "", []
    i = 0
    while i < len(lines) and lines[i].startswith(b"X-"):
        name, _, value = lines[i].partition(b": ")
        if name == b"X-Mail-Args":
            sender = value.decode().split(">")[0].lstrip("<")
        elif name == b"X-Rcpt-Args":
            rcpts.append(value.decode().split(">")[0].lstrip("<"))
        i += 1
    # smtp-sink's own Received header and its continuation lines
    if i < len(lines) and lines[i].startswith(b"Received: from") and b"smtp-sink" in lines[i + 1]:
        i += 1
        while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
            i += 1
    return SinkMessage(sender, rcpts, b"\n".join(lines[i:]))


@dataclass
class Postfix:
    """One throwaway Postfix instance under ``base`` (``postfix -c base/etc``)."""

    base: Path
    gateway_port: int
    relay_port: int
    #: the port of a next hop offering SMTPUTF8, for mail to UTF8_DOMAIN (None: none)
    utf8_port: int | None = None
    smtpd_port: int = field(default_factory=free_port)
    reinject_port: int = field(default_factory=free_port)

    @property
    def config_dir(self) -> Path:
        return self.base / "etc"

    def _postfix(self, *args: str) -> subprocess.CompletedProcess:
        binary = shutil.which("postfix") or require_tool("postfix")
        return subprocess.run(
            [binary, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def start(self) -> None:
        require_tool("postfix")
        if os.geteuid() != 0:
            raise RuntimeError("a throwaway Postfix must be started as root")
        self.config_dir.mkdir(parents=True)
        for d in ("spool", "data"):
            (self.base / d).mkdir()
        shutil.chown(self.base / "data", "postfix", "postfix")
        (self.config_dir / "main.cf").write_text(
            main_cf(self.base, self.gateway_port, self.relay_port, self.utf8_port),
            encoding="utf-8",
        )
        (self.config_dir / "master.cf").write_text(master_cf(self.smtpd_port, self.reinject_port))
        for name in ("dynamicmaps.cf",):
            shutil.copy(f"/etc/postfix/{name}", self.config_dir / name)
        # "check" creates the queue directories with their owners and modes
        done = self._postfix("check")
        if done.returncode == 0:
            done = self._postfix("start")
        if done.returncode != 0:
            raise RuntimeError(f"postfix start failed: {done.stderr}\n{self.log()}")
        wait_port(self.smtpd_port)
        wait_port(self.reinject_port)

    def flush(self) -> None:
        self._postfix("flush")

    def stop(self) -> None:
        self._postfix("stop")

    def log(self) -> str:
        path = self.base / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""
