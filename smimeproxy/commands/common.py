"""What every subcommand needs: its streams, the config, the store, and output helpers.

Output conventions: listings are tables for people and JSON with ``--json`` for
scripts; long jobs show a progress bar on a terminal (standard error), never in
pipes; errors are one line on standard error, naming what to fix.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO, TypeVar

from cryptography import x509

from smimeproxy.config import Config, load_config
from smimeproxy.errors import CertificateError, ConfigError, SMIMEProxyError

T = TypeVar("T")


@dataclass
class IO:
    """The streams a command uses; tests pass their own."""

    stdin: BinaryIO
    stdout: BinaryIO
    stderr: TextIO = field(default_factory=lambda: sys.stderr)

    def write(self, text: str) -> None:
        self.stdout.write(text.encode("utf-8"))

    def error(self, text: str) -> None:
        print(f"smimeproxy: {text}", file=self.stderr)


def read_file(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SMIMEProxyError(f"{path}: {e.strerror}") from None


def load_crl(path: str | Path) -> x509.CertificateRevocationList:
    """The CRL (PEM or DER) in the file ``path``; a one-line error naming the file."""
    data = read_file(path)
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as e:
        raise CertificateError(f"{path}: not a CRL: {e}") from None


def require_config(args: argparse.Namespace) -> Config:
    """The loaded ``--config``; a clear error when the command needs one and has none."""
    if not getattr(args, "config", None):
        raise ConfigError("this command needs --config FILE (before the subcommand)")
    return load_config(args.config)


def print_json(data: object, out: BinaryIO) -> None:
    out.write(json.dumps(data, indent=2, sort_keys=True, default=str).encode() + b"\n")


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain-text table with aligned columns (no colours: it goes into logs too)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def progress(items: Iterable[T], total: int | None, label: str, stream: TextIO) -> Iterator[T]:
    """Yield ``items``, drawing ``label [####    ] n/total rate/s`` on a terminal."""
    tty = stream.isatty()
    start = time.monotonic()
    last = 0.0
    n = 0
    for item in items:
        yield item
        n += 1
        now = time.monotonic()
        if tty and (now - last > 0.1 or n == total):
            last = now
            rate = n / max(now - start, 1e-9)
            if total:
                filled = int(30 * n / total)
                bar = "#" * filled + " " * (30 - filled)
                stream.write(f"\r{label} [{bar}] {n}/{total} {rate:.0f}/s")
            else:
                stream.write(f"\r{label} {n} {rate:.0f}/s")
            stream.flush()
    if tty:
        stream.write("\n")
        stream.flush()
