"""Benchmark: the archive index pass and search over a Maildir of 10,000 messages.

The corpus is made with our own engine (``seal``): 20% of the messages encrypted
(AES-256-CBC, RSA-2048 key transport) to the owner's current or rotated-out key, the
rest plain text of a few KB, with varied senders, subjects and dates.

It measures, in one process (one core):

* the direct path: reading each file and parsing it with the standard library's
  ``email`` package (the floor any indexer pays);
* the archive pass (``index_pass``): messages per second, and the share of time spent
  opening (decrypting, verifying) against the rest (extracting, indexing, storing the
  original, committing state); the ratio pass/direct;
* search latency p50/p95 over a mix of field, date-range, flag and body queries.

Targets (issue 6): >= 150 messages/s on one core, p95 search < 100 ms.
Not a test: numbers depend on the machine. Run: ``python bench/archive.py [-n 10000]``.
"""

from __future__ import annotations

import argparse
import email
import mailbox
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from smimeproxy.archive.operations import LocalArchive, index_pass
from smimeproxy.archive.sources import maildir_folders
from smimeproxy.config import load_config
from smimeproxy.keystore import create_key_file
from smimeproxy.processing import MessageProcessor, open_configured_store
from smimeproxy.smime.sealer import seal
from smimeproxy.testing import CertificateFactory

OWNER = "alice@acme.test"
SENDERS = ["carol@partner.test", "dave@supplier.test", "erin@bank.test", "frank@acme.test"]
TOPICS = ["invoice", "contract", "meeting", "report", "lunch", "audit", "merger", "travel"]
WORDS = (
    "the quarterly numbers look fine but the supplier asked for an extension on payment "
    "terms please review the attached schedule before friday and confirm the budget"
).split()

MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()

CONFIG = """\
[keystore]
url = "sqlite:var/store.db"
master_key_file = "var/master.key"

[smime]
authserv_id = "acme.test"
revocation = "off"

[archive]
index_dir = "var/index"
"""


def make_message(rng: random.Random, n: int) -> bytes:
    sender = rng.choice(SENDERS)
    topic = rng.choice(TOPICS)
    day = 1 + n % 28
    month = 1 + (n // 28) % 12
    body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(80, 600)))
    lines = [body[i : i + 72] for i in range(0, len(body), 72)]
    return (
        f"From: {sender}\r\nTo: {OWNER}\r\nSubject: {topic} {n}\r\n"
        f"Date: {day:02d} {MONTHS[month - 1]}"
        f" 2026 10:{n % 60:02d}:00 +0000\r\nMessage-ID: <m{n}@bench.test>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n" + "\r\n".join(lines) + "\r\n"
    ).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10_000, help="messages in the corpus")
    parser.add_argument("--searches", type=int, default=300)
    args = parser.parse_args()
    rng = random.Random(6)
    with tempfile.TemporaryDirectory(prefix="smimeproxy-bench-archive-") as tmp:
        root = Path(tmp)
        (root / "var").mkdir()
        create_key_file(root / "var" / "master.key")
        (root / "smimeproxy.toml").write_text(CONFIG)
        config = load_config(root / "smimeproxy.toml")
        assert config.archive is not None
        store = open_configured_store(config, create=True)
        factory = CertificateFactory()
        old, current = factory.user(OWNER), factory.user(OWNER)
        store.add_trust(factory.root.certificate)
        store.import_key(old.private_key, old.certificate)
        store.rotate(OWNER, current.private_key, current.certificate)
        processor = MessageProcessor(store, config.smime)

        t0 = time.perf_counter()
        md = mailbox.Maildir(root / "mail", create=True)
        encrypted = 0
        for n in range(args.n):
            data = make_message(rng, n)
            if n % 5 == 0:
                to = old if n % 10 == 0 else current
                data = seal(data, recipients=[to.certificate])
                encrypted += 1
            md.add(data)
        made = time.perf_counter() - t0
        print(f"corpus: {args.n} messages, {encrypted} encrypted, made in {made:.1f} s")

        # the direct path: read and parse every file
        t0 = time.perf_counter()
        for key in md.iterkeys():
            email.message_from_bytes(md.get_bytes(key))
        direct = time.perf_counter() - t0

        archive = LocalArchive.open(config.archive.index_dir)
        t0 = time.perf_counter()
        report = index_pass(archive, processor, maildir_folders(root / "mail", OWNER))
        elapsed = time.perf_counter() - t0
        counts = report.owners[OWNER]
        assert counts.indexed == args.n and counts.decrypted == encrypted, counts
        print(
            f"direct (read + parse):  {args.n / direct:8.0f} msg/s"
            f"\narchive index pass:     {args.n / elapsed:8.0f} msg/s"
            f"  ({elapsed:.1f} s; target >= 150 msg/s)"
            f"\nratio pass/direct:      {elapsed / direct:8.1f}x"
            f"\ntime opening (decrypt, verify): {report.decrypt_seconds / elapsed:5.1%}"
            f"   read, extract, index, store, commit: {report.index_seconds / elapsed:5.1%}"
            f"   merge segments: {report.maintain_seconds / elapsed:5.1%}"
        )
        if encrypted:
            per = report.decrypt_seconds / encrypted * 1e3
            print(f"opening per encrypted message: {per:.2f} ms")

        queries = [
            "from:carol subject:invoice",
            "subject:invoice date:[20260101 to 20260630] encrypted:yes",
            "supplier extension",
            "merger AND NOT travel",
            "date:[2026-03-01 to 2026-03-31]",
            "encrypted:yes decrypted:yes",
            "body:budget from:erin",
            f"messageid:<m{args.n // 2}@bench.test>",
        ]
        latencies: list[float] = []
        for i in range(args.searches):
            q = queries[i % len(queries)]
            t0 = time.perf_counter()
            archive.index.search(q, limit=100)
            latencies.append(time.perf_counter() - t0)
        latencies.sort()
        p50 = statistics.median(latencies) * 1e3
        p95 = latencies[int(len(latencies) * 0.95) - 1] * 1e3
        t0 = time.perf_counter()
        everything = archive.index.search("")
        full = time.perf_counter() - t0
        print(
            f"search (limit 100, {args.searches} queries): p50 {p50:.1f} ms, p95 {p95:.1f} ms"
            f" (target p95 < 100 ms); all {len(everything)} hits unlimited: {full * 1e3:.0f} ms"
        )
        size = sum(f.stat().st_size for f in Path(config.archive.index_dir).rglob("*"))
        print(f"index dir incl. originals: {size / 2**20:.0f} MiB; pid {os.getpid()}")
        archive.close()
        store.close()


if __name__ == "__main__":
    main()
