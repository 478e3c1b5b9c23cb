"""Throwaway BIND 9 and unbound servers on 127.0.0.1 for the directory's tests.

``BindServer``: the primary for ``acme.test``, DNSSEC-signed inline (``dnssec-policy
default; inline-signing yes``), accepting RFC 2136 updates and zone transfers signed
with one TSIG key. ``UnboundServer``: a validating resolver with a stub zone for
``acme.test`` pointing at it and that zone's DNSKEY as trust anchor. Both run in the
foreground as child processes, with configs and working directories in a temporary
directory and free ports; named drops to Debian's ``bind`` user when started as root.
A missing binary skips locally and fails in CI (``require_tool``).
"""

from __future__ import annotations

import base64
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import require_tool

ZONE_TEXT = """\
$TTL 300
@    IN SOA ns1.acme.test. hostmaster.acme.test. 1 3600 600 86400 60
@    IN NS  ns1.acme.test.
ns1  IN A   127.0.0.1
"""


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as t:
            t.bind(("127.0.0.1", 0))
            port = int(t.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def dig(*args: str) -> str:
    return subprocess.run(
        [require_tool("dig"), "+time=3", "+tries=2", *args],
        capture_output=True,
        text=True,
        check=False,
    ).stdout


class BindServer:
    """named for ``acme.test``; ``key_file`` is the TSIG key in BIND's format."""

    def __init__(self, workdir: Path, key_name: str = "smimeproxy-push") -> None:
        self.named = require_tool("named")
        self.dir = workdir
        self.port = free_port()
        self.key_name = key_name
        self.secret = base64.b64encode(os.urandom(32)).decode()
        self.key_file = workdir / "tsig.key"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        d = self.dir
        (d / "keys").mkdir(parents=True, exist_ok=True)
        key_clause = (
            f'key "{self.key_name}" {{\n\talgorithm hmac-sha256;\n\tsecret "{self.secret}";\n}};\n'
        )
        self.key_file.write_text(key_clause)
        (d / "acme.test.db").write_text(ZONE_TEXT)
        (d / "named.conf").write_text(
            f"""
options {{
    directory "{d}";
    listen-on port {self.port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    pid-file "{d}/named.pid";
    session-keyfile "{d}/session.key";
    managed-keys-directory "{d}";
    key-directory "{d}/keys";
    recursion no;
    dnssec-validation no;
    notify no;
    minimal-responses yes;
}};
controls {{ }};
{key_clause}
zone "acme.test" {{
    type primary;
    file "{d}/acme.test.db";
    dnssec-policy default;
    inline-signing yes;
    allow-update {{ key "{self.key_name}"; }};
    allow-transfer {{ key "{self.key_name}"; }};
}};
"""
        )
        argv = [self.named, "-g", "-c", str(d / "named.conf"), "-n", "1"]
        if os.geteuid() == 0:
            try:
                bind = pwd.getpwnam("bind")
            except KeyError:
                bind = None
            if bind is not None:
                for path in [d, *d.rglob("*")]:
                    os.chown(path, bind.pw_uid, bind.pw_gid)
                argv += ["-u", "bind"]
        self.log = open(d / "named.log", "wb")
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self.wait_signed()
        except BaseException:
            self.stop()
            raise

    def wait_signed(self, timeout: float = 30.0) -> None:
        """Until the zone answers its SOA with an RRSIG (inline signing done)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"named exited: {(self.dir / 'named.log').read_text()[-2000:]}")
            out = dig("@127.0.0.1", "-p", str(self.port), "+dnssec", "acme.test", "SOA")
            if "RRSIG" in out and "status: NOERROR" in out:
                return
            time.sleep(0.2)
        raise RuntimeError(
            f"zone not signed in time: {(self.dir / 'named.log').read_text()[-2000:]}"
        )

    def ksk(self) -> str:
        """The zone's key-signing DNSKEY as one presentation line (a trust anchor)."""
        out = dig("@127.0.0.1", "-p", str(self.port), "+noall", "+answer", "acme.test", "DNSKEY")
        for line in out.splitlines():
            parts = line.split()
            if len(parts) > 5 and parts[3] == "DNSKEY" and parts[4] == "257":
                return " ".join([parts[0], "DNSKEY", *parts[4:]])
        raise RuntimeError(f"no KSK in {out!r}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.log.close()


class UnboundServer:
    """A validating unbound for ``acme.test`` (stub to BIND, the KSK as anchor)."""

    def __init__(self, workdir: Path, bind: BindServer) -> None:
        self.unbound = require_tool("unbound")
        self.dir = workdir
        self.bind = bind
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        (d / "unbound.conf").write_text(
            f"""
server:
    interface: 127.0.0.1
    port: {self.port}
    do-ip6: no
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{d}"
    pidfile: "{d}/unbound.pid"
    use-syslog: no
    logfile: ""
    verbosity: 1
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    local-zone: "test." nodefault
    module-config: "validator iterator"
    trust-anchor: "{self.bind.ksk()}"
    val-log-level: 2
    cache-max-negative-ttl: 0
    msg-cache-size: 1m
    rrset-cache-size: 1m
stub-zone:
    name: "acme.test"
    stub-addr: 127.0.0.1@{self.bind.port}
remote-control:
    control-enable: no
"""
        )
        self.log = open(d / "unbound.log", "wb")
        self.process = subprocess.Popen(
            [self.unbound, "-d", "-c", str(d / "unbound.conf")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"unbound exited: {(d / 'unbound.log').read_text()[-2000:]}")
            if "status: NOERROR" in dig("@127.0.0.1", "-p", str(self.port), "acme.test", "SOA"):
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("unbound did not answer in time")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.log.close()


def have(name: str) -> bool:
    return shutil.which(name) is not None
