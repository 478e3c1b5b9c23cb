"""The ``smimeproxy`` command: administration and message processing.

Every command takes ``--config FILE`` before the subcommand (DESIGN.md, "The contract");
``message open`` and ``message seal`` also work from files without a config. The
subcommands live in :mod:`smimeproxy.commands`, one module per group.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import BinaryIO, TextIO

from smimeproxy import __version__
from smimeproxy.commands.common import IO
from smimeproxy.errors import SMIMEProxyError

#: subcommand modules under smimeproxy.commands, in the order --help lists them
COMMANDS: tuple[str, ...] = (
    "init",
    "users",
    "keys",
    "certs",
    "trust",
    "crl",
    "ca",
    "audit",
    "message",
    "archive",
    "directory",
    "doctor",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smimeproxy",
        description="Gateway-level S/MIME: key store, message processing and administration.",
    )
    parser.add_argument("--version", action="version", version=f"smimeproxy {__version__}")
    parser.add_argument("--config", metavar="FILE", help="the smimeproxy TOML configuration")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"smimeproxy.commands.{name}").register(sub)
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run one command; returns its exit status (4 for any smimeproxy error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    io = IO(stdin or sys.stdin.buffer, stdout or sys.stdout.buffer, stderr or sys.stderr)
    try:
        return int(args.func(args, io))
    except SMIMEProxyError as e:
        io.error(str(e))
        return 4
    except KeyboardInterrupt:
        io.error("interrupted")
        return 130
    except BrokenPipeError:
        # the reader went away (`... | head`): not an error worth a traceback; point
        # stdout at /dev/null so the interpreter's final flush does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141


if __name__ == "__main__":
    sys.exit(main())
