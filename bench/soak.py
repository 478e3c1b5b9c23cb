"""Soak: SMTP both ways and IMAP clients together against one real node, with faults.

One ``twistd -n smimeproxy`` process runs the gateway and the IMAP proxy on a fresh
SQLite store (internal CA, alice local with a key, dave a partner whose certificate is
known). Its SMTP next hop is a sink in this process, its IMAP upstream a real Dovecot.
For ``--seconds`` (default 180): one thread sends alice -> dave (signed and encrypted),
one sends dave -> alice (inbound, opened), ``--imap-clients`` threads log in through
the proxy and fetch encrypted messages (decrypted by the proxy). A third of the way in,
the next hop and Dovecot are stopped for ``--outage`` seconds and then restarted.

Reported: messages accepted (250 from the gateway) against delivered (reached the
sink), by Message-ID: they must be the same set (a refused message is retried by the
sender, as an MTA would); IMAP errors outside the outage window (must be none); the
node's resident memory after warm-up and at the end (should be flat). Not a test: it
prints numbers; exit status 1 when accepted != delivered or IMAP errors happened
outside the outage.
"""

from __future__ import annotations

import argparse
import imaplib
import io
import os
import random
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smimeproxy.cli import main as cli_main  # noqa: E402
from smimeproxy.keystore import MasterSecret, create_key_file, open_store  # noqa: E402
from smimeproxy.servers.dovecot import find_dovecot  # noqa: E402
from smimeproxy.smime.sealer import seal  # noqa: E402
from smimeproxy.testing import CertificateFactory  # noqa: E402
from tests.integration.dovecot import start_dovecot  # noqa: E402
from tests.ports import free_port  # noqa: E402

ALICE, DAVE = "alice@acme.test", "dave@partner.test"


class Sink:
    """The next hop: accepts everything; can be stopped (every connection cut) and
    started again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.delivered: set[str] = set()
        self.lock = threading.Lock()
        self.conns: set[socket.socket] = set()
        self.sock: socket.socket | None = None
        self.start()

    def start(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self.sock = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def stop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        with self.lock:
            for conn in list(self.conns):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self.conns.clear()

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with self.lock:
                self.conns.add(conn)
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        try:
            with conn.makefile("rb") as lines:
                conn.sendall(b"220 sink\r\n")
                for line in lines:
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        conn.sendall(b"250-sink\r\n250 PIPELINING\r\n")
                    elif verb == b"DATA":
                        conn.sendall(b"354 go\r\n")
                        ids = []
                        for data_line in lines:
                            if data_line == b".\r\n":
                                break
                            if data_line.lower().startswith(b"message-id:"):
                                ids.append(data_line.split(b":", 1)[1].strip().decode())
                        else:
                            return  # cut mid-DATA: not delivered
                        conn.sendall(b"250 ok\r\n")
                        with self.lock:
                            self.delivered.update(ids)
                    elif verb == b"QUIT":
                        conn.sendall(b"221 bye\r\n")
                        return
                    else:
                        conn.sendall(b"250 ok\r\n")
        except OSError:
            pass
        finally:
            with self.lock:
                self.conns.discard(conn)
            conn.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cli(config: Path, *args: str) -> None:
    err = io.StringIO()
    rc = cli_main(
        ["--config", str(config), *args], stdin=io.BytesIO(), stdout=io.BytesIO(), stderr=err
    )
    if rc != 0:
        raise SystemExit(f"smimeproxy {' '.join(args)}: {err.getvalue()}")


class Soak:
    def __init__(self, args: argparse.Namespace, base: Path):
        self.args = args
        self.base = base
        self.accepted: set[str] = set()
        self.tempfails = 0
        self.imap_ok = 0
        self.imap_errors: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.stop_at = 0.0
        self.outage = (float("inf"), float("inf"))

    # -- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        base = self.base
        partner = CertificateFactory()
        self.dave = partner.user(DAVE)
        create_key_file(base / "master.key")
        store = open_store(
            f"sqlite:{base / 'store.db'}", MasterSecret.from_file(base / "master.key"), create=True
        )
        store.add_trust(partner.root.certificate)
        store.import_certificate(self.dave.certificate)
        store.close()
        self.dovecot = start_dovecot(base, {"alice": "alice-pw"})
        self.sink = Sink()
        self.smtp_port, self.imap_port = free_port(), free_port()
        self.config = base / "smimeproxy.toml"
        self.config.write_text(
            f'[keystore]\nurl = "sqlite:store.db"\nmaster_key_file = "master.key"\n'
            "[smtp]\n"
            f'listen = ["tcp:{self.smtp_port}:interface=127.0.0.1"]\n'
            f'next_hop = "tcp:127.0.0.1:{self.sink.port}"\n'
            'local_domains = ["acme.test"]\nauthserv_id = "acme.test"\n'
            'outbound_policy = "encrypt-if-possible"\nnext_hop_timeout = 10\n'
            "[imap]\n"
            f'listen = ["tcp:{self.imap_port}:interface=127.0.0.1"]\n'
            f'upstream = "tcp:127.0.0.1:{self.dovecot.port}"\nplaintext_login = true\n'
        )
        cli(self.config, "ca", "init", "--issuing")
        cli(self.config, "users", "add", ALICE, "--login", "alice")
        cli(self.config, "keys", "generate", "--user", ALICE, "--kind", "p256")
        store = open_store(
            f"sqlite:{base / 'store.db'}", MasterSecret.from_file(base / "master.key")
        )
        alice_cert = store.signing_key(ALICE).pair.certificate
        store.close()
        direct = imaplib.IMAP4("127.0.0.1", self.dovecot.port)
        direct.login("alice", "alice-pw")
        for n in range(20):
            body = f"From: {DAVE}\r\nTo: {ALICE}\r\nSubject: stored {n}\r\n\r\nsecret {n}\r\n"
            direct.append("INBOX", None, None, seal(body.encode(), recipients=[alice_cert]))
        direct.logout()
        self.log = base / "twistd.log"
        self.node = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
             "--pidfile=", f"--logfile={self.log}", "smimeproxy", "--config", str(self.config)],
            cwd=base,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while "service.reload_on_sighup" not in (self.log.read_text() if self.log.exists() else ""):
            if self.node.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the node did not start: " + self.log.read_text()[-2000:])
            time.sleep(0.1)

    # -- load ----------------------------------------------------------------------------
    def smtp_worker(self, sender: str, recipient: str) -> None:
        pending: str | None = None
        while time.monotonic() < self.stop_at:
            message_id = pending or f"<{time.time_ns()}.{random.getrandbits(32)}@soak>"
            data = (
                f"From: {sender}\r\nTo: {recipient}\r\nSubject: soak\r\n"
                f"Message-ID: {message_id}\r\nContent-Type: text/plain\r\n\r\n"
                + "line of text\r\n"
                * 20
            ).encode()
            try:
                with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as client:
                    client.sendmail(sender, [recipient], data)
            except (smtplib.SMTPException, OSError):
                pending = message_id  # retried, as a sending MTA would
                with self.lock:
                    self.tempfails += 1
                time.sleep(0.5)
                continue
            pending = None
            with self.lock:
                self.accepted.add(message_id)

    def imap_worker(self) -> None:
        while time.monotonic() < self.stop_at:
            try:
                client = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=30)
                client.login("alice", "alice-pw")
                client.select("INBOX", readonly=True)
                for _ in range(5):
                    uid = random.randint(1, 20)
                    typ, data = client.uid("FETCH", str(uid), "(BODY.PEEK[])")
                    if typ != "OK" or b"secret" not in b"".join(
                        p[1] for p in data if isinstance(p, tuple)
                    ):
                        raise imaplib.IMAP4.error(f"fetch {uid}: {typ}")
                client.logout()
                with self.lock:
                    self.imap_ok += 1
            except (imaplib.IMAP4.error, OSError, EOFError) as e:
                with self.lock:
                    self.imap_errors.append((time.monotonic(), f"{type(e).__name__}: {e}"))
                time.sleep(0.5)

    def faults(self, start: float) -> None:
        time.sleep(max(0.0, start - time.monotonic()))
        begin = time.monotonic()
        self.sink.stop()
        self.dovecot.process.terminate()
        self.dovecot.process.wait(10)
        time.sleep(self.args.outage)
        conf = self.dovecot.base / "dovecot.conf"
        binary = find_dovecot() or "dovecot"
        self.dovecot.process = subprocess.Popen(
            [binary, "-F", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.sink.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.dovecot.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        self.outage = (begin, time.monotonic())

    def run(self) -> int:
        args = self.args
        self.setup()
        warm = time.monotonic() + min(10.0, args.seconds / 10)
        self.stop_at = time.monotonic() + args.seconds
        threads = [
            threading.Thread(target=self.smtp_worker, args=(ALICE, DAVE)),
            threading.Thread(target=self.smtp_worker, args=(DAVE, ALICE)),
            *(threading.Thread(target=self.imap_worker) for _ in range(args.imap_clients)),
            threading.Thread(target=self.faults, args=(time.monotonic() + args.seconds / 3,)),
        ]
        for t in threads:
            t.start()
        time.sleep(max(0.0, warm - time.monotonic()))
        rss_start = rss_kib(self.node.pid)
        for t in threads:
            t.join()
        rss_end = rss_kib(self.node.pid)
        time.sleep(1)  # the last replies' deliveries are done before their 250, but be sure
        grace_start, grace_end = self.outage[0] - 1, self.outage[1] + 5
        unexpected = [e for e in self.imap_errors if not grace_start <= e[0] <= grace_end]
        delivered = set(self.sink.delivered)
        outage = self.outage[1] - self.outage[0]
        print(f"duration            {args.seconds:.0f} s (outage {outage:.1f} s)")
        print(f"smtp accepted       {len(self.accepted)}")
        duplicates = len(delivered - self.accepted)
        print(
            f"smtp delivered      {len(delivered & self.accepted)}"
            f" (+{duplicates} delivered but refused to the sender: duplicates on retry)"
        )
        print(f"smtp tempfails      {self.tempfails} (retried)")
        print(f"imap sessions ok    {self.imap_ok}")
        print(f"imap errors         {len(self.imap_errors)} ({len(unexpected)} outside the outage)")
        for _, text in unexpected[:5]:
            print(f"  {text}")
        growth = (rss_end - rss_start) / max(rss_start, 1)
        print(
            f"node RSS            {rss_start} KiB after warm-up, {rss_end} KiB at the end"
            f" ({growth:+.1%})"
        )
        missing = self.accepted - delivered
        return 0 if not missing and not unexpected else 1

    def close(self) -> None:
        if getattr(self, "node", None) is not None and self.node.poll() is None:
            self.node.send_signal(signal.SIGTERM)
            self.node.wait(40)
        if getattr(self, "sink", None) is not None:
            self.sink.stop()
        if getattr(self, "dovecot", None) is not None:
            self.dovecot.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--outage", type=float, default=10.0)
    parser.add_argument("--imap-clients", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="smimeproxy-soak-") as tmp:
        soak = Soak(args, Path(tmp))
        try:
            return soak.run()
        finally:
            soak.close()


if __name__ == "__main__":
    sys.exit(main())
