"""End-to-end flows on PostgreSQL, master key rotation (reseal), and users."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.commands.conftest import CLI, message


def test_postgresql_end_to_end(make_cli: Callable[..., CLI], pg_url: str) -> None:
    cli = make_cli("pg", url=pg_url)
    created = cli.ok("init", "--json").json()
    assert created["store"].startswith("postgresql:")
    cli.ok("ca", "init", "--issuing")
    cli.ok("keys", "generate", "--user", "alice@acme.test", "--kind", "p256")
    cli.ok("keys", "generate", "--user", "bob@acme.test", "--kind", "p256")
    sealed = cli.ok(
        "message",
        "seal",
        "--from",
        "alice@acme.test",
        "--to",
        "bob@acme.test",
        stdin=message("alice@acme.test", "bob@acme.test", "over postgres"),
    ).out
    signer = cli.ok("users", "show", "alice@acme.test", "--json").json()["keys"][0]["serial"]
    rotated = cli.ok("keys", "rotate", "--all", "--json").json()
    assert rotated["rotated"] == 2
    opened = cli("message", "open", "--as", "bob@acme.test", stdin=sealed)
    assert opened.rc == 0 and b"over postgres" in opened.out and b"smime=pass" in opened.out
    # the signer's (now previous) certificate is revoked: the old signature no longer passes
    cli.ok("ca", "revoke", signer, "--reason", "keyCompromise")
    cli.ok("ca", "crl")
    assert cli("message", "open", "--as", "bob@acme.test", stdin=sealed).rc == 1
    assert cli.ok("audit", "verify", "--json").json()["ok"] is True
    assert cli("init").rc == 4  # already initialised


def test_reseal_with_a_new_master_key(cli: CLI, tmp_path: Path) -> None:
    cli.ok("keys", "generate", "--user", "alice@acme.test", "--kind", "p256")
    cli.ok(
        "keys",
        "generate",
        "--user",
        "bob@acme.test",
        "--kind",
        "p256",
        "--csr-out",
        str(tmp_path / "bob.csr"),
    )
    sealed = cli.ok(
        "message",
        "seal",
        "--from",
        "alice@acme.test",
        "--to",
        "alice@acme.test",
        stdin=message("alice@acme.test", "alice@acme.test", "resealed"),
    ).out
    new_key = tmp_path / "new.key"
    done = cli.ok("keys", "reseal", "--new-master-key-file", str(new_key))
    # alice's key, the root and issuing CA keys, bob's pending key
    assert "resealed 4 private key(s)" in done.text
    assert new_key.stat().st_mode & 0o777 == 0o600
    # the old key no longer opens the store; the new one does, with every key usable
    stale = cli("users", "list")
    assert stale.rc == 4 and "master key does not match" in stale.err
    text = cli.config.read_text().replace('"var/master.key"', f'"{new_key}"')
    cli.config.write_text(text)
    opened = cli("message", "open", "--as", "alice@acme.test", stdin=sealed)
    assert opened.rc == 0 and b"resealed" in opened.out
    cli.ok("keys", "generate", "--user", "carol@acme.test", "--kind", "p256")  # CA key opens
    entries = cli.ok("audit", "show", "--json").json()
    reseal = [e for e in entries if e["action"] == "store.reseal"]
    assert len(reseal) == 1 and reseal[0]["detail"]["keys"] == 4


def test_users_add_list_show(cli: CLI) -> None:
    cli.ok("users", "add", "dora@acme.test", "--alias", "d@acme.test", "--login", "dora")
    assert cli("users", "add", "d@acme.test").rc == 4  # an alias names one user only
    listing = cli.ok("users", "list", "--json").json()
    assert listing == [
        {
            "address": "dora@acme.test",
            "aliases": ["d@acme.test"],
            "logins": ["dora"],
            "created": listing[0]["created"],
            "id": listing[0]["id"],
            "current_key": None,
            "key_not_after": None,
        }
    ]
    cli.ok("keys", "generate", "--user", "dora", "--kind", "p256")
    shown = cli.ok("users", "show", "d@acme.test", "--json").json()
    assert shown["address"] == "dora@acme.test" and len(shown["keys"]) == 1
    text = cli.ok("users", "show", "dora").text
    assert "dora@acme.test" in text and "current" in text
    assert cli("users", "show", "nobody@acme.test").rc == 4
