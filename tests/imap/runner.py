"""Run the IMAP proxy of a config file in its own process (integration tests, bench).

``python -m tests.imap.runner CONFIG`` starts the ``[imap]`` face with a
MessageProcessor over the configured store and prints ``READY`` once listening.  With
``SMIMEPROXY_IMAP_METRICS_PORT`` set it serves ``/metrics`` on that loopback port.  On
SIGTERM the service is stopped (sessions get ``* BYE``) before the process exits.  On
SIGHUP the config file is read again and handed to the service's ``reload`` on the
reactor thread, as ``twistd smimeproxy`` does; ``RELOADED`` (or ``RELOAD FAILED``) is
printed when done.
"""

from __future__ import annotations

import os
import signal
import sys

from twisted.internet import reactor
from twisted.python import log

from smimeproxy.config import load_config
from smimeproxy.imap import make_service
from smimeproxy.metrics import MetricsResource, Registry
from smimeproxy.processing import MessageProcessor, open_configured_store


def main(path: str) -> None:
    config = load_config(path)
    store = open_configured_store(config)
    processor = MessageProcessor(store, config.smime)
    registry = Registry()
    service = make_service(config, processor, reactor=reactor, registry=registry)
    metrics_port = os.environ.get("SMIMEPROXY_IMAP_METRICS_PORT")
    if metrics_port:
        from twisted.web.server import Site

        reactor.listenTCP(int(metrics_port), Site(MetricsResource(registry)), interface="127.0.0.1")
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    if "-v" in sys.argv:
        log.startLogging(sys.stderr)
    reactor.getThreadPool().adjustPoolsize(4, 8)

    def reload() -> None:
        try:
            service.reload(load_config(path))
        except Exception as exc:  # the test reads this line
            print(f"RELOAD FAILED {type(exc).__name__}: {exc}", flush=True)
            return
        print("RELOADED", flush=True)

    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(reload))
    service.startService()
    reactor.callWhenRunning(lambda: print("READY", flush=True))
    profile_to = os.environ.get("SMIMEPROXY_IMAP_PROFILE")
    if profile_to:  # bench: where does the proxy spend its time
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        reactor.run()
        profiler.disable()
        profiler.dump_stats(profile_to)
        return
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1])
