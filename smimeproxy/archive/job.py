"""The archive inside the ``twistd`` service: an index pass every ``[archive] schedule``.

The pass is blocking (CMS, whoosh, SQLite), so it runs in the injected thread pool,
never on the reactor. A pass that is still running when the next one is due is not
started twice (the tick is skipped and logged). A failing pass is logged and the
schedule goes on. With ``schedule = "off"`` the service does nothing (indexing is then
run from the command line or cron).

Not guaranteed: stopping the service waits for a running pass to finish (a pass is
committed batch by batch, so a hard kill loses at most one batch, re-done next time).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from smimeproxy.archive.indexing import IndexReport
from smimeproxy.config import ArchiveConfig, Config
from smimeproxy.processing import MessageProcessor

#: runs a blocking callable off the reactor and fires with its result
ThreadRunner = Callable[[Callable[[], IndexReport]], "Deferred[IndexReport]"]


class ArchiveJob(Service):
    """Calls ``run_pass`` in a thread every ``interval`` seconds (first at start)."""

    _log = Logger()
    name = "archive-index"  # type: ignore[assignment]

    def __init__(
        self,
        interval: int,
        run_pass: Callable[[], IndexReport],
        run_in_thread: ThreadRunner,
        clock: Any,
    ):
        self.interval = interval
        self.run_pass = run_pass
        self.run_in_thread = run_in_thread
        self.clock = clock
        self._loop: LoopingCall | None = None
        self._running: Deferred[IndexReport] | None = None
        self.passes = 0

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        running = self._running
        if running is None:
            return succeed(None)
        waiting: Deferred[Any] = Deferred()

        def release(result: Any) -> Any:
            waiting.callback(None)
            return result

        running.addBoth(release)
        return waiting

    def tick(self) -> None:
        if self._running is not None:
            self._log.warn("archive.index.skipped reason={reason}", reason="previous pass running")
            return
        d = self.run_in_thread(self.run_pass)
        self._running = d
        d.addCallbacks(self._done, self._failed)
        d.addBoth(self._clear)

    def _done(self, report: IndexReport) -> IndexReport:
        self.passes += 1
        self._log.info(
            "archive.index.done indexed={indexed} owners={owners} errors={errors}",
            indexed=report.indexed,
            owners=len(report.owners),
            errors=len(report.errors),
        )
        for error in report.errors:
            self._log.warn("archive.index.source_error error={error}", error=error)
        return report

    def _failed(self, failure: Any) -> None:
        self.passes += 1
        self._log.failure("archive.index.failed", failure)

    def _clear(self, result: Any) -> None:
        self._running = None


def make_service(
    config: Config,
    processor: MessageProcessor,
    reactor: Any = None,
    *,
    threadpool: Any = None,
    run_in_thread: ThreadRunner | None = None,
    run_pass: Callable[[], IndexReport] | None = None,
) -> IService:
    """The archive's periodic index pass over ``[[archive.sources]]`` as a service
    (an empty MultiService when the schedule is off or there is no ``[archive]``)."""
    top = MultiService()
    archive: ArchiveConfig | None = config.archive
    if archive is None or not archive.schedule:
        return top  # type: ignore[return-value]  # zope: MultiService provides IService
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    if run_in_thread is None:
        pool = threadpool if threadpool is not None else reactor.getThreadPool()

        def run_in_thread(f: Callable[[], IndexReport]) -> Deferred[IndexReport]:
            return deferToThreadPool(reactor, pool, f)

    if run_pass is None:
        from smimeproxy.archive.operations import configured_pass

        def run_pass() -> IndexReport:
            return configured_pass(archive, processor, actor="archive-job")

    ArchiveJob(archive.schedule, run_pass, run_in_thread, reactor).setServiceParent(top)
    return top  # type: ignore[return-value]
