"""Helpers the key-store commands share: opening the configured store, reading
certificate and password files, writing private files, naming the actor.

Nothing here prints; commands decide what the operator sees.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography import x509

from smimeproxy.commands.common import read_file, require_config
from smimeproxy.config import Config
from smimeproxy.errors import CertificateError, ConfigError, SMIMEProxyError
from smimeproxy.keystore import SyncStore, open_store
from smimeproxy.processing import master_secret, open_configured_store
from smimeproxy.smime.keys import load_certificates


def actor() -> str:
    """Who the audit log names for a command-line change: ``cli:<login name>``."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (containers)
        return f"cli:uid{os.getuid()}"


def token_for(config: Config) -> Any:
    """The configured PKCS#11 token (``keystore.pkcs11_module``), or None when the
    configuration names none. Imported lazily: python-pkcs11 is optional."""
    ks = config.keystore
    if ks.pkcs11_module is None:
        return None
    from smimeproxy.keystore.pkcs11 import PKCS11Token

    if ks.pkcs11_token_label is None or ks.pkcs11_pin_file is None:
        raise ConfigError(
            "needs pkcs11_token_label and pkcs11_pin_file too", key="keystore.pkcs11_module"
        )
    pin = read_file(ks.pkcs11_pin_file).decode("utf-8", "replace").splitlines()
    return PKCS11Token(ks.pkcs11_module, ks.pkcs11_token_label, pin[0] if pin else "")


class _LazyToken:
    """Opens the configured token on the first key it must resolve (most commands
    never touch a token-held key, and a token login costs time)."""

    def __init__(self, config: Config):
        self.config = config
        self.token: Any = None

    def __call__(self, reference: str, certificate: x509.Certificate) -> Any:
        if self.token is None:
            self.token = token_for(self.config)
        return self.token.resolver()(reference, certificate)

    def close(self) -> None:
        if self.token is not None:
            self.token.close()


@contextmanager
def configured_store(args: argparse.Namespace) -> Iterator[tuple[Config, SyncStore]]:
    """The ``--config`` file and its key store (token-held keys resolved through the
    configured PKCS#11 token), closed when the block ends."""
    config = require_config(args)
    lazy = _LazyToken(config) if config.keystore.pkcs11_module is not None else None
    if lazy is None:
        store = open_configured_store(config)
    else:
        store = open_store(
            config.keystore.url,
            master_secret(config.keystore),
            base=config.path.parent,
            hsm=lazy,
        )
    try:
        yield config, store
    finally:
        if lazy is not None:
            lazy.close()
        close_all = getattr(store.db, "close_all", None)
        if close_all is not None:
            close_all()
        else:
            store.close()


def certificates_in(path: str) -> list[x509.Certificate]:
    """Every certificate in a PEM, DER or PKCS#7 file (an error naming the file)."""
    try:
        found = load_certificates(read_file(path))
    except CertificateError as e:
        raise CertificateError(f"{path}: {e}") from None
    if not found:
        raise CertificateError(f"{path}: no certificate in the file")
    return found


def password_from(path: str | None) -> bytes | None:
    """The first line of a password file, as it is (``None`` without a file; an empty
    file is the empty password)."""
    if not path:
        return None
    data = read_file(path)
    return data.splitlines()[0] if data else b""


def write_private(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a new owner-only (0600) file; refuses to overwrite."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SMIMEProxyError(f"{path} already exists; not overwriting") from None
    except OSError as e:
        raise SMIMEProxyError(f"{path}: {e.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def write_public(path: str | Path, data: bytes) -> None:
    try:
        Path(path).write_bytes(data)
    except OSError as e:
        raise SMIMEProxyError(f"{path}: {e.strerror}") from None


def when(value: datetime.datetime | None) -> str:
    """A time for tables: UTC, to the minute."""
    return "" if value is None else value.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M")


def short(fp: str) -> str:
    """A fingerprint shortened for tables (``--json`` gives it whole)."""
    return fp[:16]
