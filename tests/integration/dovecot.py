"""The throwaway Dovecot of the integration tests: :mod:`smimeproxy.servers.dovecot`
(shared with ``make demo``), with a missing binary skipping locally and failing in CI
like every other external tool (:func:`tests.conftest.require_tool`)."""

from __future__ import annotations

from pathlib import Path

from smimeproxy.servers.dovecot import Dovecot, find_dovecot
from smimeproxy.servers.dovecot import start_dovecot as _start
from tests.conftest import require_tool

__all__ = ["Dovecot", "start_dovecot"]


def start_dovecot(
    tmp_path: Path,
    users: dict[str, str],
    master_user: tuple[str, str] | None = None,
    tls: tuple[Path, Path] | None = None,
) -> Dovecot:
    """Start Dovecot for ``users`` (login -> password); skip/fail like ``require_tool``."""
    binary = find_dovecot() or require_tool("dovecot")
    return _start(tmp_path, users, master_user, tls, binary=binary)
