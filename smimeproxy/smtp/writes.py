"""Send a small reply at once instead of a reactor round trip later.

Why: SMTP is lock-step; every reply or command the gateway writes is a few dozen bytes
the peer is waiting for. Twisted's ``transport.write`` only buffers: it registers the
socket for writing (an ``epoll_ctl``), and on the next reactor turn sends it and
unregisters it (another ``epoll_ctl``). Per 4 KB message the gateway writes nine times,
so that is eighteen system calls and nine reactor dispatches spent on pure plumbing, a
quarter of the reactor's time under load (measured with ``bench/smtp.py``).

:func:`write_now` sends directly on the socket when that is exactly what the reactor
would do next: a plain TCP connection of the reactor (no TLS layer started), connected,
not closing, nothing already buffered (so the order of bytes is kept) and no producer.
Whatever the kernel does not take at once, and any error, goes to ``transport.write``
as before, so the reactor reports a broken connection the usual way. Any other
transport (TLS after STARTTLS, test transports) simply gets ``transport.write``.

Not guaranteed: that the bytes left the host when this returns (same as ``write``).
"""

from __future__ import annotations

from twisted.internet import tcp


def write_now(transport: object, data: bytes) -> None:
    """Write ``data`` to ``transport``, sending at once when that is safe."""
    if _idle_plain_tcp(transport):
        try:
            sent = transport.socket.send(data)  # type: ignore[attr-defined]
        except OSError:
            sent = 0  # EAGAIN, or an error the reactor will report on its next turn
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)  # type: ignore[attr-defined]


def _idle_plain_tcp(t: object) -> bool:
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
        and getattr(t, "dataBuffer", b"x") == b""
        and getattr(t, "_tempDataBuffer", [b"x"]) == []
        and getattr(t, "producer", object()) is None
        and getattr(t, "socket", None) is not None
    )


#: the reactor's own TCP transports; subclasses may change writing, so exact types
_PLAIN = (tcp.Server, tcp.Client)

__all__ = ["write_now"]
