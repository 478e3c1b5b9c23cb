"""The one service that ties a thread pool's life to the service tree.

Shared by the assembly (:mod:`smimeproxy.service`) and a face that runs alone with its
own pool (:mod:`smimeproxy.directory.service`); a face must not import the assembly,
so the class lives here. Blocking work (CMS, database) runs on the pool, never on the
reactor. Not guaranteed: ``stopService`` joins the pool's threads, so a job that never
returns holds the shutdown.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.python.threadpool import ThreadPool

__all__ = ["ThreadPoolService"]


class ThreadPoolService(Service):
    """Starts the pool with the application and joins it on shutdown."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()
