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


def test_concurrent_rotations_leave_one_current_key(
    store_url: str, master: MasterSecret, people: dict[str, Issued], tmp_path: Path
) -> None:
    """Two nodes rotate the same user at the same moment: both keys are kept, exactly
    one is current (the database's unique index decides; the loser redoes its
    rotation on top of the winner's)."""
    store = open_store(store_url, master, create=True)
    store.import_key(people["alice"].private_key, people["alice"].certificate)
    procs = [
        node(store_url, master, "rotate", "alice@acme.test", *write(tmp_path, who, people[who]))
        for who in ("alice2", "alice3")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-2000:]
    states = sorted(str(r.state) for r in store.keys("alice@acme.test"))
    assert states == ["current", "previous", "previous"]
    assert len(store.decryption_keys("alice@acme.test")) == 3
    assert store.verify_audit().ok


def test_rotation_racing_another_node_is_redone_on_top_of_it(
    store_url: str, master: MasterSecret, people: dict[str, Issued]
) -> None:
    """Deterministic version of the race: node A holds its rotation open (its clock
    blocks while it writes the audit entry) while node B rotates the same user. B must
    end up replacing A's new key, not fail and not leave two current keys."""
    import datetime
    import threading
    import time

    release = threading.Event()
    calls = {"n": 0, "armed": False}

    def slow_clock() -> datetime.datetime:
        if calls["armed"]:
            calls["n"] += 1
            if calls["n"] == 2:  # the audit entry, inside A's open transaction
                release.wait(10)
        return datetime.datetime.now(datetime.UTC)

    node_a = open_store(store_url, master, create=True, now=slow_clock)
    node_b = open_store(store_url, master)
    node_a.import_key(people["alice"].private_key, people["alice"].certificate)
    calls["armed"] = True
    results: dict[str, object] = {}

    def rotate(name: str, store, who: str) -> None:
        try:
            results[name] = store.rotate(
                "alice@acme.test", people[who].key, people[who].certificate
            )
        except Exception as e:  # reported below
            results[name] = e

    a = threading.Thread(target=rotate, args=("a", node_a, "alice2"))
    a.start()
    while calls["n"] < 2:
        time.sleep(0.01)
    b = threading.Thread(target=rotate, args=("b", node_b, "alice3"))
    b.start()
    time.sleep(0.5)  # B is now waiting on A's lock
    release.set()
    a.join(20)
    b.join(20)
    assert not isinstance(results["a"], Exception), results["a"]
    assert not isinstance(results["b"], Exception), results["b"]
    current = [r for r in node_b.keys("alice@acme.test") if str(r.state) == "current"]
    assert [r.id for r in current] == [fingerprint(people["alice3"].certificate)]
    last = node_b.audit_entries()[-1]
    assert last.detail["replaced"] == fingerprint(people["alice2"].certificate)
    for store in (node_a, node_b):
        getattr(store.db, "close_all", lambda: None)()
