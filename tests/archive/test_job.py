"""The periodic index pass of the service, driven by a Clock; plus one real pass in a
real thread pool over configured sources."""

from __future__ import annotations

import mailbox
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from smimeproxy.archive.indexing import IndexReport
from smimeproxy.archive.job import ArchiveJob, make_service
from smimeproxy.archive.operations import LocalArchive
from smimeproxy.config import load_config
from tests.archive.conftest import ALICE, World, plain


def test_schedule_off_is_an_empty_service(world: World) -> None:
    service = make_service(world.config, world.processor, Clock())
    assert list(service) == []  # type: ignore[call-overload]


def test_runs_every_interval_never_twice_at_once() -> None:
    clock = Clock()
    pending: list[defer.Deferred[IndexReport]] = []

    def in_thread(f: object) -> defer.Deferred[IndexReport]:
        d: defer.Deferred[IndexReport] = defer.Deferred()
        pending.append(d)
        return d

    job = ArchiveJob(60, IndexReport, in_thread, clock)
    job.startService()
    assert len(pending) == 1  # at start
    with capturedLogs() as events:
        clock.advance(60)  # the first pass is still running
    assert len(pending) == 1
    assert any(e.get("log_format", "").startswith("archive.index.skipped") for e in events)
    pending[0].callback(IndexReport())
    clock.advance(60)
    assert len(pending) == 2
    pending[1].errback(RuntimeError("boom"))  # logged, the schedule goes on
    clock.advance(60)
    assert len(pending) == 3 and job.passes == 2
    stopped = job.stopService()
    assert not stopped.called  # waits for the running pass
    pending[2].callback(IndexReport())
    assert stopped.called
    clock.advance(600)
    assert len(pending) == 3


@pytest.mark.usefixtures("world")
def test_configured_pass_in_a_thread_pool(world: World, tmp_path: Path) -> None:
    """Real configuration with a Maildir source and a schedule, a real thread pool."""
    from twisted.python.threadpool import ThreadPool

    md = mailbox.Maildir(tmp_path / "m", create=True)
    md.add(plain("scheduled", "words"))
    text = world.config.path.read_text() + (
        'schedule = "1h"\n\n[[archive.sources]]\nkind = "maildir"\n'
        f'path = "{tmp_path / "m"}"\nowner = "{ALICE}"\n'
    )
    world.config.path.write_text(text)
    config = load_config(world.config.path)
    pool = ThreadPool(1, 1)
    pool.start()
    results: list[IndexReport] = []
    try:
        clock = Clock()

        def in_thread(f):  # type: ignore[no-untyped-def]
            # the real pool runs the pass; the test waits for it synchronously
            import queue

            q: queue.Queue[object] = queue.Queue()
            pool.callInThread(lambda: q.put(_call(f)))
            outcome = q.get(timeout=60)
            if isinstance(outcome, BaseException):
                return defer.fail(outcome)
            results.append(outcome)  # type: ignore[arg-type]
            return defer.succeed(outcome)

        service = make_service(config, world.processor, clock, run_in_thread=in_thread)
        service.startService()
        service.stopService()
    finally:
        pool.stop()
    assert results and results[0].indexed == 1
    assert config.archive is not None
    archive = LocalArchive.open(config.archive.index_dir)
    assert [h.subject for h in archive.index.search("scheduled")] == ["scheduled"]
    archive.close()
    assert any(e.action == "archive.index" and e.actor == "archive-job"
               for e in world.store.audit_entries())  # fmt: skip


def _call(f):  # type: ignore[no-untyped-def]
    try:
        return f()
    except BaseException as e:  # handed back to the test thread
        return e
