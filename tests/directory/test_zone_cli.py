"""``smimeproxy --config F directory zone DOMAIN``: zone text named-checkzone accepts."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest

from smimeproxy.cli import main
from smimeproxy.config import load_config
from smimeproxy.pki.smimea import parse_smimea_presentation, smimea_for_certificate
from smimeproxy.pki.smimea import smimea_owner_name as owner_of
from smimeproxy.processing import open_configured_store
from tests.conftest import require_tool
from tests.directory.conftest import People

CONFIG = """\
[keystore]
url = "sqlite:var/store.db"
master_key_file = "var/master.key"

[directory]
domains = ["acme.test"]
ttl = 1800
"""


@pytest.fixture
def configured(tmp_path: Path, people: People) -> Path:
    path = tmp_path / "smimeproxy.toml"
    path.write_text(CONFIG)
    out = io.BytesIO()
    assert main(["--config", str(path), "init"], stdout=out, stderr=io.StringIO()) == 0
    store = open_configured_store(load_config(path))
    for issued in (people.alice, people.bob, people.big):
        store.import_key(issued.private_key, issued.certificate)
    (bob_key,) = store.keys("bob@acme.test")
    store.revoke_key(bob_key.id, "left")
    store.close()
    return path


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.BytesIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue().decode(), err.getvalue()


def test_zone_text_is_accepted_by_named_checkzone(configured: Path, people: People, tmp_path):
    checkzone = require_tool("named-checkzone")
    code, text, _ = run("--config", str(configured), "directory", "zone", "acme.test",
                        "--nameserver", "ns1.acme.test")  # fmt: skip
    assert code == 0
    zone = tmp_path / "zone.db"
    zone.write_text(text)
    checked = subprocess.run(
        [checkzone, "-D", "-o", "-", "_smimecert.acme.test", str(zone)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    records = {}
    for line in checked.stdout.splitlines():
        parts = line.split(None, 4)
        if len(parts) == 5 and parts[3] == "SMIMEA":
            records[parts[0].rstrip(".")] = parse_smimea_presentation(parts[4])
    assert records == {
        owner_of("alice@acme.test"): smimea_for_certificate(people.alice.certificate),
        owner_of("carol@acme.test"): smimea_for_certificate(people.big.certificate),
    }  # bob's key is revoked: not published
    assert "1800 IN SMIMEA" in checked.stdout


def test_records_only(configured: Path):
    code, text, _ = run("--config", str(configured), "directory", "zone", "acme.test",
                        "--records-only")  # fmt: skip
    assert code == 0
    assert "SOA" not in text and "$ORIGIN" not in text
    assert text.count(" IN SMIMEA 3 0 0 (") == 2


def test_unknown_domain_is_a_clear_error(configured: Path):
    code, text, err = run("--config", str(configured), "directory", "zone", "other.test")
    assert code == 4 and text == ""
    assert "other.test is not a published domain" in err and "directory.domains" in err
