"""Users, their addresses and login names, as functions over one open transaction.

An address (primary or alias) and a login name each belong to at most one user; the
database's primary keys say so for every node at once, and a clash is reported as
:class:`KeystoreError` naming the address, never as a driver exception.
"""

from __future__ import annotations

import datetime
import uuid

from smimeproxy.errors import KeyNotFound, KeystoreError
from smimeproxy.keystore.certificates import normalise
from smimeproxy.keystore.interface import User
from smimeproxy.keystore.schema import Tx, from_text, to_text


def insert_user(tx: Tx, primary: str, now: datetime.datetime) -> str:
    """A new user with ``primary`` as address; returns the new id (a UUID)."""
    if "@" not in primary:
        raise KeystoreError(f"not an email address: {primary!r}")
    user_id = str(uuid.uuid4())
    try:
        tx.attempt(
            "user",
            lambda t: t.run(
                "INSERT INTO users (id, address, created) VALUES (?, ?, ?)",
                (user_id, primary, to_text(now)),
            ),
        )
    except tx.integrity_errors:
        raise KeystoreError(f"user {primary} already exists") from None
    insert_address(tx, user_id, primary, "primary")
    return user_id


def insert_address(tx: Tx, user_id: str, address: str, kind: str) -> None:
    if "@" not in address:
        raise KeystoreError(f"not an email address: {address!r}")
    try:
        tx.attempt(
            "address",
            lambda t: t.run(
                "INSERT INTO addresses (address, user_id, kind) VALUES (?, ?, ?)",
                (address, user_id, kind),
            ),
        )
    except tx.integrity_errors:
        raise KeystoreError(f"address {address} already belongs to a user") from None


def insert_login(tx: Tx, user_id: str, login: str) -> None:
    if not login:
        raise KeystoreError("empty login name")
    try:
        tx.attempt(
            "login",
            lambda t: t.run("INSERT INTO logins (login, user_id) VALUES (?, ?)", (login, user_id)),
        )
    except tx.integrity_errors:
        raise KeystoreError(f"login {login} already belongs to a user") from None


def find_user_id(tx: Tx, address_or_login: str) -> str | None:
    """The user with this login name, else this address or alias."""
    name = normalise(address_or_login)
    row = tx.one(
        "SELECT COALESCE((SELECT user_id FROM logins WHERE login = ?),"
        " (SELECT user_id FROM addresses WHERE address = ?))",
        (name, name),
    )
    return None if row is None or row[0] is None else str(row[0])


def user_id(tx: Tx, address_or_login: str) -> str:
    found = find_user_id(tx, address_or_login)
    if found is None:
        raise KeyNotFound(f"no user {normalise(address_or_login)}")
    return found


def user_addresses(tx: Tx, uid: str) -> set[str]:
    return {r[0] for r in tx.all("SELECT address FROM addresses WHERE user_id = ?", (uid,))}


def owner_of(tx: Tx, addresses: tuple[str, ...]) -> str | None:
    """The one user holding any of ``addresses`` (None if none; error if several)."""
    owners = set()
    for a in addresses:
        row = tx.one("SELECT user_id FROM addresses WHERE address = ?", (a,))
        if row is not None:
            owners.add(str(row[0]))
    if len(owners) > 1:
        raise KeystoreError(f"the addresses {', '.join(addresses)} belong to different users")
    return owners.pop() if owners else None


def user_by_id(tx: Tx, uid: str) -> User:
    row = tx.one("SELECT id, address, created FROM users WHERE id = ?", (uid,))
    if row is None:
        raise KeyNotFound(f"no user with id {uid}")
    aliases = tx.all(
        "SELECT address FROM addresses WHERE user_id = ? AND kind = 'alias' ORDER BY address",
        (uid,),
    )
    logins = tx.all("SELECT login FROM logins WHERE user_id = ? ORDER BY login", (uid,))
    return User(
        row[0],
        row[1],
        tuple(a[0] for a in aliases),
        tuple(login[0] for login in logins),
        from_text(row[2]),
    )
