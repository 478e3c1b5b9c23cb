"""keys generate --token: a key made inside a PKCS#11 token (SoftHSM2), certified by
the internal CA, used by message seal/open through the store; never exportable."""

from __future__ import annotations

import uuid
from pathlib import Path

from tests.commands.conftest import CLI, message
from tests.keystore.softhsm import TOKENS, SoftHSM, softhsm  # noqa: F401  (fixture)


def test_token_key_generated_certified_and_used(
    cli: CLI,
    tmp_path: Path,
    softhsm: SoftHSM,  # noqa: F811
) -> None:
    pin = tmp_path / "pin"
    pin.write_text(softhsm.pin + "\n")
    text = cli.config.read_text().replace(
        "[keystore]\n",
        f'[keystore]\npkcs11_module = "{softhsm.module}"\n'
        f'pkcs11_token_label = "{TOKENS[1]}"\npkcs11_pin_file = "{pin}"\n',
    )
    cli.config.write_text(text)
    address = f"hsm-{uuid.uuid4().hex[:8]}@acme.test"
    made = cli.ok("keys", "generate", "--user", address, "--kind", "p256", "--token", "--json")
    assert made.json()["token"] is True
    listed = cli.ok("keys", "list").text
    assert "token" in listed
    sealed = cli.ok(
        "message",
        "seal",
        "--from",
        address,
        "--to",
        address,
        stdin=message(address, address, "signed in the token"),
    ).out
    opened = cli("message", "open", "--as", address, "--json", stdin=sealed)
    status = opened.json()
    assert opened.rc == 0, status
    assert status["smime"] == "pass" and status["decryption"]["decrypted"]
    refused = cli(
        "keys", "export-key", "--user", address, "--reason", "x", "--out", str(tmp_path / "k.pem")
    )
    assert refused.rc == 4 and "cannot leave" in refused.err
    assert not (tmp_path / "k.pem").exists()
    # no PIN in anything the command printed or audited
    assert softhsm.pin not in cli.ok("audit", "show").text
