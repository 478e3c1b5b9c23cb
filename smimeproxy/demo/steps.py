"""The demo's walkthrough, step by step, as a partner, a mail client and an operator
would see it. Every step talks to the running servers over 127.0.0.1 with the standard
library (smtplib, imaplib, urllib) or the product's own CLI, so what it prints is what
anyone can reproduce by hand.

These functions block: the demo runs them in a thread while the reactor serves.
Not guaranteed: stable wording of the output beyond the markers the test looks for
(``smime=pass``, ``application/pkcs7-mime``, the archive hit, the SMIMEA answer).
"""

from __future__ import annotations

import email
import email.policy
import imaplib
import io
import shutil
import smtplib
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from smimeproxy import cli
from smimeproxy.errors import SMIMEProxyError
from smimeproxy.pki.smimea import smimea_owner_name
from smimeproxy.smime.keys import KeyPair
from smimeproxy.smime.sealer import seal

ALICE = "alice@acme.test"
BOB = "bob@partner.test"

INBOUND = b"""\
From: Bob Babbage <bob@partner.test>\r
To: Alice <alice@acme.test>\r
Subject: Contract draft, version 3\r
Date: Sat, 28 Nov 2026 09:30:00 +0000\r
Message-ID: <draft3@partner.test>\r
MIME-Version: 1.0\r
Content-Type: text/plain; charset=utf-8\r
\r
Hello Alice,\r
\r
here is the third draft of the contract; clause 7 now caps liability at EUR 2m.\r
\r
Bob\r
"""


@dataclass(frozen=True)
class Ports:
    """Where everything listens (all on 127.0.0.1)."""

    smtp: int
    sink: int
    imap: int
    dns: int
    http: int
    metrics: int
    dovecot: int


class DemoFailed(SMIMEProxyError):
    """A step did not see what it expected (the message names the step)."""


def heading(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 72 - len(title)), flush=True)


def indent(text: str, limit: int = 40) -> None:
    lines = text.rstrip("\n").splitlines()
    for line in lines[:limit]:
        print("  " + line)
    if len(lines) > limit:
        print(f"  ... ({len(lines) - limit} more lines)")


def run_cli(config: Path, *args: str) -> str:
    """``smimeproxy --config CONFIG ARGS`` in this process; prints and returns its output."""
    print(f"$ smimeproxy --config {config} {' '.join(args)}", flush=True)
    out, err = io.BytesIO(), io.StringIO()
    status = cli.main(["--config", str(config), *args], stdout=out, stderr=err)
    text = out.getvalue().decode("utf-8", "replace")
    indent(text + err.getvalue(), 20)
    if status != 0:
        raise DemoFailed(f"smimeproxy {args[0]} exited with {status}: {err.getvalue().strip()}")
    return text


def partner_sends(ports: Ports, bob: KeyPair) -> bytes:
    """Bob fetches Alice's certificate from the directory, signs and encrypts, sends."""
    heading("1. the partner fetches Alice's certificate from the directory (HTTP)")
    url = f"http://127.0.0.1:{ports.http}/certs/{ALICE}"
    print(f"GET {url}")
    with urllib.request.urlopen(url, timeout=10) as response:
        pem = response.read()
    alice = x509.load_pem_x509_certificate(pem)
    print(f"  {alice.subject.rfc4514_string()}, valid until {alice.not_valid_after_utc:%Y-%m-%d}")

    heading("2. the partner's mail client signs and encrypts, and sends it to our gateway")
    sealed = seal(INBOUND, signer=bob, recipients=[alice, bob.certificate])
    indent(sealed.decode("ascii", "replace"), 8)
    with smtplib.SMTP("127.0.0.1", ports.smtp, timeout=30) as client:
        refused = client.sendmail(BOB, [ALICE], sealed)
    if refused:
        raise DemoFailed(f"the gateway refused {refused}")
    print(f"  smtplib: {BOB} -> {ALICE} via 127.0.0.1:{ports.smtp}: accepted (250)")
    return sealed


def wait_for_delivery(maildir: Path, timeout: float = 30.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = sorted((maildir / "new").glob("*")) + sorted((maildir / "cur").glob("*"))
        if files:
            return files[-1]
        time.sleep(0.1)
    raise DemoFailed(f"nothing was delivered into {maildir} within {timeout:.0f}s")


def dovecot_holds_ciphertext(maildir: Path, shown_as: Path | None = None) -> Path:
    """The file Dovecot got; ``shown_as`` is the Maildir's name to print (a symlink)."""
    heading("3. what Dovecot stores (inbound_storage = keep-encrypted): ciphertext")
    path = wait_for_delivery(maildir)
    print(f"{(shown_as or maildir) / path.relative_to(maildir)}")
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
    for name in ("From", "To", "Subject", "Content-Type"):
        print(f"  {name}: {' '.join(str(msg[name]).split())}")
    body = msg.get_payload()
    if isinstance(body, str):
        indent(body.strip(), 3)
    if msg.get_content_type() != "application/pkcs7-mime":
        raise DemoFailed(f"Dovecot holds {msg.get_content_type()}, not ciphertext")
    return path


def read_through_proxy(ports: Ports, password: str) -> str:
    heading("4. Alice's mail client reads it through the IMAP proxy: decrypted, verified")
    print(f"imaplib: LOGIN alice at 127.0.0.1:{ports.imap}, FETCH BODY.PEEK[]")
    client = imaplib.IMAP4("127.0.0.1", ports.imap)
    try:
        client.login("alice", password)
        client.select("INBOX", readonly=True)
        typ, data = client.uid("SEARCH", None, "ALL")  # type: ignore[arg-type]
        uids = data[0].split() if typ == "OK" and data and data[0] else []
        if not uids:
            raise DemoFailed("the INBOX seen through the proxy is empty")
        typ, fetched = client.uid("FETCH", uids[-1].decode(), "(BODY.PEEK[])")
        raw = next(
            (item[1] for item in fetched if isinstance(item, tuple)), None
        )  # (envelope, literal)
        client.logout()
    except imaplib.IMAP4.error as exc:
        raise DemoFailed(f"IMAP through the proxy failed: {exc}") from None
    if not isinstance(raw, bytes):
        raise DemoFailed("the proxy returned no message body")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    lines = [
        f"{name}: {' '.join(str(msg[name]).split())}"
        for name in ("From", "To", "Subject", "Authentication-Results")
        if msg[name]
    ]
    lines.append("")
    for part in msg.walk():
        if part.get_content_type() == "text/plain":
            lines.append(part.get_content().rstrip())
            lines.append("")
    view = "\n".join(lines)
    indent(view, 60)
    return view


def archive(config: Path) -> str:
    heading("5. the archive indexes Alice's Maildir (decrypting with her keys) and searches it")
    run_cli(config, "archive", "index")
    return run_cli(config, "archive", "search", "liability")


def smimea_record(ports: Ports) -> str:
    heading("6. Alice's SMIMEA record (RFC 8162) from the directory's DNS server")
    name = smimea_owner_name(ALICE)
    dig = shutil.which("dig")
    if dig is None:
        raise DemoFailed("dig is not installed (apt-get install -y bind9-dnsutils)")
    command = [dig, "@127.0.0.1", "-p", str(ports.dns), name, "SMIMEA", "+norecurse"]
    print("$ " + " ".join(["dig", *command[1:]]))
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    answer = [
        line for line in done.stdout.splitlines() if "\tSMIMEA\t" in line or " SMIMEA " in line
    ]
    answer = [line for line in answer if not line.startswith(";")]
    for line in answer:
        print("  " + (line if len(line) < 140 else line[:137] + "..."))
    if not answer:
        indent(done.stdout + done.stderr, 30)
        raise DemoFailed("the directory gave no SMIMEA answer")
    return "\n".join(answer)


def metrics(ports: Ports) -> str:
    heading("7. Prometheus metrics")
    url = f"http://127.0.0.1:{ports.metrics}/metrics"
    print(f"GET {url}")
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode("utf-8", "replace")
    samples = [
        line
        for line in text.splitlines()
        if line.startswith("smimeproxy_") and "_bucket{" not in line
    ]
    # counters that moved first, then the rest (a fresh process has many zeros)
    shown = [line for line in samples if not line.endswith(" 0")] or samples
    indent("\n".join(shown), 30)
    return text


def how_to_connect(ports: Ports, password: str, base: Path) -> None:
    heading("point a real mail client at it")
    print(
        f"""  IMAP (incoming):  127.0.0.1 port {ports.imap}, no encryption, normal password
                    user alice, password {password}   (the proxy; Dovecot itself is on
                    port {ports.dovecot} and holds only ciphertext)
  SMTP (outgoing):  127.0.0.1 port {ports.smtp}, no encryption, no authentication
                    (the gateway; its next hop files mail for {ALICE} into Dovecot)
  DNS (SMIMEA):     dig @127.0.0.1 -p {ports.dns} {smimea_owner_name(ALICE)} SMIMEA
  Certificates:     http://127.0.0.1:{ports.http}/certs/{ALICE}
  Metrics:          http://127.0.0.1:{ports.metrics}/metrics
  Files and logs:   {base}/ (config smimeproxy.toml, log smimeproxy.log)"""
    )
