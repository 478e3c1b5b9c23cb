"""``smimeproxy demo``: the same as ``make demo``."""

from __future__ import annotations

import argparse

from smimeproxy.commands.common import IO


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="see smimeproxy work on this machine in seconds")
    p.add_argument("--dir", default="var/demo", help="where to write the demo files")
    p.set_defaults(func=demo_command)


def demo_command(args: argparse.Namespace, io: IO) -> int:
    from smimeproxy import demo

    return demo.main(["--dir", args.dir])
