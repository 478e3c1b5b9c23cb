"""Loopback ports for tests and benchmarks that start real servers.

One copy instead of one per test module. ``free_port`` is racy by nature (the port
is free when asked, another process may take it before the server binds); a test
that needs a port free for UDP as well uses :func:`tests.integration.bind.free_port`.
"""

from __future__ import annotations

import socket
import time


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20) -> None:
    """Return once something accepts connections on 127.0.0.1:``port``;
    RuntimeError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")
