"""Where the gateway's message work runs: the reactor's thread pool, or worker processes.

The engine is Python holding the GIL. In the gateway's own process it shares one core
with the reactor, and each slows the other at every system call (bench/smtp.py: the
reactor's ~500 us per message plus the engine's ~800 us under contention bound the rate
at ~40% of the engine alone). With ``[smtp] workers = N`` the work of
:meth:`MessageTransform.transform` runs in N processes of their own instead: each
opens the key store itself (from the configuration file and the master secret handed
over at start through the spawn pipe, never a file or the command line), builds its
own :class:`MessageProcessor` and transform from the same file, and sends back the
copies. The reactor keeps everything cheap: SMTP, the RCPT-time certificate checks,
the look-alike stripping of mail that needs no engine, and the relay.

Nothing is shared but the store, as between gateway nodes (DESIGN.md, scale-out): a
rotation made anywhere is seen by every worker's next message through the store
generation. What a worker logs and counts comes back with each result and is emitted
and counted here, so logs and ``/metrics`` look the same whichever way the work ran.

Faults: a worker that dies (killed, out of memory) fails the message it held with
:class:`~smimeproxy.errors.WorkerError` (the client gets 451 and retries) and the pool
is started again for the next message. A worker that cannot open the store does not
die: it answers every message with the error that stopped it (a wrong master key is
named as such), and the start of the service logs it. A reload (SIGHUP) starts a new
pool from the new file; the old one finishes what it holds and exits.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.logger import Logger, LogLevel, eventAsText, globalLogBeginner

from smimeproxy.errors import WorkerError
from smimeproxy.keystore import MasterSecret
from smimeproxy.metrics import Registry
from smimeproxy.smtp.transform import MessageTransform, TransformResult

#: how many messages the engine works on at once in the gateway's own thread pool,
#: whatever the pool's size. More concurrent jobs do not add CPU, they make the jobs
#: and the reactor hand the GIL back and forth at every system call (measured with
#: bench/smtp.py: 4 jobs ~10% slower than 1-2, the reactor's socket calls several times
#: slower). Two, not one, so that one large message does not hold up every other
#: session. Waiting messages wait in the reactor, costing nothing.
ENGINE_CONCURRENCY = 2
#: messages handed to each worker process at once: one working, one already in its
#: pipe, so that no worker waits for the reactor between messages
PER_WORKER = 2


class Engine(Protocol):
    """Runs :meth:`MessageTransform.transform` somewhere that is not the reactor."""

    def transform(
        self, transform: MessageTransform, sender: str, recipients: Sequence[str], data: bytes
    ) -> defer.Deferred[TransformResult]: ...

    def start(self) -> defer.Deferred[None]: ...

    def reload(self) -> None: ...

    def close(self) -> defer.Deferred[None]: ...


class ThreadEngine:
    """In the gateway's process, on its thread pool, at most ``concurrency`` at once."""

    def __init__(self, reactor: Any, threadpool: Any, concurrency: int = ENGINE_CONCURRENCY):
        self.reactor = reactor
        self.threadpool = threadpool
        self.slots = defer.DeferredSemaphore(concurrency)

    def transform(
        self, transform: MessageTransform, sender: str, recipients: Sequence[str], data: bytes
    ) -> defer.Deferred[TransformResult]:
        return self.slots.run(
            deferToThreadPool,
            self.reactor,
            self.threadpool,
            transform.transform,
            sender,
            recipients,
            data,
        )

    def start(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def reload(self) -> None:
        """Nothing to do: the caller swaps the transform object itself."""

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to build its own transform: the configuration file
    (read again in the worker, as a second node would) and the master secret."""

    config_path: str
    secret: MasterSecret


@dataclass(frozen=True)
class _Answer:
    """One job's outcome as it crosses back: the result or the error, and what the
    worker logged and counted meanwhile."""

    result: TransformResult | None
    error: BaseException | None
    events: tuple[tuple[str, str, str], ...]  # (namespace, level name, text)
    metrics: list[tuple[Any, ...]]
    pid: int


class ProcessEngine:
    """``workers`` processes, each with its own store connection and processor."""

    _log = Logger()

    def __init__(
        self,
        spec: WorkerSpec,
        workers: int,
        reactor: Any,
        registry: Registry | None = None,
        *,
        context: str = "spawn",
    ):
        if workers < 1:
            raise ValueError("a process engine needs at least one worker")
        self.spec = spec
        self.workers = workers
        self.reactor = reactor
        self.registry = registry or Registry()
        # spawn, not fork: the parent runs a reactor and threads, which fork copies
        # half-way through whatever they were doing
        self._context = multiprocessing.get_context(context)
        self.slots = defer.DeferredSemaphore(workers * PER_WORKER)
        self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=self._context,
            initializer=_start_worker,
            initargs=(self.spec,),
        )

    # -- the service's life ---------------------------------------------------------------
    def start(self) -> defer.Deferred[None]:
        """Start every worker now (not at the first message) and log whether they
        could open the store. Fires when all answered; never fails."""
        pings = [self._call(_ping) for _ in range(self.workers)]

        def report(results: list[tuple[bool, Any]]) -> None:
            errors = {str(value.value) for ok, value in results if not ok}
            if errors:
                for error in sorted(errors):
                    self._log.critical("smtp.workers_failed error={error}", error=error)
            else:
                self._log.info("smtp.workers_ready workers={n}", n=self.workers)

        return defer.DeferredList(pings, consumeErrors=True).addCallback(report)

    def reload(self) -> None:
        """A new pool from the (re-read) configuration file; the old one finishes the
        messages it holds, then its processes exit."""
        old, self._executor = self._executor, self._new_executor()
        old.shutdown(wait=False)
        self.start()

    def close(self) -> defer.Deferred[None]:
        """Stop the workers (call after the sessions drained: queued work is dropped)."""
        executor = self._executor
        return deferToThread(executor.shutdown, wait=True, cancel_futures=True)

    # -- messages -------------------------------------------------------------------------
    def transform(
        self, transform: MessageTransform, sender: str, recipients: Sequence[str], data: bytes
    ) -> defer.Deferred[TransformResult]:
        """The worker's transform of the message (``transform`` is the reactor side's,
        built from the same configuration, and not used here)."""
        return self.slots.run(self._call, _transform, sender, tuple(recipients), data)

    def pids(self) -> list[int]:
        """The worker processes running now (for ``doctor``, tests and operators)."""
        processes = getattr(self._executor, "_processes", None) or {}
        return sorted(p.pid for p in processes.values() if p.is_alive())

    def _call(self, function: Callable[..., _Answer], *args: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        executor = self._executor
        try:
            future = executor.submit(function, *args)
        except (BrokenProcessPool, RuntimeError):
            # the pool broke while idle (a worker was killed between messages): this
            # job never started, so it may go to a fresh pool
            self._restart(executor, WorkerError("the worker processes had stopped"))
            executor = self._executor
            try:
                future = executor.submit(function, *args)
            except (BrokenProcessPool, RuntimeError) as e:
                return defer.fail(WorkerError(f"the engine's worker processes failed: {e}"))
        future.add_done_callback(
            lambda f: self.reactor.callFromThread(self._settle, executor, f, d)
        )
        return d

    def _settle(self, executor: ProcessPoolExecutor, future: Future[_Answer], d: Any) -> None:
        error = future.exception()
        if error is not None:
            # the process died with the job (killed, out of memory, a crash in C)
            self._restart(executor, error)
            d.errback(WorkerError(f"a worker process died: {error}"))
            return
        answer = future.result()
        for namespace, level, text in answer.events:
            Logger(namespace=namespace).emit(
                LogLevel.levelWithName(level), "{text}", text=text, worker_pid=answer.pid
            )
        if answer.metrics:
            self.registry.add(answer.metrics)
        if answer.error is not None:
            d.errback(answer.error)
        else:
            d.callback(answer.result)

    def _restart(self, executor: ProcessPoolExecutor, error: BaseException) -> None:
        if executor is not self._executor:
            return  # already replaced (several jobs died with one pool)
        self._log.error("smtp.worker_died error={error}", error=str(error))
        self._executor = self._new_executor()
        executor.shutdown(wait=False, cancel_futures=True)


# -- inside a worker process ----------------------------------------------------------------
@dataclass
class _Worker:
    transform: MessageTransform | None
    registry: Registry
    error: BaseException | None


_worker: _Worker | None = None
_events: list[tuple[str, str, str]] = []


def _collect(event: dict[str, Any]) -> None:
    text = eventAsText(event, includeTimestamp=False, includeSystem=False)
    level = event.get("log_level", LogLevel.info)
    _events.append((str(event.get("log_namespace", "smimeproxy")), level.name, text))


def _start_worker(spec: WorkerSpec) -> None:
    """Build this process's transform; an error is kept and given back per message."""
    global _worker
    # the gateway decides when workers stop; a terminal's ^C or hangup goes to the
    # whole process group and must not kill a message in the middle
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    globalLogBeginner.beginLoggingTo([_collect], discardBuffer=True, redirectStandardIO=False)
    registry = Registry()
    try:
        _worker = _Worker(_build_transform(spec, registry), registry, None)
    except Exception as e:
        _worker = _Worker(None, registry, e)


def _build_transform(spec: WorkerSpec, registry: Registry) -> MessageTransform:
    from smimeproxy.config import load_config
    from smimeproxy.errors import ConfigError
    from smimeproxy.keystore import open_store
    from smimeproxy.processing import MessageProcessor, token_resolver

    config = load_config(spec.config_path)
    if config.smtp is None:
        raise ConfigError("the [smtp] section is missing", key="smtp", path=spec.config_path)
    store = open_store(
        config.keystore.url,
        spec.secret,
        base=config.path.parent,
        hsm=token_resolver(config.keystore),
    )
    lookup = None
    if config.directory is not None and config.directory.lookup is not None:
        from smimeproxy.directory.lookup import lookup_from_config

        lookup = lookup_from_config(config.directory.lookup, store)
    processor = MessageProcessor(store, config.smime, lookup=lookup, registry=registry)
    return MessageTransform(processor, config.smtp)


def _answer(result: TransformResult | None, error: BaseException | None) -> _Answer:
    assert _worker is not None
    events = tuple(_events)
    _events.clear()
    return _Answer(result, error, events, _worker.registry.take(), os.getpid())


def _ping() -> _Answer:
    assert _worker is not None
    return _answer(None, _worker.error)


def _transform(sender: str, recipients: tuple[str, ...], data: bytes) -> _Answer:
    assert _worker is not None
    if _worker.transform is None:
        return _answer(None, _worker.error)
    try:
        return _answer(_worker.transform.transform(sender, recipients, data), None)
    except Exception as e:
        if not isinstance(e, _picklable_errors()):
            # a bug: keep its traceback for the log, give back a plain error
            _collect(
                {
                    "log_namespace": __name__,
                    "log_level": LogLevel.critical,
                    "log_format": "smtp.worker_bug {trace}",
                    "trace": traceback.format_exc(),
                }
            )
            return _answer(None, RuntimeError(f"engine bug: {type(e).__name__}: {e}"))
        return _answer(None, e)


def _picklable_errors() -> tuple[type[BaseException], ...]:
    from smimeproxy.errors import SMIMEProxyError

    return (SMIMEProxyError,)
