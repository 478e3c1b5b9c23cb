"""The internal CA from the command line: certificates openssl accepts for S/MIME,
CSRs, revocation in the CRL (as openssl reads it) and in validation."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.commands.conftest import CLI, message


def _ca_files(cli: CLI, tmp_path: Path) -> tuple[Path, Path]:
    pem = cli.ok("ca", "show", "--pem").out.decode()
    blocks = ["-----BEGIN" + b for b in pem.split("-----BEGIN")[1:]]
    issuing, root = tmp_path / "issuing.pem", tmp_path / "root.pem"
    issuing.write_text(blocks[0])
    root.write_text(blocks[1])
    return root, issuing


@pytest.mark.parametrize("kind", ["rsa2048", "p256"])
def test_issued_certificates_pass_openssl_smime_purposes(
    cli: CLI, tmp_path: Path, openssl: str, kind: str
) -> None:
    made = cli.ok("keys", "generate", "--user", "alice@acme.test", "--kind", kind, "--json")
    assert made.json()["state"] == "current"
    cert = tmp_path / "alice.pem"
    cert.write_bytes(cli.ok("keys", "export-cert", "alice@acme.test").out)
    root, issuing = _ca_files(cli, tmp_path)
    # OpenSSL 3.0's smimeencrypt purpose wants keyEncipherment, which an EC certificate
    # must not carry (keyAgreement, RFC 5480 section 3): EC encryption is checked with
    # openssl cms in test_message.py instead
    purposes = ("smimesign", "smimeencrypt") if kind.startswith("rsa") else ("smimesign",)
    for purpose in purposes:
        run = subprocess.run(
            [
                openssl,
                "verify",
                "-purpose",
                purpose,
                "-CAfile",
                str(root),
                "-untrusted",
                str(issuing),
                str(cert),
            ],
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0 and f"{cert}: OK" in run.stdout, run.stderr
    text = subprocess.run(
        [openssl, "x509", "-in", str(cert), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "email:alice@acme.test" in text and "E-mail Protection" in text


def test_users_aliases_go_into_the_certificate(cli: CLI, tmp_path: Path, openssl: str) -> None:
    cli.ok("users", "add", "bob@acme.test", "--alias", "robert@acme.test", "--login", "bob")
    cli.ok("keys", "generate", "--user", "bob", "--kind", "p256")
    cert = tmp_path / "bob.pem"
    cert.write_bytes(cli.ok("keys", "export-cert", "robert@acme.test").out)
    text = subprocess.run(
        [openssl, "x509", "-in", str(cert), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
    ).stdout
    assert "email:bob@acme.test" in text and "email:robert@acme.test" in text


def test_ca_issue_for_an_openssl_csr(cli: CLI, tmp_path: Path, openssl: str) -> None:
    subprocess.run(
        [
            openssl,
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ext.key",
            "-subj",
            "/CN=External Erin",
            "-addext",
            "subjectAltName=email:erin@acme.test",
            "-out",
            "erin.csr",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    cli.ok("ca", "issue", "--csr", str(tmp_path / "erin.csr"), "--out", str(tmp_path / "e.pem"))
    root, issuing = _ca_files(cli, tmp_path)
    run = subprocess.run(
        [
            openssl,
            "verify",
            "-purpose",
            "smimesign",
            "-CAfile",
            str(root),
            "-untrusted",
            str(issuing),
            str(tmp_path / "e.pem"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    issued = cli.ok("ca", "list", "--json").json()
    assert [r["subject"] for r in issued if r["issuer"] == "issuing"] == ["erin@acme.test"]
    # the external key can now be imported with its new certificate
    cli.ok("keys", "import", "--key", str(tmp_path / "ext.key"), "--cert", str(tmp_path / "e.pem"))
    bad = tmp_path / "bad.csr"
    bad.write_bytes(
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    )
    refused = cli("ca", "issue", "--csr", str(bad))
    assert refused.rc == 4 and "certificate signing request" in refused.err


def test_generate_needs_the_ca(make_cli: Callable[..., CLI]) -> None:
    bare = make_cli("bare")
    bare.ok("init")
    result = bare("keys", "generate", "--user", "a@acme.test", "--kind", "p256")
    assert result.rc == 4 and "ca init" in result.err
    assert bare("keys", "rotate", "--all").rc == 4
    assert bare.ok("keys", "list", "--json").json() == []


def test_ca_init_twice_refuses(cli: CLI) -> None:
    again = cli("ca", "init")
    assert again.rc == 4 and "already has an internal CA" in again.err


def test_revocation_shows_in_crl_and_in_validation(cli: CLI, tmp_path: Path, openssl: str) -> None:
    cli.ok("keys", "generate", "--user", "alice@acme.test", "--kind", "p256")
    cli.ok("keys", "generate", "--user", "bob@acme.test", "--kind", "p256")
    mail = message("alice@acme.test", "bob@acme.test")
    encrypted = cli.ok(
        "message",
        "seal",
        "--from",
        "alice@acme.test",
        "--no-sign",
        "--to",
        "bob@acme.test",
        stdin=mail,
    ).out
    plain = cli("message", "open", "--as", "bob@acme.test", "--json", stdin=encrypted).json()
    assert plain["decryption"]["decrypted"] and plain["smime"] == "none"
    sealed = cli.ok(
        "message",
        "seal",
        "--from",
        "alice@acme.test",
        stdin=message("alice@acme.test", "bob@acme.test"),
    ).out
    before = cli("message", "open", "--as", "bob@acme.test", "--json", stdin=sealed)
    assert before.rc == 0 and before.json()["smime"] == "pass"

    serial = cli.ok("users", "show", "alice@acme.test", "--json").json()["keys"][0]["serial"]
    revoked = cli.ok(
        "ca", "revoke", "--user", "alice@acme.test", "--reason", "keyCompromise", "--json"
    ).json()
    assert revoked["serial"] == serial and revoked["reason"] == "keyCompromise"
    assert revoked["key"] is not None
    crl_path = tmp_path / "issuing.crl"
    cli.ok("ca", "crl", "--out", str(crl_path))
    text = subprocess.run(
        [openssl, "crl", "-in", str(crl_path), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert serial.upper().lstrip("0") in text.replace(":", "").upper()
    assert "Key Compromise" in text
    assert "X509v3 CRL Number" in text
    _root, issuing = _ca_files(cli, tmp_path)
    run = subprocess.run(
        [openssl, "crl", "-in", str(crl_path), "-CAfile", str(issuing), "-noout"],
        capture_output=True,
        text=True,
    )
    assert "verify OK" in run.stdout + run.stderr

    after = cli("message", "open", "--as", "bob@acme.test", "--json", stdin=sealed)
    assert after.rc == 1
    status = after.json()
    assert status["smime"] != "pass"
    assert "revoked" in str(status).lower()
    # a second CRL gets a higher number and is kept by the store
    cli.ok("ca", "crl", "--out", str(tmp_path / "second.crl"))
    numbers = []
    for p in (crl_path, tmp_path / "second.crl"):
        out = subprocess.run(
            [openssl, "crl", "-in", str(p), "-noout", "-crlnumber"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        numbers.append(int(out.strip().split("=")[1], 16))
    assert numbers[1] > numbers[0]
    listed = cli.ok("crl", "list", "--json").json()
    assert any(
        c["issuer"] == "CN=smimeproxy issuing CA" and c["revoked"] == [serial] for c in listed
    )
    # revoked: it no longer signs
    refused = cli(
        "message",
        "seal",
        "--from",
        "alice@acme.test",
        stdin=message("alice@acme.test", "bob@acme.test"),
    )
    assert refused.rc == 4 and "no current key" in refused.err


def test_revoke_by_serial(cli: CLI) -> None:
    cli.ok("keys", "generate", "--user", "carol@acme.test", "--kind", "p256")
    serial = cli.ok("ca", "list", "--json").json()[0]["serial"]
    cli.ok("ca", "revoke", serial.upper(), "--reason", "superseded")
    keys = cli.ok("keys", "list", "--json").json()
    assert keys[0]["state"] == "revoked" and keys[0]["revoked_reason"] == "superseded"
    assert cli("ca", "revoke", "abcdef").rc == 4
    assert cli("ca", "revoke", serial, "--reason", "bogus").rc == 4
