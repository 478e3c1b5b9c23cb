"""``smimeproxy message seal|open`` with keys from files, as a user runs them."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pytest

from smimeproxy.cli import main
from smimeproxy.testing import CertificateFactory

PLAIN = b"From: alice@acme.test\nTo: bob@partner.test\nSubject: cli\n\nHello from the CLI.\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    f = CertificateFactory()
    people = {"alice": f.user("alice@acme.test"), "bob": f.user("bob@partner.test")}
    paths = {"ca": tmp / "ca.pem", "plain": tmp / "plain.eml"}
    paths["ca"].write_bytes(f.root.cert_pem)
    paths["plain"].write_bytes(PLAIN)
    for name, issued in people.items():
        paths[f"{name}.pem"] = tmp / f"{name}.pem"
        paths[f"{name}.key"] = tmp / f"{name}.key"
        paths[f"{name}.pem"].write_bytes(issued.cert_pem)
        paths[f"{name}.key"].write_bytes(issued.key_pem)
    paths["crl"] = tmp / "crl.pem"
    from cryptography.hazmat.primitives import serialization

    paths["crl"].write_bytes(
        f.crl(f.root, [people["alice"]]).public_bytes(serialization.Encoding.PEM)
    )
    return {k: str(v) for k, v in paths.items()}


def run(argv, data):
    out = io.BytesIO()
    err = io.StringIO()
    code = main(argv, stdin=io.BytesIO(data), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def sealed(files, *extra):
    code, out, err = run(
        [
            "message",
            "seal",
            "--sign-key",
            files["alice.key"],
            "--sign-cert",
            files["alice.pem"],
            "--encrypt-to",
            files["bob.pem"],
            *extra,
        ],
        PLAIN,
    )
    assert code == 0, err
    return out


def test_seal_then_open(files):
    data = sealed(files)
    assert b"Hello from the CLI" not in data
    code, out, err = run(
        [
            "message",
            "open",
            "--key",
            files["bob.key"],
            "--cert",
            files["bob.pem"],
            "--trust",
            files["ca"],
            "--authserv-id",
            "acme.test",
        ],
        data,
    )
    assert code == 0, err
    assert b"Hello from the CLI." in out
    assert b"Authentication-Results: acme.test; smime=pass" in out


def test_open_json(files):
    code, out, _ = run(
        [
            "message",
            "open",
            "--key",
            files["bob.key"],
            "--cert",
            files["bob.pem"],
            "--trust",
            files["ca"],
            "--json",
        ],
        sealed(files, "--cipher", "aes128-gcm"),
    )
    status = json.loads(out)
    assert code == 0
    assert status["smime"] == "pass"
    assert status["decryption"]["cipher"] == "aes128_gcm"
    assert status["signers"][0]["identity"] == "alice@acme.test"


def test_exit_status_untrusted_and_revoked(files):
    data = sealed(files)
    base = ["message", "open", "--key", files["bob.key"], "--cert", files["bob.pem"]]
    code, out, _ = run(base, data)  # no trust anchor given
    assert code == 1 and b"smime=policy" in out
    code, out, _ = run([*base, "--trust", files["ca"], "--crl", files["crl"]], data)
    assert code == 1 and b"smime=fail" in out


def test_exit_status_undecryptable_writes_message_unchanged(files):
    data = sealed(files)
    code, out, _ = run(
        ["message", "open", "--key", files["alice.key"], "--cert", files["alice.pem"]], data
    )
    assert code == 3
    body = data.split(b"\n\n", 1)[1]
    assert body in out


def test_key_without_its_certificate_is_a_clear_error(files):
    code, _, err = run(
        ["message", "open", "--key", files["bob.key"], "--cert", files["alice.pem"]], b""
    )
    assert code == 4
    assert "no matching --cert" in err


def test_missing_file_names_it(files):
    code, _, err = run(
        ["message", "seal", "--sign-key", "/nonexistent.key", "--sign-cert", files["alice.pem"]],
        PLAIN,
    )
    assert code == 4 and "/nonexistent.key" in err


def test_console_script_and_openssl(files, openssl, tmp_path):
    exe = shutil.which("smimeproxy")
    cmd = [exe] if exe else [sys.executable, "-m", "smimeproxy.cli"]
    done = subprocess.run(
        [
            *cmd,
            "message",
            "seal",
            "--sign-key",
            files["alice.key"],
            "--sign-cert",
            files["alice.pem"],
            "--encrypt-to",
            files["bob.pem"],
            "--oaep",
            "--pss",
        ],
        input=PLAIN,
        capture_output=True,
        check=True,
    )
    msg = tmp_path / "m.eml"
    msg.write_bytes(done.stdout)
    dec = subprocess.run(
        [
            openssl,
            "cms",
            "-decrypt",
            "-in",
            str(msg),
            "-recip",
            files["bob.pem"],
            "-inkey",
            files["bob.key"],
        ],
        capture_output=True,
        check=True,
    ).stdout
    ver = subprocess.run(
        [openssl, "cms", "-verify", "-CAfile", files["ca"]], input=dec, capture_output=True
    )
    assert ver.returncode == 0, ver.stderr
    assert b"Hello from the CLI." in ver.stdout
    helped = subprocess.run([*cmd, "message", "open", "--help"], capture_output=True, text=True)
    assert "exit status" in helped.stdout
