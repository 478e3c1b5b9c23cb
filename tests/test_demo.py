"""``python -m smimeproxy.demo --once``: the whole walkthrough, as a newcomer runs it.

One run of the demo in a subprocess (Dovecot, gateway, IMAP proxy, directory, archive,
metrics, all real, on 127.0.0.1), then assertions on what it printed: the partner's
message seen decrypted and verified through the proxy, ciphertext in Dovecot's file,
the archive hit, the SMIMEA answer from dig, the metrics.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from smimeproxy.servers.dovecot import find_dovecot
from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    find_dovecot() or require_tool("dovecot")
    require_tool("dig")
    base = tmp_path_factory.mktemp("demo") / "var-demo"
    done = subprocess.run(
        [sys.executable, "-m", "smimeproxy.demo", "--once", "--dir", str(base)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return base, done.stdout


def _section(output: str, number: str) -> str:
    start = output.index(f"=== {number}.")
    end = output.find("\n=== ", start + 1)
    return output[start : end if end != -1 else None]


def test_proxy_shows_the_partner_message_decrypted_and_verified(demo: tuple[Path, str]) -> None:
    seen = _section(demo[1], "4")
    assert "clause 7 now caps liability at EUR 2m" in seen
    assert "Authentication-Results: mx.acme.test; smime=pass" in seen
    assert "body.smime-identifier=bob@partner.test" in seen
    assert "Signed by bob@partner.test: signature verified" in seen  # the footer
    # the gateway's own headers on the stored copy are not mistaken for forgeries
    assert "look-alike" not in seen


def test_dovecot_holds_only_ciphertext(demo: tuple[Path, str]) -> None:
    stored = _section(demo[1], "3")
    assert "Content-Type: application/pkcs7-mime; smime-type=enveloped-data" in stored
    assert "liability" not in stored


def test_archive_indexes_and_finds_it(demo: tuple[Path, str]) -> None:
    archive = _section(demo[1], "5")
    assert "Contract draft, version 3" in archive
    assert "decrypted,verified" in archive
    assert "1 message(s)" in archive


def test_dig_gets_the_smimea_record(demo: tuple[Path, str]) -> None:
    answer = _section(demo[1], "6")
    assert "._smimecert.acme.test. 300 IN SMIMEA 3 0 0 30" in answer


def test_metrics_and_client_instructions(demo: tuple[Path, str]) -> None:
    output = demo[1]
    assert "smimeproxy_" in _section(output, "7")
    assert "user alice, password alice-demo" in output
    assert "walkthrough complete (--once)" in output


def test_demo_directory_is_private_and_servers_are_gone(demo: tuple[Path, str]) -> None:
    base = demo[0]
    assert (base / "smimeproxy.toml").exists()
    assert base.stat().st_mode & 0o777 == 0o700
    assert (base / "master.key").stat().st_mode & 0o077 == 0
    link = base / "dovecot"
    assert link.is_symlink() and not link.exists()  # Dovecot stopped and its files removed


def test_rerun_starts_clean(demo: tuple[Path, str]) -> None:
    """A second run in the same directory (engine-only: fast) replaces the first."""
    base = demo[0]
    done = subprocess.run(
        [sys.executable, "-m", "smimeproxy.demo", "--engine-only", "--dir", str(base)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (base / "smimeproxy.toml").exists()
    assert (base / "inbound.eml").exists()


def test_refuses_to_empty_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("not a demo")
    done = subprocess.run(
        [sys.executable, "-m", "smimeproxy.demo", "--engine-only", "--dir", str(tmp_path)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert (tmp_path / "precious.txt").read_text() == "not a demo"
