"""``smimeproxy audit show|verify``: read and check the hash-chained audit log.

``verify`` exits 1 when the chain is broken (an entry altered, removed or inserted),
naming the first broken sequence number. It cannot see entries removed from the *end*;
compare ``audit verify --json``'s head (last sequence number and hash) with a copy kept
elsewhere to catch that.
"""

from __future__ import annotations

import argparse
import json

from smimeproxy.commands.common import IO, print_json, table
from smimeproxy.commands.store_ops import configured_store, when


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("audit", help="show or verify the audit log")
    s = p.add_subparsers(dest="action", required=True, metavar="show|verify")
    sh = s.add_parser("show", help="audit entries, oldest first")
    sh.add_argument("--after", type=int, default=0, metavar="SEQ", help="entries after SEQ")
    sh.add_argument("--limit", type=int, default=None, metavar="N")
    sh.add_argument("--action", default=None, help="only entries whose action starts so")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=show_command)
    v = s.add_parser("verify", help="check the hash chain (exit 1 when broken)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=verify_command)


def show_command(args: argparse.Namespace, io: IO) -> int:
    with configured_store(args) as (_, store):
        entries = store.audit_entries(args.after, args.limit)
    if args.action:
        entries = [e for e in entries if e.action.startswith(args.action)]
    if args.json:
        print_json(
            [
                {
                    "seq": e.seq,
                    "time": e.time.isoformat(),
                    "actor": e.actor,
                    "action": e.action,
                    "subject": e.subject,
                    "detail": e.detail,
                    "hash": e.hash,
                }
                for e in entries
            ],
            io.stdout,
        )
        return 0
    rows = [
        (
            e.seq,
            when(e.time),
            e.actor,
            e.action,
            e.subject,
            json.dumps(e.detail, sort_keys=True, separators=(",", ":")),
        )
        for e in entries
    ]
    io.write(table(rows, ("seq", "time", "actor", "action", "subject", "detail")))
    return 0


def verify_command(args: argparse.Namespace, io: IO) -> int:
    with configured_store(args) as (_, store):
        result = store.verify_audit()
        seq, digest = store.audit_head()
    if args.json:
        print_json(
            {
                "ok": result.ok,
                "entries": result.entries,
                "first_broken": result.first_broken,
                "reason": result.reason,
                "head": {"seq": seq, "hash": digest},
            },
            io.stdout,
        )
    elif result.ok:
        io.write(f"audit log intact: {result.entries} entries, head {seq} {digest}\n")
    else:
        io.write(
            f"audit log BROKEN at entry {result.first_broken}: {result.reason}"
            f" ({result.entries} entries)\n"
        )
    return 0 if result.ok else 1
