"""Fixtures for the key store: a throwaway PostgreSQL cluster, stores on both backends.

PostgreSQL: with ``SMIMEPROXY_TEST_PG_URL`` set, that server is used; otherwise a
cluster is created with Debian's PostgreSQL 15 binaries (``initdb`` as the ``postgres``
OS user when running as root, which initdb requires), listening on 127.0.0.1 on a free
port with trust authentication, and stopped at the end of the session. Every test gets
its own schema (``search_path`` in the URL), so tests never see each other's rows.
Missing PostgreSQL skips locally and fails in CI (``CI=true``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from smimeproxy.keystore import MasterSecret, SyncStore, open_store
from smimeproxy.testing import CertificateFactory, Issued
from tests.conftest import IN_CI
from tests.ports import free_port as _free_port

PG_BIN_DIRS = [Path(f"/usr/lib/postgresql/{v}/bin") for v in (17, 16, 15, 14, 13)]


def _missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (required in CI; .ci/run installs postgresql)")
    pytest.skip(reason)


def _pg_bin() -> Path | None:
    for d in PG_BIN_DIRS:
        if (d / "initdb").exists() and (d / "pg_ctl").exists():
            return d
    found = shutil.which("initdb")
    return Path(found).parent if found else None


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A libpq URL of a PostgreSQL server for tests (a throwaway cluster by default)."""
    existing = os.environ.get("SMIMEPROXY_TEST_PG_URL")
    if existing:
        yield existing
        return
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _missing("psycopg 3 is not installed")
    bindir = _pg_bin()
    if bindir is None:
        _missing("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    assert bindir is not None
    base = Path(tempfile.mkdtemp(prefix="smimeproxy-pg-"))
    data = base / "data"
    as_root = os.geteuid() == 0
    prefix: list[str] = []
    if as_root:
        shutil.chown(base, "postgres", "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    log = base / "server.log"
    try:
        subprocess.run(
            [*prefix, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
             "--no-sync", "-E", "UTF8"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
             "-w", "-t", "60", "start"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        detail = getattr(e, "stderr", b"") or b""
        shutil.rmtree(base, ignore_errors=True)
        _missing(f"could not start a PostgreSQL cluster: {e} {detail[-500:]!r}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True, timeout=60,
        )  # fmt: skip
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A URL whose ``search_path`` is a fresh, empty schema (dropped afterwards)."""
    import psycopg

    schema = "t_" + uuid.uuid4().hex[:16]
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in pg_server else "?"
    yield f"{pg_server}{sep}options={quote(f'-csearch_path={schema}')}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store URL on each backend."""
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'store.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def master() -> MasterSecret:
    return MasterSecret(os.urandom(32), "master key file (test)")


@pytest.fixture
def make_store(store_url: str, master: MasterSecret) -> Iterator[Callable[..., SyncStore]]:
    """Opens stores at ``store_url`` (first call creates it); closes them afterwards."""
    opened: list[SyncStore] = []

    def make(secret: MasterSecret | None = None, *, create: bool = True, **kw: object) -> SyncStore:
        store = open_store(store_url, secret or master, create=create, **kw)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield make
    for store in opened:
        close_all = getattr(store.db, "close_all", None)
        if close_all is not None:
            close_all()


@pytest.fixture
def store(make_store: Callable[..., SyncStore]) -> SyncStore:
    return make_store()


@pytest.fixture(scope="module")
def pki() -> CertificateFactory:
    return CertificateFactory()


@pytest.fixture(scope="module")
def people(pki: CertificateFactory) -> dict[str, Issued]:
    """A few certificates made once per module (RSA generation is slow)."""
    return {
        "alice": pki.user("alice@acme.test", key_kind="rsa2048"),
        "alice2": pki.user("alice@acme.test", key_kind="p256"),
        "alice3": pki.user("alice@acme.test", key_kind="p256"),
        "bob": pki.user("bob@acme.test", key_kind="p256"),
        "partner": pki.user("carol@partner.test", key_kind="p256"),
    }
