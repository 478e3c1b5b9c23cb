"""The asynchronous face: same store, every call in the injected thread pool, results
and errors delivered through Deferreds; no key material in logs."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.threadpool import ThreadPool

from smimeproxy.errors import KeyNotFound, KeystoreError
from smimeproxy.keystore import Keystore, SyncStore
from smimeproxy.testing import Issued


@pytest.fixture
def threadpool() -> Iterator[ThreadPool]:
    pool = ThreadPool(minthreads=1, maxthreads=4, name="keystore-test")
    pool.start()
    yield pool
    pool.stop()


class RecordingStore:
    """Wraps a SyncStore to note which thread each call runs on."""

    def __init__(self, store: SyncStore):
        self._store = store
        self.threads: set[str] = set()

    def __getattr__(self, name: str) -> object:
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def call(*args: object, **kwargs: object) -> object:
            self.threads.add(threading.current_thread().name)
            return attr(*args, **kwargs)

        return call


@pytest_twisted.inlineCallbacks
def test_lookups_run_in_the_pool(
    store: SyncStore, people: dict[str, Issued], threadpool: ThreadPool
):
    recording = RecordingStore(store)
    keystore = Keystore(recording, reactor, threadpool)  # type: ignore[arg-type]
    user = yield keystore.add_user("alice@acme.test", login_names=["alice"])
    assert user.login_names == ("alice",)
    record = yield keystore.import_key(people["alice2"].key, people["alice2"].certificate)
    pairs = yield keystore.decryption_keys("alice")
    assert [p.certificate for p in pairs] == [record.certificate]
    found = yield keystore.encryption_certificate("alice@acme.test")
    assert found.fingerprint == record.id
    signing = yield keystore.signing_key("alice@acme.test")
    assert signing.pair.certificate == people["alice2"].certificate
    harvested = yield keystore.harvest(
        people["partner"].certificate, ("aes128_gcm",), verified=True
    )
    assert harvested.capabilities == ("aes128_gcm",)
    verification = yield keystore.verify_audit()
    assert verification.ok
    assert recording.threads and threading.main_thread().name not in recording.threads
    assert all("keystore-test" in name for name in recording.threads)


@pytest_twisted.inlineCallbacks
def test_errors_arrive_as_failures(store: SyncStore, threadpool: ThreadPool):
    keystore = Keystore(store, reactor, threadpool)
    with pytest.raises(KeyNotFound):
        yield keystore.signing_key("nobody@acme.test")
    with pytest.raises(KeystoreError, match="unverified"):
        yield keystore.harvest(object(), verified=False)  # type: ignore[arg-type]


def test_no_key_material_in_logs(store: SyncStore, people: dict[str, Issued], tmp_path) -> None:
    """Import, rotation, export, revocation and reseal log what happened (fingerprints)
    and never key bytes, PEM, or the master secret."""
    from smimeproxy.keystore import create_key_file

    new_master = create_key_file(tmp_path / "new.key")
    with capturedLogs() as events:
        store.import_key(people["alice"].private_key, people["alice"].certificate)
        record = store.rotate("alice@acme.test", people["alice2"].key, people["alice2"].certificate)
        store.export_key(record.id, reason="test")
        store.revoke_key(record.id, "test")
        store.reseal(new_master)
        store.decryption_keys("alice@acme.test")
    assert len(events) >= 5
    assert all(e["log_level"] <= LogLevel.info for e in events)
    text = "\n".join(formatEvent(e) + repr(e) for e in events)
    assert record.id in text  # the fingerprint is logged ...
    for issued in (people["alice"], people["alice2"]):  # ... the key is not
        der = issued.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        for fragment in (issued.key_pem.decode(), der.hex(), repr(der)[2:40]):
            assert fragment not in text
    assert new_master.material.hex() not in text
    assert "PRIVATE KEY" not in text
