"""``smimeproxy doctor`` finds what an operator got wrong, and says how to fix it."""

from __future__ import annotations

import datetime
import io
import json

from smimeproxy.cli import main
from smimeproxy.config import load_config
from smimeproxy.keystore import create_key_file
from smimeproxy.processing import open_configured_store
from smimeproxy.testing import CertificateFactory
from tests.ports import free_port as _free_port


def _setup(tmp_path, *, expiring: bool = False):
    create_key_file(tmp_path / "master.key")
    conf = tmp_path / "smimeproxy.toml"
    conf.write_text(
        '[keystore]\nurl = "sqlite:store.db"\nmaster_key_file = "master.key"\n'
        "[smtp]\n"
        'listen = ["tcp:10025:interface=127.0.0.1"]\n'
        f'next_hop = "tcp:127.0.0.1:{_free_port()}"\n'
        'local_domains = ["acme.test"]\n'
    )
    config = load_config(conf)
    store = open_configured_store(config, create=True)
    f = CertificateFactory()
    store.add_trust(f.root.certificate)
    soon = f.now + datetime.timedelta(days=10 if expiring else 300)
    alice = f.user("alice@acme.test", not_after=soon)
    store.import_key(alice.private_key, alice.certificate)
    store.close()
    return conf


def run(argv):
    out = io.BytesIO()
    code = main(argv, stdin=io.BytesIO(), stdout=out, stderr=io.StringIO())
    return code, out.getvalue().decode()


def test_unreachable_next_hop_fails_with_a_fix(tmp_path):
    conf = _setup(tmp_path)
    code, out = run(["--config", str(conf), "doctor", "--timeout", "1"])
    assert code == 1
    assert "SMTP next hop" in out and "unreachable" in out
    assert "master secret / store" in out


def test_json_and_expiring_certificate(tmp_path):
    conf = _setup(tmp_path, expiring=True)
    _, out = run(["--config", str(conf), "doctor", "--json", "--timeout", "1"])
    findings = {f["check"]: f for f in json.loads(out)}
    assert findings["user certificate expiry"]["status"] == "warn"
    assert "expires in" in findings["user certificate expiry"]["detail"]
    assert findings["trust anchors"]["status"] == "ok"


def test_loose_permissions_and_wrong_master_key(tmp_path):
    conf = _setup(tmp_path)
    (tmp_path / "master.key").chmod(0o644)
    code, out = run(["--config", str(conf), "doctor", "--timeout", "1"])
    assert code == 1
    assert "chmod 600" in out
    (tmp_path / "master.key").unlink()
    create_key_file(tmp_path / "master.key")
    code, out = run(["--config", str(conf), "doctor", "--json", "--timeout", "1"])
    findings = {f["check"]: f for f in json.loads(out)}
    assert findings["master secret / store"]["status"] == "FAIL"
    assert "does not match" in findings["master secret / store"]["detail"]


def test_bad_config_names_the_key(tmp_path):
    conf = tmp_path / "bad.toml"
    conf.write_text("[keystore]\nurl = 5\n")
    code, out = run(["--config", str(conf), "doctor"])
    assert code == 1
    assert "keystore.url" in out


def test_dovecot_auth_socket_checked_with_a_real_dovecot(tmp_path):
    """``auth_dovecot`` (the submission listener's SASL backend): a real Dovecot's
    auth-client socket completes the handshake; a missing socket is a FAIL with a fix."""
    from tests.integration.dovecot import start_dovecot

    dovecot = start_dovecot(tmp_path, {"alice": "secret"})
    try:
        conf = _setup(tmp_path)
        socket_path = dovecot.base / "run" / "auth-client"
        text = conf.read_text()
        conf.write_text(text + f'auth_dovecot = "unix:{socket_path}"\n')
        _, out = run(["--config", str(conf), "doctor", "--json", "--timeout", "2"])
        found = {f["check"]: f for f in json.loads(out)}["Dovecot auth socket"]
        assert found["status"] == "ok" and "PLAIN" in found["detail"], found
        conf.write_text(text + f'auth_dovecot = "unix:{tmp_path / "nowhere"}"\n')
        code, out = run(["--config", str(conf), "doctor", "--json", "--timeout", "2"])
        found = {f["check"]: f for f in json.loads(out)}["Dovecot auth socket"]
        assert code == 1 and found["status"] == "FAIL" and found["fix"], found
    finally:
        dovecot.stop()


def test_engine_workers_are_started_and_checked(tmp_path):
    """``workers`` set: doctor starts one real worker process and reports whether it
    opened the store; with the wrong master key it names the key."""
    conf = _setup(tmp_path)
    text = conf.read_text()
    conf.write_text(text + "workers = 1\n")
    _, out = run(["--config", str(conf), "doctor", "--json", "--timeout", "1"])
    found = {f["check"]: f for f in json.loads(out)}["engine worker processes"]
    assert found["status"] == "ok", found
    (tmp_path / "master.key").unlink()
    create_key_file(tmp_path / "master.key")  # not the key the store was sealed with
    code, out = run(["--config", str(conf), "doctor", "--json", "--timeout", "1"])
    found = {f["check"]: f for f in json.loads(out)}["engine worker processes"]
    assert code == 1 and found["status"] == "FAIL" and "master" in found["detail"], found
