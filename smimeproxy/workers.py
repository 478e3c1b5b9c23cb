"""Engine worker processes: signing, encryption and decryption beside the reactor's process.

The engine is Python holding the GIL. In a face's own process it shares one core with
the reactor, and each slows the other at every system call (bench/smtp.py: the
reactor's ~500 us per message plus the engine's ~800 us under contention bound the
gateway at ~40% of the engine alone; bench/imap.py: a cold sync of a mailbox with S/MIME
messages took ~1.9x the engine's own decryption time). With ``workers = N`` in
``[smtp]`` or ``[imap]`` that work runs in N processes of their own instead: each opens
the key store itself (from the configuration file and the master secret handed over at
start through its input pipe: never a file, the environment or the command line),
builds its own :class:`MessageProcessor` from the same file, and sends back results:
the gateway's copies (:meth:`ProcessEngine.transform`) or the proxy's decrypted views
(:meth:`ProcessEngine.open_view`). The reactor keeps the cheap work: the protocols,
the store lookups at RCPT or LOGIN time, the relay. Jobs and answers are pickles on the
pipes; their large ``bytes`` (messages of 16 KiB to 1 MiB) cross through memory shared
with that worker alone (:mod:`smimeproxy.arena`), which took the IMAP proxy's cold sync
of a mailbox with S/MIME messages from 1.34-1.55x to 1.14-1.20x of its budget.

Nothing is shared but the store, as between nodes (DESIGN.md, scale-out): a rotation
made anywhere is seen by every worker's next message through the store generation.
Decryption stays with the owner: the proxy names the authenticated user's addresses
with each message and the worker opens it with their keys only. What a worker logs and
counts comes back with each result and is emitted and counted here, so logs and
``/metrics`` look the same whichever way the work ran.

Faults: a worker that dies (killed, out of memory) fails the job it was on with
:class:`~smimeproxy.errors.WorkerError` (a gateway client gets 451 and retries; the
proxy serves the message as stored); the jobs queued behind it go to another worker,
once, and a new worker is started. One that spends more than :data:`JOB_TIMEOUT` on a
job is killed, with the same outcome. A
worker that cannot open the store does not die: it answers every job with the error
that stopped it (a wrong master key is named as such), and :meth:`ProcessEngine.start`
logs it. A reload (SIGHUP) starts new workers from the new file; the old ones finish
what they hold and exit.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import signal
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel, eventAsText, globalLogBeginner
from twisted.python.failure import Failure

from smimeproxy.arena import Arena
from smimeproxy.bugs import log_bug
from smimeproxy.errors import SMIMEProxyError, WorkerError
from smimeproxy.keystore import MasterSecret
from smimeproxy.metrics import Registry

if TYPE_CHECKING:
    from smimeproxy.config import Config
    from smimeproxy.processing import MessageProcessor
    from smimeproxy.smtp.transform import MessageTransform, TransformResult

#: jobs handed to each worker process at once, so that a worker never waits for the
#: reactor between jobs: the reactor sends jobs and reads answers between its turns on
#: the sessions (bench/smtp.py, one worker on two cores, sign + encrypt: 2 at once gave
#: 32% of the engine's rate, 4 gave 65%, 8 gave 77%). Costs no memory that the sessions
#: do not hold already (each keeps its message until it is answered).
PER_WORKER = 8
#: octets of shared memory per job and direction (:mod:`smimeproxy.arena`): a message
#: (or answer) up to this size crosses without going through the pipe; larger ones take
#: the pipe. Pages are touched only as far as messages reach.
SLOT_SIZE = 1 << 20
#: where a worker finds its arena: "fd:slots:slot size" (set only by :meth:`_spawn`)
ARENA_ENV = "SMIMEPROXY_WORKER_ARENA"
_ARENA_FD = 3
#: seconds :meth:`ProcessEngine.close` waits for a worker to finish before SIGKILL
CLOSE_TIMEOUT = 10.0
#: seconds a worker may spend on one job before it is taken for stuck and killed (its
#: jobs then fail like a dead worker's and a new one starts): far above any real message
#: (a 10 MB one opens in well under a second), below the MTA's and clients' own timeouts
JOB_TIMEOUT = 300.0


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to build its own processor: the configuration (the
    file's path, and the TOML the service applied, so that a worker started later
    builds the same configuration whatever the file holds by then) and the master
    secret."""

    config_path: str
    secret: MasterSecret
    document: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class _Job:
    """A job sent to a worker: who waits for its answer, its arena slot, the call
    itself, and whether it was handed over again after another worker died."""

    answer: defer.Deferred[Any]
    slot: int | None
    function: Callable[..., Any]
    args: tuple[Any, ...]
    retried: bool


@dataclass(frozen=True)
class _Answer:
    """One job's outcome as it crosses back: the result or the error, and what the
    worker logged and counted meanwhile."""

    result: Any
    error: BaseException | None
    events: tuple[tuple[str, str, str], ...]  # (namespace, level name, text)
    metrics: list[tuple[Any, ...]]
    pid: int


class _WorkerProcess(ProcessProtocol):
    """One worker seen from the reactor: length-prefixed pickles over its stdin and
    stdout, answered in the order sent (a worker does one job at a time)."""

    def __init__(self, engine: ProcessEngine, arena: Arena | None = None):
        self.engine = engine
        self.arena = arena
        #: job slots of the arena not held by a job in flight
        self.free = list(range(arena.slots)) if arena is not None else []
        #: jobs sent and not answered, oldest first
        self.pending: deque[_Job] = deque()
        self.buffer = bytearray()
        self.retiring = False
        self.ended = False
        self.started = time.monotonic()
        self.exited: defer.Deferred[None] = defer.Deferred()
        self.input_closed = False
        #: fires when the oldest job has taken longer than the engine's job timeout
        self.watchdog: Any = None
        #: it has answered a job (so it could start)
        self.answered = False

    @property
    def pid(self) -> int | None:
        return None if self.ended or self.transport is None else self.transport.pid

    @property
    def usable(self) -> bool:
        return not (self.ended or self.retiring or self.input_closed)

    def send(
        self, function: Callable[..., _Answer], args: tuple[Any, ...], retried: bool = False
    ) -> defer.Deferred[_Answer]:
        if self.ended or self.input_closed:
            return defer.fail(WorkerError("the worker process is gone"))
        slot = self.free.pop() if self.free else None
        if self.arena is None:
            frame = _frame((function, args, None))
        else:
            region = None if slot is None else self.arena.input_region(slot)
            frame = _framed(self.arena.dumps((function, args, slot), region))
        d: defer.Deferred[_Answer] = defer.Deferred()
        self.pending.append(_Job(d, slot, function, args, retried))
        if len(self.pending) == 1:
            self._watch()
        self.transport.writeToChild(0, frame)
        return d

    def _watch(self) -> None:
        """(Re)start the watchdog for the job now oldest; none when nothing is held."""
        if self.watchdog is not None and self.watchdog.active():
            self.watchdog.cancel()
        self.watchdog = None
        if self.pending and not self.ended:
            timeout = self.engine.job_timeout
            self.watchdog = self.engine.reactor.callLater(timeout, self._stuck, timeout)

    def _stuck(self, timeout: float) -> None:
        self.watchdog = None
        if self.ended or self.transport is None:
            return
        self.engine._log.error(
            "{face}.worker_stuck pid={pid} seconds={seconds}",
            face=self.engine.face,
            pid=self.transport.pid,
            seconds=timeout,
        )
        self.transport.signalProcess("KILL")

    def retire(self) -> None:
        """No new jobs; exit (end of input) once the jobs it holds are answered."""
        self.retiring = True
        if not self.pending and not self.ended:
            self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self.buffer)
            if len(self.buffer) < _HEADER.size + size:
                return
            payload = bytes(self.buffer[_HEADER.size : _HEADER.size + size])
            del self.buffer[: _HEADER.size + size]
            job = self.pending.popleft()
            d, slot = job.answer, job.slot
            self.answered = True
            answer = pickle.loads(payload) if self.arena is None else self.arena.loads(payload)
            if slot is not None:  # read out: the slot may take the next job
                self.free.append(slot)
            self._watch()
            d.callback(answer)
        if self.retiring and not self.pending:
            self.transport.closeStdin()

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == 0:
            self.input_closed = True

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        self._watch()  # (cancels it)
        self.engine._ended(self, reason)  # out of the pool before anyone hears of it
        pending, self.pending = self.pending, deque()
        error = WorkerError(f"a worker process died: {reason.value}")
        for i, job in enumerate(pending):
            # the oldest job was the one it was on (perhaps what killed it); the others
            # had not started: another worker takes them, once
            if i == 0 or job.retried or self.engine._closing:
                job.answer.errback(error)
            else:
                self.engine._again(job)
        if self.arena is not None:
            self.arena.close()
            self.arena = None
        self.exited.callback(None)


class ProcessEngine:
    """``workers`` processes, each with its own store connection and processor.

    The processes are this interpreter started afresh (never a fork of a process
    running a reactor and threads), driven from the reactor thread through pipes:
    no helper threads in the gateway process competing with the reactor for the GIL.
    """

    _log = Logger()

    def __init__(
        self,
        spec: WorkerSpec,
        workers: int,
        reactor: Any,
        registry: Registry | None = None,
        *,
        face: str = "smtp",
        job_timeout: float = JOB_TIMEOUT,
        command: Sequence[str] | None = None,
    ):
        """``face`` names the service in the log events (``smtp.workers_ready``); a
        worker that spends more than ``job_timeout`` seconds on one job is killed;
        ``command`` starts a worker (default: this interpreter, :func:`main`)."""
        if workers < 1:
            raise ValueError("a process engine needs at least one worker")
        self.spec = spec
        self.workers = workers
        self.face = face
        self.reactor = reactor
        self.job_timeout = job_timeout
        self.command = list(command) if command is not None else _command()
        #: after a worker died at start, none is started again before this time (a
        #: broken install must not spawn a process per waiting job)
        self._respawn_at = 0.0
        self.registry = registry or Registry()
        self.slots = defer.DeferredSemaphore(workers * PER_WORKER)
        self._pool: list[_WorkerProcess] = []
        self._closing = False
        self._fill()

    def _fill(self) -> None:
        if self.reactor.seconds() < self._respawn_at:
            return
        while len(self._pool) < self.workers and not self._closing:
            self._pool.append(self._spawn())

    def _spawn(self) -> _WorkerProcess:
        created = Arena.create(PER_WORKER, SLOT_SIZE)
        arena, fd = created if created is not None else (None, None)
        worker = _WorkerProcess(self, arena)
        command = self.command
        env = _environment()
        fds: dict[int, int | str] = {0: "w", 1: "r", 2: 2}
        if fd is not None:
            fds[_ARENA_FD] = fd
            env[ARENA_ENV] = f"{_ARENA_FD}:{PER_WORKER}:{SLOT_SIZE}"
        try:
            self.reactor.spawnProcess(worker, command[0], command, env=env, childFDs=fds)
        finally:
            if fd is not None:
                os.close(fd)  # the worker has its own; the mapping stays
        # the secret goes down the pipe, never on a command line or in the environment
        worker.transport.writeToChild(0, _frame(self.spec))
        return worker

    def _ended(self, worker: _WorkerProcess, reason: Failure) -> None:
        if worker in self._pool:
            self._pool.remove(worker)
            if not self._closing:
                self._log.error(
                    "{face}.worker_died pid={pid} reason={reason}",
                    face=self.face,
                    pid=worker.transport.pid,
                    reason=str(reason.value),
                )
                # one that dies at once, never having answered (it cannot even start),
                # is not restarted in a loop; one killed after it worked is, at once
                quick = not worker.answered and time.monotonic() - worker.started < 1.0
                if quick:
                    self._respawn_at = self.reactor.seconds() + 1.0
                self.reactor.callLater(1.0 if quick else 0, self._fill)

    # -- the service's life ---------------------------------------------------------------
    def start(self) -> defer.Deferred[None]:
        """Log whether every worker could open the store (they are started already).
        Fires when all answered; never fails."""
        self._fill()
        pings = [self._send(worker, _ping) for worker in list(self._pool)]

        def report(results: list[tuple[bool, Any]]) -> None:
            errors = {str(value.value) for ok, value in results if not ok}
            if errors:
                for error in sorted(errors):
                    self._log.critical(
                        "{face}.workers_failed error={error}", face=self.face, error=error
                    )
            else:
                self._log.info("{face}.workers_ready workers={n}", face=self.face, n=self.workers)

        return defer.DeferredList(pings, consumeErrors=True).addCallback(report)

    def reload(self, config: Config | None = None) -> None:
        """New workers for ``config`` (the service's configuration after the reload, or
        after a refused reload was put back; None: the file as it is now); the old ones
        finish the jobs they hold, then exit."""
        self.spec = dataclasses.replace(
            self.spec, document=None if config is None else dict(config.document)
        )
        old, self._pool = self._pool, []
        for worker in old:
            worker.retire()
        self._fill()
        self.start()

    def close(self) -> defer.Deferred[None]:
        """End the workers (after the sessions drained): end of input, then SIGKILL for
        one still there after ``CLOSE_TIMEOUT`` seconds."""
        self._closing = True
        workers, self._pool = self._pool, []
        for worker in workers:
            worker.retire()

        def kill(worker: _WorkerProcess) -> None:
            if not worker.ended:
                worker.transport.signalProcess("KILL")

        timers = [self.reactor.callLater(CLOSE_TIMEOUT, kill, w) for w in workers]

        def cancel(result: object) -> None:
            for timer in timers:
                if timer.active():
                    timer.cancel()

        exits = [w.exited for w in workers if not w.ended]
        return defer.gatherResults(exits).addBoth(cancel)

    def pids(self) -> list[int]:
        """The worker processes running now (for operators and tests)."""
        return sorted(w.pid for w in self._pool if w.pid is not None)

    # -- messages -------------------------------------------------------------------------
    def transform(
        self, transform: MessageTransform, sender: str, recipients: Sequence[str], data: bytes
    ) -> defer.Deferred[TransformResult]:
        """The worker's transform of the message (``transform`` is the reactor side's,
        built from the same configuration, and not used here)."""
        return self.slots.run(self._call, _transform, sender, tuple(recipients), data)

    def open_view(
        self, owners: Sequence[str], data: bytes, warm: bool = True
    ) -> defer.Deferred[Any]:
        """The proxy's decrypted :class:`~smimeproxy.imap.views.MessageView` of a stored
        message, opened with the keys of ``owners`` only (None: it stays as stored)."""
        return self.slots.run(self._call, _open_view, tuple(owners), data, warm)

    def _call(self, function: Callable[..., _Answer], *args: Any) -> defer.Deferred[Any]:
        """``function(*args)`` in the least busy worker."""
        return self._dispatch(function, args).addCallback(self._settle)

    def _dispatch(
        self, function: Callable[..., _Answer], args: tuple[Any, ...], retried: bool = False
    ) -> defer.Deferred[_Answer]:
        """Send a job to the least busy worker; its raw answer."""
        self._fill()  # after deaths: a job waiting is reason enough to start again now
        usable = [w for w in self._pool if w.usable]
        if not usable:
            return defer.fail(WorkerError(self._why_none()))
        worker = min(usable, key=lambda w: len(w.pending))
        return worker.send(function, args, retried)

    def _why_none(self) -> str:
        if self._closing:
            return "the engine's workers are stopped"
        return "no engine worker is running: they die as they start (see the log)"

    def _send(
        self, worker: _WorkerProcess, function: Callable[..., _Answer], *args: Any
    ) -> defer.Deferred[Any]:
        return worker.send(function, args).addCallback(self._settle)

    def _again(self, job: _Job) -> None:
        """Hand a job a dead worker had not started to another worker (its caller
        still waits on ``job.answer``, which gets that worker's raw answer)."""
        self._dispatch(job.function, job.args, retried=True).chainDeferred(job.answer)

    def _settle(self, answer: _Answer) -> TransformResult | None:
        for namespace, level, text in answer.events:
            Logger(namespace=namespace).emit(
                LogLevel.levelWithName(level), "{text}", text=text, worker_pid=answer.pid
            )
        if answer.metrics:
            self.registry.add(answer.metrics)
        if answer.error is not None:
            raise answer.error
        return answer.result


_HEADER = struct.Struct(">I")


def _command() -> list[str]:
    return [sys.executable, "-c", "from smimeproxy.workers import main; main()"]


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    # the package this process runs from, first: the same code in every process
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def probe(spec: WorkerSpec, timeout: float = 30.0) -> str | None:
    """Start one worker as the faces do, blocking, and ask it whether it could open the
    store: None when it could, else the reason (for ``smimeproxy doctor``)."""
    import subprocess

    request = _frame(spec) + _frame((_ping, (), None))
    try:
        done = subprocess.run(
            _command(), input=request, capture_output=True, env=_environment(), timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"a worker process did not run: {e}"
    answer = _read(io.BytesIO(done.stdout))
    if not isinstance(answer, _Answer):
        last = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        return f"a worker process exited with status {done.returncode}: {last[0]}"
    return None if answer.error is None else str(answer.error)


def _frame(value: object) -> bytes:
    return _framed(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def _framed(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload)) + payload


# -- inside a worker process ----------------------------------------------------------------
@dataclass
class _Worker:
    processor: MessageProcessor | None
    transform: MessageTransform | None
    registry: Registry
    error: BaseException | None


_worker: _Worker | None = None
_bug_log = Logger(namespace=__name__)
_events: list[tuple[str, str, str]] = []


def _collect(event: dict[str, Any]) -> None:
    text = eventAsText(event, includeTimestamp=False, includeSystem=False)
    level = event.get("log_level", LogLevel.info)
    _events.append((str(event.get("log_namespace", "smimeproxy")), level.name, text))


def main() -> None:
    """A worker process: the spec, then jobs, from stdin; answers to stdout, in order.
    Ends at the end of its input (the gateway closed the pipe, or exited)."""
    global _worker
    # the gateway decides when workers stop; a terminal's ^C or hangup goes to the
    # whole process group and must not kill a message in the middle
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    arena = _attach_arena()
    jobs = os.fdopen(os.dup(0), "rb")
    answers = os.fdopen(os.dup(1), "wb")
    # nothing else may write into the answers: stray output goes to stderr
    os.dup2(2, 1)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    globalLogBeginner.beginLoggingTo([_collect], discardBuffer=True, redirectStandardIO=False)
    spec = _read(jobs)
    if spec is None:
        return
    registry = Registry()
    try:
        processor, transform = _build(spec, registry)
        _worker = _Worker(processor, transform, registry, None)
    except Exception as e:
        _worker = _Worker(None, None, registry, e)
    while (job := _read(jobs, arena)) is not None:
        function, args, slot = job
        answer = function(*args)
        if arena is None:
            answers.write(_frame(answer))
        else:
            region = None if slot is None else arena.output_region(slot)
            answers.write(_framed(arena.dumps(answer, region)))
        answers.flush()


def _attach_arena() -> Arena | None:
    """The shared memory the reactor's side handed over at spawn, if any."""
    found = os.environ.pop(ARENA_ENV, None)
    if not found:
        return None
    try:
        fd, slots, size = (int(x) for x in found.split(":"))
        return Arena.attach(fd, slots, size)
    except (ValueError, OSError) as e:
        # the other side writes into the arena: carrying on without it would misread
        # every job, so the worker ends, and the engine reports it and starts another
        raise SystemExit(f"smimeproxy worker: cannot map its shared memory: {e}") from None


def _read(stream: Any, arena: Arena | None = None) -> Any:
    """The next pickled value, or None at the end of input."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    payload = stream.read(size)
    if len(payload) < size:
        return None
    return pickle.loads(payload) if arena is None else arena.loads(payload)


def _build(
    spec: WorkerSpec, registry: Registry
) -> tuple[MessageProcessor, MessageTransform | None]:
    """This process's processor (and the gateway's transform when [smtp] is there)."""
    from smimeproxy.config import load_config
    from smimeproxy.keystore import open_store
    from smimeproxy.processing import MessageProcessor, token_resolver

    config = load_config(spec.config_path, document=spec.document)
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
    if config.imap is not None:
        # loaded now, at start, rather than by the first stored message to open: that
        # import (about 80 ms) would otherwise stall every worker at a user's first sync
        import smimeproxy.imap.intercept
        import smimeproxy.imap.views
        import smimeproxy.smime.opener  # noqa: F401
    if config.smtp is None:
        return processor, None
    from smimeproxy.smtp.transform import MessageTransform

    return processor, MessageTransform(processor, config.smtp)


def _answer(result: Any, error: BaseException | None) -> _Answer:
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
        from smimeproxy.errors import ConfigError

        return _answer(None, _worker.error or ConfigError("no [smtp] section", key="smtp"))
    return _run(_worker.transform.transform, sender, recipients, data)


def _open_view(owners: tuple[str, ...], data: bytes, warm: bool) -> _Answer:
    assert _worker is not None
    processor = _worker.processor
    if processor is None:
        return _answer(None, _worker.error)
    from smimeproxy.imap.intercept import Opener, open_view

    return _run(lambda: open_view(Opener.load(processor, list(owners)), data, warm))


def _run(function: Callable[..., Any], *args: Any) -> _Answer:
    """``function(*args)``'s answer. Our typed errors cross back as they are; anything
    else is a bug, logged here by type and frames only (its text may quote the message:
    :mod:`smimeproxy.bugs`) and given back as a plain error naming its type."""
    try:
        return _answer(function(*args), None)
    except SMIMEProxyError as e:
        return _answer(None, e)
    except Exception as e:
        log_bug(_bug_log, "worker.bug")
        return _answer(None, RuntimeError(f"engine bug: {type(e).__name__}"))
