"""message open --as / seal --from --to with the store, and interop with openssl cms;
rotation keeps old mail readable."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.commands.conftest import CLI, message


@pytest.fixture
def people(cli: CLI) -> CLI:
    cli.ok("keys", "generate", "--user", "alice@acme.test", "--kind", "rsa2048")
    cli.ok("keys", "generate", "--user", "bob@acme.test", "--kind", "p256")
    return cli


def _export(cli: CLI, tmp_path: Path, address: str) -> tuple[Path, Path]:
    cert, key = tmp_path / f"{address}.pem", tmp_path / f"{address}.key"
    cert.write_bytes(cli.ok("keys", "export-cert", address).out)
    cli.ok("keys", "export-key", "--user", address, "--reason", "interop test", "--out", str(key))
    return cert, key


def _root(cli: CLI, tmp_path: Path) -> Path:
    pem = cli.ok("ca", "show", "--pem").out.decode()
    path = tmp_path / "ca-bundle.pem"
    path.write_text(pem)  # issuing + root
    return path


def test_seal_from_to_and_open_as_round_trip(people: CLI) -> None:
    cli = people
    sealed = cli.ok(
        "message",
        "seal",
        "--from",
        "alice@acme.test",
        "--to",
        "bob@acme.test",
        stdin=message("alice@acme.test", "bob@acme.test", "round trip"),
    ).out
    assert b"round trip" not in sealed
    opened = cli("message", "open", "--as", "bob@acme.test", stdin=sealed)
    assert opened.rc == 0, opened.err
    assert b"round trip" in opened.out
    assert b"smime=pass" in opened.out and b"acme.test;" in opened.out  # authserv_id
    # the sender's own copy is readable too (always encrypted to the sender)
    own = cli("message", "open", "--as", "alice@acme.test", "--json", stdin=sealed).json()
    assert own["decryption"]["decrypted"] is True
    # key isolation: a third user cannot read it
    cli.ok("keys", "generate", "--user", "eve@acme.test", "--kind", "p256")
    eve = cli("message", "open", "--as", "eve@acme.test", stdin=sealed)
    assert eve.rc == 3 and b"round trip" not in eve.out


def test_seal_to_an_imported_partner_certificate(people: CLI, tmp_path: Path, openssl: str) -> None:
    from smimeproxy.testing import CertificateFactory

    partner = CertificateFactory()
    carol = partner.user("carol@partner.test", key_kind="p256")
    (tmp_path / "carol.pem").write_bytes(carol.cert_pem)
    (tmp_path / "carol.key").write_bytes(carol.key_pem)
    (tmp_path / "root.pem").write_bytes(partner.root.cert_pem)
    cli = people
    cli.ok("certs", "import", str(tmp_path / "carol.pem"))
    mail = message("alice@acme.test", "carol@partner.test", "to a partner")
    untrusted = cli(
        "message", "seal", "--from", "alice@acme.test", "--to", "carol@partner.test", stdin=mail
    )
    assert untrusted.rc == 4 and "carol@partner.test" in untrusted.err
    cli.ok("trust", "add", str(tmp_path / "root.pem"))
    sealed = tmp_path / "sealed.eml"
    sealed.write_bytes(
        cli.ok(
            "message", "seal", "--from", "alice@acme.test", "--to", "carol@partner.test", stdin=mail
        ).out
    )
    dec = subprocess.run(
        [
            openssl,
            "cms",
            "-decrypt",
            "-in",
            str(sealed),
            "-recip",
            str(tmp_path / "carol.pem"),
            "-inkey",
            str(tmp_path / "carol.key"),
        ],
        capture_output=True,
    )
    assert dec.returncode == 0, dec.stderr
    assert b"to a partner" in dec.stdout


def test_seal_errors_are_one_line(people: CLI) -> None:
    cli = people
    mail = message("alice@acme.test", "nobody@partner.test")
    missing = cli(
        "message", "seal", "--from", "alice@acme.test", "--to", "nobody@partner.test", stdin=mail
    )
    assert missing.rc == 4 and "nobody@partner.test" in missing.err
    assert len(missing.err.strip().splitlines()) == 1
    unknown = cli("message", "open", "--as", "ghost@acme.test", stdin=mail)
    assert unknown.rc == 4 and "no user ghost@acme.test" in unknown.err
    mixed = cli("message", "seal", "--from", "alice@acme.test", "--encrypt-to", "x.pem", stdin=mail)
    assert mixed.rc == 4


def test_openssl_reads_what_seal_from_to_wrote(people: CLI, tmp_path: Path, openssl: str) -> None:
    cli = people
    sealed = tmp_path / "sealed.eml"
    sealed.write_bytes(
        cli.ok(
            "message",
            "seal",
            "--from",
            "alice@acme.test",
            "--to",
            "bob@acme.test",
            stdin=message("alice@acme.test", "bob@acme.test", "for openssl"),
        ).out
    )
    _, bob_key = _export(cli, tmp_path, "bob@acme.test")
    bob_cert = tmp_path / "bob@acme.test.pem"
    bob_cert.write_bytes(cli.ok("keys", "export-cert", "bob@acme.test").out)
    dec = tmp_path / "dec.eml"
    subprocess.run(
        [
            openssl,
            "cms",
            "-decrypt",
            "-in",
            str(sealed),
            "-recip",
            str(bob_cert),
            "-inkey",
            str(bob_key),
            "-out",
            str(dec),
        ],
        check=True,
        capture_output=True,
    )
    verified = subprocess.run(
        [
            openssl,
            "cms",
            "-verify",
            "-in",
            str(dec),
            "-CAfile",
            str(_root(cli, tmp_path)),
            "-purpose",
            "smimesign",
        ],
        capture_output=True,
    )
    assert verified.returncode == 0, verified.stderr
    assert b"for openssl" in verified.stdout


def test_open_as_reads_what_openssl_wrote(people: CLI, tmp_path: Path, openssl: str) -> None:
    cli = people
    alice_cert, alice_key = _export(cli, tmp_path, "alice@acme.test")
    bob_cert = tmp_path / "bob.pem"
    bob_cert.write_bytes(cli.ok("keys", "export-cert", "bob@acme.test").out)
    plain = tmp_path / "plain.eml"
    plain.write_bytes(message("alice@acme.test", "bob@acme.test", "from openssl"))
    signed, enc = tmp_path / "signed.eml", tmp_path / "enc.eml"
    subprocess.run(
        [
            openssl,
            "cms",
            "-sign",
            "-in",
            str(plain),
            "-signer",
            str(alice_cert),
            "-inkey",
            str(alice_key),
            "-out",
            str(signed),
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            openssl,
            "cms",
            "-encrypt",
            "-aes256",
            "-in",
            str(signed),
            "-out",
            str(enc),
            "-from",
            "alice@acme.test",
            "-to",
            "bob@acme.test",
            "-subject",
            "test",
            str(bob_cert),
        ],
        check=True,
        capture_output=True,
    )
    opened = cli("message", "open", "--as", "bob@acme.test", "--json", stdin=enc.read_bytes())
    status = opened.json()
    assert opened.rc == 0, status
    assert status["decryption"]["decrypted"] and status["smime"] == "pass"
    assert status["identifier"] == "alice@acme.test"


def test_rotation_keeps_old_mail_readable(people: CLI, tmp_path: Path, openssl: str) -> None:
    cli = people
    old_cert = tmp_path / "old.pem"
    old_cert.write_bytes(cli.ok("keys", "export-cert", "bob@acme.test").out)
    plain = tmp_path / "plain.eml"
    plain.write_bytes(message("partner@partner.test", "bob@acme.test", "sent to the old key"))
    enc = tmp_path / "enc.eml"
    subprocess.run(
        [openssl, "cms", "-encrypt", "-aes256", "-in", str(plain), "-out", str(enc), str(old_cert)],
        check=True,
        capture_output=True,
    )
    rotated = cli.ok("keys", "rotate", "--user", "bob@acme.test", "--json").json()
    assert rotated["rotated"] == 1
    states = [k["state"] for k in cli.ok("users", "show", "bob@acme.test", "--json").json()["keys"]]
    assert states == ["current", "previous"]
    assert cli.ok("keys", "export-cert", "bob@acme.test").out != old_cert.read_bytes()
    opened = cli("message", "open", "--as", "bob@acme.test", stdin=enc.read_bytes())
    assert opened.rc == 0, opened.err
    assert b"sent to the old key" in opened.out
    # new mail goes to the new key, which the new certificate names
    sealed = cli.ok(
        "message",
        "seal",
        "--from",
        "alice@acme.test",
        "--to",
        "bob@acme.test",
        stdin=message("alice@acme.test", "bob@acme.test", "new"),
    ).out
    new_cert = tmp_path / "new.pem"
    new_cert.write_bytes(cli.ok("keys", "export-cert", "bob@acme.test").out)
    (tmp_path / "sealed.eml").write_bytes(sealed)
    listed = subprocess.run(
        [openssl, "cms", "-cmsout", "-print", "-in", str(tmp_path / "sealed.eml")],
        capture_output=True,
        text=True,
    )
    new_serial = (
        subprocess.run(
            [openssl, "x509", "-in", str(new_cert), "-noout", "-serial"],
            capture_output=True,
            text=True,
        )
        .stdout.split("=")[1]
        .strip()
    )
    assert new_serial.lower().lstrip("0") in listed.stdout.replace(":", "").lower()
