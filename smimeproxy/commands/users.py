"""``smimeproxy users add|list|show``: the store's local users.

A user has one primary address, any number of aliases and IMAP login names; keys and
certificates hang off the user. Importing or generating a key creates its user when
missing, so ``users add`` is needed only for aliases and logins made in advance.
"""

from __future__ import annotations

import argparse
from typing import Any

from smimeproxy.commands.common import IO, print_json, table
from smimeproxy.commands.store_ops import actor, configured_store, short, when
from smimeproxy.keystore import KeyRecord, User


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("users", help="add, list and show local users")
    s = p.add_subparsers(dest="action", required=True, metavar="add|list|show")
    a = s.add_parser("add", help="add a user (primary address, aliases, login names)")
    a.add_argument("address", help="the primary email address")
    a.add_argument("--alias", action="append", default=[], metavar="ADDRESS")
    a.add_argument("--login", action="append", default=[], metavar="NAME")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=add_command)
    ls = s.add_parser("list", help="every user with its current key")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=list_command)
    sh = s.add_parser("show", help="one user: addresses, logins and key history")
    sh.add_argument("address", help="primary address, alias or login name")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=show_command)


def user_dict(user: User) -> dict[str, Any]:
    return {
        "id": user.id,
        "address": user.address,
        "aliases": list(user.aliases),
        "logins": list(user.login_names),
        "created": user.created.isoformat(),
    }


def key_dict(key: KeyRecord) -> dict[str, Any]:
    return {
        "id": key.id,
        "state": str(key.state),
        "created": key.created.isoformat(),
        "not_after": key.not_after.isoformat(),
        "serial": format(key.certificate.serial_number, "x"),
        "issuer": key.certificate.issuer.rfc4514_string(),
        "revoked_reason": key.revoked_reason,
        "token": key.hsm_reference is not None,
    }


def add_command(args: argparse.Namespace, io: IO) -> int:
    with configured_store(args) as (_, store):
        user = store.add_user(
            args.address, aliases=args.alias, login_names=args.login, actor=actor()
        )
    if args.json:
        print_json(user_dict(user), io.stdout)
    else:
        io.write(f"added user {user.address}\n")
    return 0


def list_command(args: argparse.Namespace, io: IO) -> int:
    with configured_store(args) as (_, store):
        users = store.users()
        current = {k.owner: k for k in store.keys() if str(k.state) == "current"}
    if args.json:
        out = []
        for u in users:
            d = user_dict(u)
            k = current.get(u.id)
            d["current_key"] = k.id if k else None
            d["key_not_after"] = k.not_after.isoformat() if k else None
            out.append(d)
        print_json(out, io.stdout)
        return 0
    rows = []
    for u in users:
        k = current.get(u.id)
        rows.append(
            (
                u.address,
                ", ".join(u.aliases),
                ", ".join(u.login_names),
                short(k.id) if k else "-",
                when(k.not_after) if k else "",
            )
        )
    io.write(table(rows, ("address", "aliases", "logins", "current key", "valid until")))
    return 0


def show_command(args: argparse.Namespace, io: IO) -> int:
    with configured_store(args) as (_, store):
        user = store.user(args.address)
        keys = store.keys(user.address)
    if args.json:
        d = user_dict(user)
        d["keys"] = [key_dict(k) for k in keys]
        print_json(d, io.stdout)
        return 0
    io.write(f"address: {user.address}\n")
    io.write(f"aliases: {', '.join(user.aliases) or '-'}\n")
    io.write(f"logins:  {', '.join(user.login_names) or '-'}\n")
    io.write(f"created: {when(user.created)}\n\n")
    rows = [
        (short(k.id), str(k.state), when(k.created), when(k.not_after), k.revoked_reason or "")
        for k in keys
    ]
    io.write(table(rows, ("key", "state", "created", "valid until", "revoked")))
    return 0
