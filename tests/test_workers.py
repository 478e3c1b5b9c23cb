"""Engine worker processes opening stored messages for the IMAP proxy
(:meth:`ProcessEngine.open_view`): real spawned processes over a real SQLite store.
Decryption uses the keys of the owners named with each message only."""

from __future__ import annotations

import os
import signal

import pytest
import pytest_twisted
from twisted.internet import reactor

from smimeproxy.config import load_config
from smimeproxy.errors import WorkerError
from smimeproxy.keystore import create_key_file, open_store
from smimeproxy.smime.sealer import seal
from smimeproxy.testing import CertificateFactory
from smimeproxy.workers import ProcessEngine, WorkerSpec

MESSAGE = (
    b"From: carol@partner.test\r\nTo: alice@acme.test\r\nSubject: stored\r\n"
    b"Content-Type: text/plain\r\n\r\nthe stored secret\r\n"
)


@pytest.fixture
def engine(tmp_path):
    """One worker over a store with alice's and bob's keys (an [imap]-only config)."""
    path = tmp_path / "smimeproxy.toml"
    path.write_text(
        '[keystore]\nurl = "sqlite:store.db"\nmaster_key_file = "master.key"\n'
        '[smime]\nauthserv_id = "imap.acme.test"\n'
        '[imap]\nlisten = ["tcp:0:interface=127.0.0.1"]\nupstream = "tcp:127.0.0.1:1"\n'
        "plaintext_login = true\nworkers = 1\n"
    )
    secret = create_key_file(tmp_path / "master.key")
    config = load_config(path)
    store = open_store(config.keystore.url, secret, create=True, base=tmp_path)
    pki = CertificateFactory()
    people = {name: pki.user(f"{name}@acme.test") for name in ("alice", "bob")}
    store.add_trust(pki.root.certificate)
    for issued in people.values():
        store.import_key(issued.private_key, issued.certificate)
    store.close()
    e = ProcessEngine(WorkerSpec(str(path), secret), 1, reactor, face="imap")
    e.people = people  # type: ignore[attr-defined]
    yield e
    pytest_twisted.blockon(e.close())


@pytest_twisted.inlineCallbacks
def test_open_view_decrypts_for_the_owner_only(engine):
    stored = seal(MESSAGE, recipients=[engine.people["alice"].certificate])
    view = yield engine.open_view(["alice@acme.test"], stored)
    assert b"the stored secret" in view.data
    assert b"Authentication-Results: imap.acme.test" in view.data
    structure = view.bodystructure(True)  # warmed in the worker: the text, then the footer
    assert structure.startswith(b'(("text" "plain"') and b'"mixed"' in structure
    # bob's keys do not open alice's message, even in the same worker
    assert (yield engine.open_view(["bob@acme.test"], stored)) is None


@pytest_twisted.inlineCallbacks
def test_open_view_of_a_broken_message_leaves_it_as_stored(engine):
    broken = seal(MESSAGE, recipients=[engine.people["alice"].certificate])[:-200]
    assert (yield engine.open_view(["alice@acme.test"], broken)) is None


@pytest_twisted.inlineCallbacks
def test_a_killed_worker_fails_its_jobs_and_is_replaced(engine):
    yield engine.start()
    [pid] = engine.pids()
    os.kill(pid, signal.SIGKILL)
    stored = seal(MESSAGE, recipients=[engine.people["alice"].certificate])
    answers = []
    for _ in range(3):
        try:
            view = yield engine.open_view(["alice@acme.test"], stored)
            answers.append(view is not None)
        except WorkerError:
            answers.append("died")
    assert answers[-1] is True and answers.count("died") <= 1
    assert engine.pids() and pid not in engine.pids()


def test_a_bug_in_a_worker_is_logged_without_the_text_it_quotes(monkeypatch):
    """An unforeseen exception may quote the message it choked on: the worker logs its
    type and frames only, and gives back an error naming the type, never the text."""
    from twisted.logger import formatEvent, globalLogPublisher

    from smimeproxy import workers
    from smimeproxy.metrics import Registry

    monkeypatch.setattr(workers, "_worker", workers._Worker(None, None, Registry(), None))
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:

        def choke() -> None:
            raise ValueError("Subject: the quarterly figures")

        answer = workers._run(choke)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert isinstance(answer.error, RuntimeError) and "ValueError" in str(answer.error)
    assert "quarterly" not in str(answer.error)
    text = " ".join(formatEvent(e) for e in seen)
    assert "worker.bug" in text and "ValueError" in text and "quarterly" not in text


@pytest_twisted.inlineCallbacks
def test_many_messages_at_once_small_and_larger_than_shared_memory(engine):
    """More jobs in flight than the worker has shared-memory slots, and a message larger
    than a slot: each answer is its own message's (the rest cross in the pipe)."""
    from twisted.internet.defer import gatherResults

    from smimeproxy.workers import PER_WORKER, SLOT_SIZE

    alice = engine.people["alice"].certificate
    line = b"y" * 70 + b"\r\n"
    texts = [b"message %d\r\n" % i + line * 600 for i in range(3 * PER_WORKER)]  # ~43 KB
    texts.append(b"the big one\r\n" + line * ((SLOT_SIZE >> 6) + 4096))
    stored = [seal(MESSAGE.replace(b"the stored secret", t), recipients=[alice]) for t in texts]
    assert len(stored[-1]) > SLOT_SIZE
    views = yield gatherResults([engine.open_view(["alice@acme.test"], s) for s in stored])
    for text, view in zip(texts, views, strict=True):
        assert text in view.data
    [worker] = engine._pool
    assert sorted(worker.free) == list(range(PER_WORKER))  # every slot back after its answer
