"""Where the gateway's message work runs: the reactor's thread pool, or worker processes.

:class:`ThreadEngine` (``[smtp] workers = 0``) runs :meth:`MessageTransform.transform`
in the gateway's thread pool, at most :data:`ENGINE_CONCURRENCY` at once;
:class:`~smimeproxy.workers.ProcessEngine` (``workers = N``) in N processes of their
own (the measurements and the fault handling are written down in
:mod:`smimeproxy.workers`). The server sees only the :class:`Engine` interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from smimeproxy.config import Config
from smimeproxy.smtp.transform import MessageTransform, TransformResult
from smimeproxy.workers import ProcessEngine, WorkerSpec

#: how many messages the engine works on at once in the gateway's own thread pool,
#: whatever the pool's size. More concurrent jobs do not add CPU, they make the jobs
#: and the reactor hand the GIL back and forth at every system call (measured with
#: bench/smtp.py: 4 jobs ~10% slower than 1-2, the reactor's socket calls several times
#: slower). Two, not one, so that one large message does not hold up every other
#: session. Waiting messages wait in the reactor, costing nothing.
ENGINE_CONCURRENCY = 2


class Engine(Protocol):
    """Runs :meth:`MessageTransform.transform` somewhere that is not the reactor."""

    def transform(
        self, transform: MessageTransform, sender: str, recipients: Sequence[str], data: bytes
    ) -> defer.Deferred[TransformResult]: ...

    def start(self) -> defer.Deferred[None]: ...

    def reload(self, config: Config | None = None) -> None: ...

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

    def reload(self, config: Config | None = None) -> None:
        """Nothing to do: the caller swaps the transform object itself."""

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)


__all__ = ["ENGINE_CONCURRENCY", "Engine", "ProcessEngine", "ThreadEngine", "WorkerSpec"]
