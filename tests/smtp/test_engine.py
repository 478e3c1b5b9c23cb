"""The gateway with ``[smtp] workers``: the engine in worker processes of its own.

Real processes (spawned), a real SQLite store opened by each worker from the
configuration file and the master key, real loopback SMTP in and out; what arrives is
read with ``openssl cms``. Also: worker logs and metrics reach the gateway's, a killed
worker costs at most the message it held, a wrong master key is named, a reload
restarts the workers from the new file, stopping ends them.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher

from smimeproxy.config import load_config
from smimeproxy.errors import ConfigError, MasterKeyError, WorkerError
from smimeproxy.keystore import MasterSecret, create_key_file, open_store
from smimeproxy.metrics import Registry
from smimeproxy.processing import MessageProcessor
from smimeproxy.smime import mime
from smimeproxy.smtp import make_service
from smimeproxy.smtp.engine import ProcessEngine, WorkerSpec
from tests.cms import openssl_decrypt, openssl_verify
from tests.ports import free_port
from tests.procs import alive
from tests.smtp.conftest import PLAIN, write_config
from tests.smtp.loopback import Gateway
from tests.smtp.sink import Sink


class WorkerGateway(Gateway):
    """The loopback gateway of test_relay, with the master key in its file (workers
    open the store themselves) and ``workers`` processes."""

    def __init__(self, tmp_path, pki, sink: Sink, workers: int = 2, extra: str = ""):
        self.tmp_path = tmp_path
        self.sink = sink
        self.sink_port = reactor.listenTCP(0, sink.factory(), interface="127.0.0.1")
        self.port = free_port()
        self.extra = extra
        config = self.write(f"workers = {workers}\n{extra}")
        secret = create_key_file(tmp_path / "master.key")
        store = open_store(config.keystore.url, secret, create=True, base=tmp_path)
        store.add_trust(pki["factory"].root.certificate)
        store.import_key(pki["alice"].private_key, pki["alice"].certificate)
        store.import_certificate(pki["bob"].certificate)
        self.registry = Registry()
        self.processor = MessageProcessor(store, config.smime, registry=self.registry)
        self.service = make_service(config, self.processor, reactor, registry=self.registry)
        self.service.startService()

    def write(self, smtp_extra: str):
        return write_config(
            self.tmp_path,
            smtp_extra,
            next_hop=f"tcp:127.0.0.1:{self.sink_port.getHost().port}",
            listen=f"tcp:{self.port}:interface=127.0.0.1",
        )

    @property
    def engine(self) -> ProcessEngine:
        engine = self.service.engine
        assert isinstance(engine, ProcessEngine)
        return engine


@pytest.fixture
def workers(tmp_path, pki):
    made = []

    def make(sink: Sink, **kwargs):
        g = WorkerGateway(tmp_path, pki, sink, **kwargs)
        made.append(g)
        return g

    yield make
    for g in made:
        pytest_twisted.blockon(g.stop())


@pytest.fixture
def events():
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def _ready(g: WorkerGateway):
    """Fires once every worker answered its start-up ping."""
    return g.engine.start()


@pytest_twisted.inlineCallbacks
def test_outbound_sealed_by_workers_reads_with_openssl(workers, openssl, tmp_path, pki):
    sink = Sink()
    g = workers(sink)
    yield _ready(g)
    assert len(g.engine.pids()) == 2 and os.getpid() not in g.engine.pids()
    code, text = yield g.send("alice@acme.test", ["bob@partner.test"], PLAIN)
    assert code == 250 and "queued as" in text
    [got] = sink.received
    assert mime.parse_entity(got.data).mime_type == "application/pkcs7-mime"
    inner = openssl_decrypt(openssl, tmp_path, got.data, pki["bob"])
    verified = openssl_verify(openssl, tmp_path, inner, pki["factory"].root.cert_pem)
    assert verified.returncode == 0, verified.stderr.decode()
    assert b"The figures are attached." in verified.stdout


@pytest_twisted.inlineCallbacks
def test_worker_metrics_and_logs_reach_the_gateway(workers, events):
    sink = Sink()
    g = workers(sink)
    yield _ready(g)
    forged = b"X-SMIMEProxy-Decryption: forged\r\n" + PLAIN
    code, _ = yield g.send("alice@acme.test", ["bob@partner.test"], forged)
    assert code == 250
    text = g.registry.render().decode()
    # counted in the worker's processor, added to the gateway's registry
    assert "smimeproxy_seal_seconds_count 1" in text
    assert 'smimeproxy_messages_total{direction="outbound",outcome="relayed"} 1' in text
    removed = [e for e in events if "smtp.status_headers_removed" in str(e.get("text", ""))]
    assert removed and removed[0]["worker_pid"] in g.engine.pids()
    assert b"forged" not in sink.received[0].data


@pytest_twisted.inlineCallbacks
def test_killed_workers_cost_at_most_one_message_and_nothing_is_lost(workers, events):
    sink = Sink()
    g = workers(sink)
    yield _ready(g)
    for pid in g.engine.pids():
        os.kill(pid, signal.SIGKILL)
    yield deferLater(reactor, 0.5, lambda: None)
    answers = []
    for i in range(4):
        code, _ = yield g.send(
            "alice@acme.test", ["bob@partner.test"], PLAIN.replace(b"q3@", b"k%d@" % i)
        )
        answers.append(code)
    assert set(answers) <= {250, 451} and answers.count(451) <= 1 and answers[-1] == 250
    assert len(sink.received) == answers.count(250)  # every 250 arrived, once
    assert len(g.engine.pids()) >= 1


@pytest_twisted.inlineCallbacks
def test_reload_restarts_workers_from_the_new_file(workers):
    sink = Sink()
    g = workers(sink)
    yield _ready(g)
    before = set(g.engine.pids())
    config = g.write('workers = 2\noutbound_policy = "sign-only"')
    g.service.reload(config)
    yield g.engine.start()
    code, _ = yield g.send("alice@acme.test", ["bob@partner.test"], PLAIN)
    assert code == 250
    top = mime.parse_entity(sink.received[0].data)
    assert top.mime_type == "multipart/signed"  # the new policy, applied in the workers
    assert not before & set(g.engine.pids())


@pytest_twisted.inlineCallbacks
def test_workers_build_the_configuration_the_service_applied_not_the_file(workers):
    """A refused reload is put back with the old configuration while the file on disk
    already holds the new one: the restarted workers must use what the service uses."""
    sink = Sink()
    g = workers(sink)
    yield _ready(g)
    old = load_config(g.tmp_path / "smimeproxy.toml")
    g.write('workers = 2\noutbound_policy = "sign-only"')  # the file moves on ...
    g.service.reload(old)  # ... but the service keeps (puts back) the old configuration
    yield g.engine.start()
    code, _ = yield g.send("alice@acme.test", ["bob@partner.test"], PLAIN)
    assert code == 250
    assert mime.parse_entity(sink.received[0].data).mime_type == "application/pkcs7-mime"


@pytest_twisted.inlineCallbacks
def test_stopping_the_gateway_ends_the_workers(tmp_path, pki):
    g = WorkerGateway(tmp_path, pki, Sink())
    yield _ready(g)
    pids = g.engine.pids()
    assert pids
    yield g.stop()
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        yield deferLater(reactor, 0.1, lambda: None)
    assert not any(alive(p) for p in pids)


@pytest_twisted.inlineCallbacks
def test_wrong_master_key_is_named_at_start_and_per_message(tmp_path, pki, events):
    config = write_config(tmp_path, "workers = 1")
    secret = create_key_file(tmp_path / "master.key")
    open_store(config.keystore.url, secret, create=True, base=tmp_path)
    wrong = MasterSecret(os.urandom(32), "the wrong key")
    engine = ProcessEngine(WorkerSpec(str(config.path), wrong), 1, reactor)
    try:
        yield engine.start()
        critical = [e for e in events if "smtp.workers_failed" in formatEvent(e)]
        assert critical and "the wrong key" in critical[0]["error"]
        with pytest.raises(MasterKeyError, match="the wrong key"):
            yield engine.transform(None, "alice@acme.test", ["bob@partner.test"], PLAIN)
    finally:
        yield engine.close()


def _one_worker(tmp_path, **options):
    """A one-worker engine over a new, empty store in ``tmp_path``."""
    config = write_config(tmp_path, "workers = 1")
    secret = create_key_file(tmp_path / "master.key")
    open_store(config.keystore.url, secret, create=True, base=tmp_path)
    return ProcessEngine(WorkerSpec(str(config.path), secret), 1, reactor, **options)


@pytest_twisted.inlineCallbacks
def test_a_message_that_kills_its_worker_gets_a_temporary_failure(tmp_path, pki):
    engine = _one_worker(tmp_path)
    try:
        yield engine.start()
        [pid] = engine.pids()
        d = engine._call(os.kill, pid, signal.SIGKILL)  # the job kills its own process
        with pytest.raises(WorkerError):
            yield d
        yield engine.start()  # a fresh pool answers again
        assert engine.pids() and pid not in engine.pids()
    finally:
        yield engine.close()


@pytest_twisted.inlineCallbacks
def test_jobs_a_dead_worker_had_not_started_are_answered_by_another(tmp_path, pki):
    """Only the job a worker was on when it died fails (it may be what killed it); the
    ones queued behind it go to a new worker."""
    from twisted.internet.defer import gatherResults

    from smimeproxy.workers import _ping

    engine = _one_worker(tmp_path)
    try:
        yield engine.start()
        [pid] = engine.pids()
        killer = engine._call(os.kill, pid, signal.SIGKILL)
        queued = [engine._call(_ping) for _ in range(3)]
        with pytest.raises(WorkerError):
            yield killer
        assert (yield gatherResults(queued)) == [None, None, None]
        assert engine.pids() and pid not in engine.pids()
    finally:
        yield engine.close()


@pytest_twisted.inlineCallbacks
def test_workers_that_die_as_they_start_are_not_started_per_job(tmp_path, events):
    """A broken install: every worker exits at once. Jobs fail at once with a reason, and
    no more than about one worker a second is started, however many jobs wait."""
    import sys

    engine = _one_worker(tmp_path, command=[sys.executable, "-c", "raise SystemExit(3)"])
    try:
        yield deferLater(reactor, 0.5, lambda: None)  # the first one has died by now
        failures = []
        for _ in range(20):
            try:
                yield engine._call(os.getpid)
            except WorkerError as e:
                failures.append(str(e))
            yield deferLater(reactor, 0.02, lambda: None)
        assert len(failures) == 20
        assert any("die as they start" in f for f in failures)
        died = [e for e in events if "smtp.worker_died" in formatEvent(e)]
        assert 1 <= len(died) <= 3  # in ~1 s: not one per job
    finally:
        yield engine.close()


@pytest_twisted.inlineCallbacks
def test_a_worker_stuck_on_one_job_is_killed_and_replaced(tmp_path, pki, events):
    """A job that does not end (a hung library call, say) costs that worker, not the
    service: after the job timeout the worker is killed, its jobs fail as a dead
    worker's would (451 for an SMTP client) and a new worker answers."""
    engine = _one_worker(tmp_path, job_timeout=0.5)
    try:
        yield engine.start()
        [pid] = engine.pids()
        started = time.monotonic()
        with pytest.raises(WorkerError):
            yield engine._call(time.sleep, 30)
        assert time.monotonic() - started < 10
        assert any("smtp.worker_stuck" in formatEvent(e) for e in events)
        yield engine.start()  # a fresh pool answers again
        assert engine.pids() and pid not in engine.pids()
    finally:
        yield engine.close()


def test_workers_key_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="workers"):
        write_config(tmp_path, "workers = -1")
    assert write_config(tmp_path, "workers = 3").smtp.workers == 3
