"""``smimeproxy --config F init``: a new key store and its master key.

Writes a default configuration to ``F`` when it does not exist (the contract's example,
see :func:`smimeproxy.config.default_config_text`), creates the master key file
owner-only (0600) and the store (a SQLite file, owner-only, or the schema in an empty
PostgreSQL database). It never overwrites: an existing master key file or an
initialised store is an error, since replacing either orphans every sealed key.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from smimeproxy.commands.common import IO, print_json
from smimeproxy.commands.store_ops import actor
from smimeproxy.config import default_config_text, load_config
from smimeproxy.errors import ConfigError, KeystoreError, MasterKeyError
from smimeproxy.keystore import create_key_file, database_for
from smimeproxy.keystore.schema import Database
from smimeproxy.keystore.store import SyncStore
from smimeproxy.processing import master_secret


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "init",
        help="create the key store and its master key (and a default config if missing)",
        description=(
            "Create the key store and the master key file (owner-only). Writes a default "
            "configuration to --config FILE first if that file does not exist. Refuses to "
            "overwrite an existing master key or to re-initialise a store."
        ),
    )
    p.add_argument("--json", action="store_true", help="print what was created as JSON")
    p.set_defaults(func=init_command)


def _private_dir(path: Path) -> None:
    if not path.exists():
        path.mkdir(mode=0o700, parents=True)


def init_command(args: argparse.Namespace, io: IO) -> int:
    if not args.config:
        raise ConfigError("init needs --config FILE (before the subcommand)")
    path = Path(args.config)
    created: dict[str, str] = {}
    if not path.exists():
        _private_dir(path.parent.resolve())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(default_config_text(path.parent.resolve()))
        created["config"] = str(path)
    config = load_config(path)
    ks = config.keystore
    if ks.sqlite_path is not None:
        _private_dir(ks.sqlite_path.parent)
    db = database_for(ks.url, config.path.parent)
    # refuse a store that already has its master key check value, whatever the secret
    _params, check = _kek_meta(db)
    if check is not None:
        raise KeystoreError(f"the key store at {db.describe()} is already initialised")
    if ks.master_key_file is not None:
        _private_dir(ks.master_key_file.parent)
        if ks.master_key_file.exists():
            raise MasterKeyError(
                f"the master key file {ks.master_key_file} already exists; not overwriting"
                " (it may seal an existing store)"
            )
        master = create_key_file(ks.master_key_file)
        created["master_key_file"] = str(ks.master_key_file)
    else:
        master = master_secret(ks)
    store = SyncStore.open(db, master, create=True)
    store.audit(actor(), "store.init", db.describe(), {"master": master.origin})
    close_all = getattr(db, "close_all", None)
    if close_all is not None:
        close_all()
    created["store"] = db.describe()
    if args.json:
        print_json(created, io.stdout)
    else:
        for what, where in created.items():
            io.write(f"created {what.replace('_', ' ')}: {where}\n")
    return 0


def _kek_meta(db: Database) -> tuple[str | None, str | None]:
    """The store's KEK parameters and check value, or ``(None, None)`` when the store
    has no schema or no master key yet (nothing is created here)."""
    try:
        with db.transaction(write=False) as tx:
            rows: dict[str, str] = dict(
                tx.all("SELECT name, value FROM meta WHERE name IN ('kek_kdf', 'kek_check')")
            )
    except KeystoreError:
        return None, None  # no meta table yet: a new store
    return rows.get("kek_kdf"), rows.get("kek_check")
