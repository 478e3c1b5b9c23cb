"""``smimeproxy demo``: the same as ``make demo``, with the same options."""

from __future__ import annotations

import argparse

from smimeproxy.commands.common import IO


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "demo",
        help="see the whole product work on 127.0.0.1 (Dovecot, gateway, proxy, archive, DNS)",
        description="Runs the walkthrough of `make demo`; options are passed on unchanged.",
    )
    p.add_argument("--dir", default="var/demo", help="where the demo lives (emptied first)")
    p.add_argument("--once", action="store_true", help="exit after the walkthrough")
    p.add_argument("--engine-only", action="store_true", help="the engine alone, no servers")
    for name in ("smtp", "imap", "dns", "http", "metrics"):
        p.add_argument(f"--{name}-port", type=int, default=0, help="default: a free port")
    p.set_defaults(func=demo_command)


def demo_command(args: argparse.Namespace, io: IO) -> int:
    from smimeproxy import demo

    argv = ["--dir", args.dir]
    if args.once:
        argv.append("--once")
    if args.engine_only:
        argv.append("--engine-only")
    for name in ("smtp", "imap", "dns", "http", "metrics"):
        port = getattr(args, f"{name}_port")
        if port:
            argv += [f"--{name}-port", str(port)]
    return int(demo.main(argv))
