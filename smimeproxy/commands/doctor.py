"""``smimeproxy doctor``: what is wrong with this installation, and how to fix it.

Each check gives ``ok``, ``warn`` or ``FAIL`` with a detail and a fix; the exit status
is 1 when anything failed. Checks: the configuration, file permissions of secrets and
the store, the master secret, the upstream IMAP server and the SMTP next hop
(reachability, and TLS where configured), trust anchors, and certificates (ours and
the trust anchors) that expire within 30 days.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from smimeproxy.commands.common import IO, print_json, table
from smimeproxy.config import Config, Endpoint, load_config, parse_endpoint
from smimeproxy.errors import SMIMEProxyError

EXPIRY_WARNING = datetime.timedelta(days=30)


@dataclass(frozen=True)
class Finding:
    check: str
    status: str  # "ok", "warn", "FAIL"
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status, "detail": self.detail, "fix": self.fix}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "doctor",
        help="check the configuration, secrets, servers, trust and expiring certificates",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument("--json", action="store_true", help="findings as JSON")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per network check")
    p.set_defaults(func=doctor_command)


def _private(path: Path, what: str, *, directory: bool = False) -> Finding:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return Finding(
            f"{what} permissions",
            "FAIL",
            f"{path} does not exist",
            "run `smimeproxy --config F init`",
        )
    loose = mode & 0o077
    if loose:
        want = "700" if directory else "600"
        return Finding(
            f"{what} permissions",
            "FAIL",
            f"{path} is mode {mode:o}: others can read it",
            f"chmod {want} {path}",
        )
    return Finding(f"{what} permissions", "ok", f"{path} is mode {mode:o}")


def _connect(endpoint: Endpoint, timeout: float) -> socket.socket:
    """A connected socket to a ``tcp:``/``ssl:``/``unix:`` client endpoint (OSError)."""
    if endpoint.type == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(endpoint.params.get("path", ""))
        except OSError:
            sock.close()
            raise
        return sock
    address = (endpoint.params.get("host", ""), int(endpoint.params.get("port", "0") or 0))
    return socket.create_connection(address, timeout=timeout)


def _where(endpoint: Endpoint) -> str:
    if endpoint.type == "unix":
        return f"unix socket {endpoint.params.get('path', '')}"
    return f"{endpoint.params.get('host', '')}:{endpoint.params.get('port', '')}"


def _unreachable(name: str, endpoint: Endpoint, error: OSError) -> Finding:
    fix = (
        "start the server, or fix the path and the socket's permissions"
        if endpoint.type == "unix"
        else "start the server or fix host/port in the config"
    )
    return Finding(name, "FAIL", f"{_where(endpoint)} unreachable: {error.strerror or error}", fix)


def _reach(name: str, description: str, timeout: float, tls_hint: bool) -> Finding:
    try:
        endpoint = parse_endpoint(description, "client")
    except SMIMEProxyError as e:
        return Finding(name, "FAIL", f"{description}: {e}", "fix the endpoint string")
    where = _where(endpoint)
    try:
        with _connect(endpoint, timeout) as sock:
            if endpoint.type == "unix":
                return Finding(name, "ok", f"{where} accepts connections")
            if endpoint.type in ("ssl", "tls"):
                context = ssl.create_default_context()
                host = endpoint.params.get("host", "")
                with context.wrap_socket(sock, server_hostname=host) as tls:
                    return Finding(name, "ok", f"{where} TLS {tls.version()}, certificate valid")
            note = "" if not tls_hint else " (plain TCP; STARTTLS is negotiated later)"
            return Finding(name, "ok", f"{where} reachable{note}")
    except ssl.SSLError as e:
        return Finding(
            name,
            "FAIL",
            f"{where} TLS failed: {e.reason or e}",
            "check the server certificate and the CA file",
        )
    except OSError as e:
        return _unreachable(name, endpoint, e)


def _expiry(label: str, cert, now: datetime.datetime) -> Finding | None:  # type: ignore[no-untyped-def]
    left = cert.not_valid_after_utc - now
    subject = cert.subject.rfc4514_string()
    if left < datetime.timedelta(0):
        return Finding(
            f"{label} expiry",
            "FAIL",
            f"{subject} expired {-left.days} days ago",
            "renew it (smimeproxy keys rotate --user ADDRESS) or remove it",
        )
    if left < EXPIRY_WARNING:
        return Finding(
            f"{label} expiry",
            "warn",
            f"{subject} expires in {left.days} days",
            "renew it before it expires (smimeproxy keys rotate)",
        )
    return None


def _store_checks(config: Config, findings: list[Finding]) -> None:
    from smimeproxy.processing import open_configured_store

    try:
        store = open_configured_store(config)
    except SMIMEProxyError as e:
        findings.append(
            Finding(
                "master secret / store",
                "FAIL",
                str(e),
                "give the right master key, or run init for a new store",
            )
        )
        return
    findings.append(Finding("master secret / store", "ok", f"{config.keystore.url} opens"))
    now = datetime.datetime.now(datetime.UTC)
    try:
        anchors = store.trust_anchors()
        if not anchors and not config.smime.trust_anchors:
            findings.append(
                Finding(
                    "trust anchors",
                    "warn",
                    "none configured: no signature can verify",
                    "smimeproxy --config F trust add CA.pem",
                )
            )
        else:
            findings.append(
                Finding(
                    "trust anchors",
                    "ok",
                    f"{len(anchors) + len(config.smime.trust_anchors)} anchors",
                )
            )
        for cert in anchors:
            f = _expiry("trust anchor", cert, now)
            if f:
                findings.append(f)
        expiring = 0
        for record in store.keys():
            if str(record.state) != "current":
                continue
            f = _expiry("user certificate", record.certificate, now)
            if f:
                findings.append(f)
                expiring += 1
        if not expiring:
            findings.append(Finding("user certificates", "ok", "none expire within 30 days"))
    finally:
        store.close()


def diagnose(config_path: str, timeout: float = 3.0) -> list[Finding]:
    findings: list[Finding] = []
    try:
        config = load_config(config_path)
    except SMIMEProxyError as e:
        return [Finding("configuration", "FAIL", str(e), "fix the key named above")]
    findings.append(Finding("configuration", "ok", f"{config.path} loads"))
    if config.keystore.master_key_file:
        findings.append(_private(config.keystore.master_key_file, "master key file"))
    if config.keystore.sqlite_path:
        findings.append(_private(config.keystore.sqlite_path, "store database"))
    if config.archive is not None and config.archive.index_dir.exists():
        findings.append(_private(config.archive.index_dir, "archive index", directory=True))
    _store_checks(config, findings)
    if config.imap is not None:
        findings.append(_reach("IMAP upstream", config.imap.upstream, timeout, True))
    if config.smtp is not None:
        findings.append(_reach("SMTP next hop", config.smtp.next_hop, timeout, True))
        if config.smtp.auth_dovecot:
            findings.append(_dovecot_auth(config.smtp.auth_dovecot, timeout))
    if any(face is not None and face.workers > 0 for face in (config.smtp, config.imap)):
        findings.append(_workers(config))
    return findings


def _workers(config: Config) -> Finding:
    """``[smtp]``/``[imap] workers``: one engine worker started as the service would
    start it, asked whether it opened the store."""
    from smimeproxy.processing import master_secret
    from smimeproxy.workers import WorkerSpec, probe

    name = "engine worker processes"
    try:
        error = probe(WorkerSpec(str(config.path), master_secret(config.keystore), config.document))
    except SMIMEProxyError as e:
        error = str(e)
    if error is not None:
        return Finding(name, "FAIL", error, "fix what the worker names; it runs this Python")
    return Finding(name, "ok", "a worker started and opened the key store")


def _dovecot_auth(description: str, timeout: float) -> Finding:
    """The submission listener's Dovecot auth socket: reachable, and it completes the
    handshake offering PLAIN (what the gateway hands every AUTH on as)."""
    from smimeproxy.smtp.dovecot_auth import AuthClientCodec, AuthProtocolError, Ready

    name = "Dovecot auth socket"
    endpoint = parse_endpoint(description, "client")  # checked when the config loaded
    codec = AuthClientCodec(os.getpid())
    try:
        sock = _connect(endpoint, timeout)
    except OSError as e:
        return _unreachable(name, endpoint, e)
    try:
        with sock:
            sock.sendall(codec.hello())
            while True:
                data = sock.recv(65536)
                if not data:
                    raise AuthProtocolError("the server closed the connection")
                ready = [e for e in codec.receive(data) if isinstance(e, Ready)]
                if ready:
                    break
    except (OSError, AuthProtocolError) as e:
        return Finding(
            name,
            "FAIL",
            f"{description}: no Dovecot auth handshake ({e})",
            "point auth_dovecot at Dovecot's auth-client unix_listener",
        )
    mechanisms = ready[0].mechanisms
    if "PLAIN" not in {m.upper() for m in mechanisms}:
        return Finding(
            name,
            "FAIL",
            f"Dovecot offers {', '.join(mechanisms) or 'no mechanism'}, not PLAIN",
            "add plain to auth_mechanisms in Dovecot's 10-auth.conf",
        )
    return Finding(name, "ok", f"{description}: Dovecot offers {', '.join(mechanisms)}")


def doctor_command(args: argparse.Namespace, io: IO) -> int:
    if not args.config:
        io.error("doctor needs --config FILE (before the subcommand)")
        return 2
    findings = diagnose(args.config, args.timeout)
    if args.json:
        print_json([f.as_dict() for f in findings], io.stdout)
    else:
        io.write(
            table(
                [(f.status, f.check, f.detail, f.fix) for f in findings],
                ("status", "check", "detail", "how to fix"),
            )
        )
    return 1 if any(f.status == "FAIL" for f in findings) else 0
