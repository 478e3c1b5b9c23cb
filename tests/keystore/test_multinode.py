"""Several processes on one store (the scale-out case): each sees the others' changes
at once, and concurrent writers keep the audit chain and the constraints intact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smimeproxy.keystore import MasterSecret, open_store
from smimeproxy.smime.status import fingerprint
from smimeproxy.testing import Issued

ROOT = Path(__file__).resolve().parents[2]

NODE = r"""
import json, os, sys
from cryptography import x509
from smimeproxy.keystore import MasterSecret, open_store
from smimeproxy.smime.keys import load_private_key
from smimeproxy.smime.status import fingerprint

store = open_store(os.environ["STORE_URL"], MasterSecret.from_env("SMK"), create=True)
command, *args = sys.argv[1:]
out = {}
if command == "import":
    key = load_private_key(open(args[0], "rb").read())
    cert = x509.load_pem_x509_certificate(open(args[1], "rb").read())
    out["id"] = store.import_key(key, cert, actor="node-a").id
elif command == "rotate":
    key = load_private_key(open(args[1], "rb").read())
    cert = x509.load_pem_x509_certificate(open(args[2], "rb").read())
    out["id"] = store.rotate(args[0], key, cert, actor="node").id
elif command == "show":
    out["decrypt"] = [fingerprint(p.certificate) for p in store.decryption_keys(args[0])]
    out["sign"] = fingerprint(store.signing_key(args[0]).pair.certificate)
elif command == "audit":
    for n in range(int(args[1])):
        store.audit(args[0], "test.append", "x", {"n": n})
    for n in range(int(args[2])):
        store.add_user(f"{args[0]}-{n}@acme.test", actor=args[0])
print(json.dumps(out))
"""


def node(url: str, master: MasterSecret, *args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, STORE_URL=url, SMK=master.material.hex(), PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-c", NODE, *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def run(url: str, master: MasterSecret, *args: str) -> dict:
    proc = node(url, master, *args)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    return json.loads(out)


def write(tmp_path: Path, name: str, issued: Issued) -> tuple[str, str]:
    key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
    key.write_bytes(issued.key_pem)
    cert.write_bytes(issued.cert_pem)
    return str(key), str(cert)


def test_processes_see_each_others_changes(
    pg_url: str, master: MasterSecret, people: dict[str, Issued], tmp_path: Path
) -> None:
    first = run(pg_url, master, "import", *write(tmp_path, "a", people["alice2"]))
    shown = run(pg_url, master, "show", "alice@acme.test")
    assert shown == {"decrypt": [first["id"]], "sign": first["id"]}
    second = run(
        pg_url, master, "rotate", "alice@acme.test", *write(tmp_path, "b", people["alice3"])
    )
    assert second["id"] == fingerprint(people["alice3"].certificate)
    # this process (a third node) sees both without any cache to refresh
    store = open_store(pg_url, master)
    assert [fingerprint(p.certificate) for p in store.decryption_keys("alice@acme.test")] == [
        second["id"],
        first["id"],
    ]
    shown = run(pg_url, master, "show", "alice@acme.test")
    assert shown["sign"] == second["id"] and set(shown["decrypt"]) == {first["id"], second["id"]}
    assert [e.actor for e in store.audit_entries()][-2:] == ["node-a", "node"]


@pytest.mark.parametrize("writers", [3])
def test_concurrent_writers_keep_the_chain(store_url: str, master: MasterSecret, writers: int):
    """Several processes initialise one new store, then append to the audit log and
    add users at the same time: no entry is lost, sequence numbers stay unique and the
    chain verifies."""
    procs = [node(store_url, master, "audit", f"node{n}", "25", "5") for n in range(writers)]
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err.decode()[-2000:]
    store = open_store(store_url, master)
    entries = store.audit_entries()
    assert len(entries) == writers * 30
    assert [e.seq for e in entries] == list(range(1, writers * 30 + 1))
    assert store.verify_audit().ok
    assert len(store.users()) == writers * 5
