"""Socket-level latency helpers for the faces' protocols: send now, flush now, no Nagle.

Why: SMTP and IMAP are lock-step (the peer waits for each reply or response), and
Twisted's ``transport.write`` only buffers: it registers the socket for writing (an
``epoll_ctl``), and the bytes leave on a later reactor turn, after which the socket is
unregistered again (another ``epoll_ctl``). Per 4 KB message the SMTP gateway writes
nine times (a quarter of its reactor time under load went to this plumbing,
bench/smtp.py); per relayed IMAP ``BODY.PEEK[]`` it was about five ``epoll_ctl`` calls
and a reactor pass per direction.

:func:`write_now` sends on the socket at once when that is exactly what the reactor
would do next: the reactor's own plain TCP transport (no TLS started on it), connected,
not closing, nothing buffered (so byte order is kept) and no producer. What the kernel
does not take, and any error, goes to ``transport.write`` as before, so the reactor
reports a broken connection the usual way. Other transports (TLS, test transports) get
``transport.write``; :func:`flush` then pushes a TLS layer's buffered bytes out.

Not guaranteed: that the bytes left the host when this returns (same as ``write``).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

#: the reactor's own TCP transports; subclasses may change writing, so exact types
_PLAIN = (tcp.Server, tcp.Client)


def write_now(transport: Any, data: bytes) -> None:
    """Write ``data`` to ``transport``, sending at once when that is safe."""
    if data and _idle_plain_tcp(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # EAGAIN, or an error the reactor reports on its next turn
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def _idle_plain_tcp(t: Any) -> bool:
    """True only for the reactor's own plain TCP transport with nothing pending.

    The attributes read here are Twisted internals: a version without one of them
    simply gets ``transport.write`` (``getattr`` defaults mean "not safe")."""
    if type(t) not in _PLAIN:
        return False
    return (
        getattr(t, "TLS", True) is False
        and bool(getattr(t, "connected", 0))
        and not getattr(t, "disconnecting", True)
        and not getattr(t, "_writeDisconnected", True)
        and not getattr(t, "_tempDataLen", 1)
        and getattr(t, "dataBuffer", b"x") == b""
        and getattr(t, "producer", object()) is None
        and getattr(t, "socket", None) is not None
    )


def flush(transport: Any) -> None:
    """Send what this read event made us write now, not one reactor turn later.

    For what :func:`write_now` could not send at once (TLS, a partial send).  A TCP
    transport with buffered data and no pending close gets its ``doWrite``
    (IWriteDescriptor) called here; whatever the socket does not take stays buffered
    for the reactor as usual.  Under TLS the TCP transport below it is flushed.
    Anything else: nothing happens.
    """
    while transport is not None and not hasattr(transport, "doWrite"):
        transport = getattr(transport, "transport", None)
    if transport is None or not getattr(transport, "connected", False):
        return
    if transport.disconnecting or getattr(transport, "_writeDisconnecting", True):
        return  # a finished write would have to close the connection: the reactor's job
    if not getattr(transport, "_tempDataLen", 0):
        return
    result = transport.doWrite()
    if result is not None:  # an error: let the reactor find it on its next write attempt
        transport.startWriting()


#: octets read from the server per read: one whole message of up to this size is one
#: read and one write to the client, instead of a reactor pass per 64 KiB (Twisted's
#: default ``bufferSize``)
UPSTREAM_READ = 1 << 18


def read_size(transport: Any, size: int) -> None:
    """Read up to ``size`` octets per read on the socket below ``transport`` (also under
    TLS).  ``bufferSize`` is also the threshold at which a registered producer would be
    paused; the session registers none."""
    while transport is not None and not hasattr(transport, "doRead"):
        transport = getattr(transport, "transport", None)
    if transport is not None and isinstance(getattr(transport, "bufferSize", None), int):
        transport.bufferSize = size


def no_delay(transport: Any) -> None:
    """Small command/response exchanges must not wait for Nagle's algorithm."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass
