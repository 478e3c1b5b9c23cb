"""Shared memory for the large bytes of engine jobs and answers (a worker's "arena").

Why: an engine worker process (:mod:`smimeproxy.workers`) gets each message and sends
back what it made over pipes. Through a 64 KiB pipe, a 70 KB ciphertext is pickled,
buffered and joined by Twisted, written in pieces, read back 8 KiB at a time and
unpickled: py-spy showed about 45% of the IMAP proxy's reactor time in a cold sync of a
mailbox with S/MIME messages on those pipes, and the worker spent as much again. With an
arena, the pipe carries only a small pickle, and each large ``bytes`` object in it is
copied once into a memory region both processes map (a ``memfd``, handed to the worker
as a file descriptor at spawn, never a file in the file system) and once out again.

Layout: ``slots`` job slots, each with an input region (written by the reactor's side,
read by the worker) and an output region (written by the worker for that job's answer,
read by the reactor's side), ``slot_size`` octets each. A slot belongs to one job from
the moment it is sent until its answer has been read, so the two processes never write
the same region at once: the ordering is the pipe's.

Pure and blocking (no Twisted): :meth:`Arena.dumps` / :meth:`Arena.loads` are pickle
with ``persistent_id``; a ``bytes`` object of at least :data:`SHARED_MIN` octets that
still fits in the region goes through shared memory, everything else in-band, so a
message larger than a slot simply takes the pipe as before. Not guaranteed: anything on
a system without ``os.memfd_create`` (then :meth:`Arena.create` gives None and the
pipes carry everything).
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
from typing import Any

#: ``bytes`` objects smaller than this are pickled in-band: the copy into shared
#: memory and the extra lookups cost more than the pipe for small values
SHARED_MIN = 16 << 10


class Arena:
    """``slots`` pairs of regions of ``slot_size`` octets in one shared mapping."""

    def __init__(self, memory: mmap.mmap, slots: int, slot_size: int):
        if len(memory) < 2 * slots * slot_size:
            raise ValueError("the shared mapping is smaller than its slots")
        self.memory = memory
        self.slots = slots
        self.slot_size = slot_size

    @classmethod
    def create(cls, slots: int, slot_size: int) -> tuple[Arena, int] | None:
        """A new arena and its file descriptor (for the worker to map; the caller
        closes it once handed over), or None where shared memory is not available."""
        create = getattr(os, "memfd_create", None)
        if create is None:
            return None
        try:
            fd = create("smimeproxy-arena", getattr(os, "MFD_CLOEXEC", 0))
        except OSError:
            return None
        try:
            os.ftruncate(fd, 2 * slots * slot_size)
            memory = mmap.mmap(fd, 2 * slots * slot_size)
        except (OSError, ValueError):
            os.close(fd)
            return None
        return cls(memory, slots, slot_size), fd

    @classmethod
    def attach(cls, fd: int, slots: int, slot_size: int) -> Arena:
        """The worker's side: map the arena the reactor's side created."""
        memory = mmap.mmap(fd, 2 * slots * slot_size)
        os.close(fd)
        return cls(memory, slots, slot_size)

    def input_region(self, slot: int) -> int:
        return slot

    def output_region(self, slot: int) -> int:
        return self.slots + slot

    def dumps(self, value: object, region: int | None) -> bytes:
        """``value`` pickled, its large ``bytes`` written into ``region`` (None: none)."""
        out = io.BytesIO()
        if region is None:
            pickle.Pickler(out, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
        else:
            if not 0 <= region < 2 * self.slots:
                raise ValueError(f"no region {region}")
            start = region * self.slot_size
            _Writer(out, self.memory, start, start + self.slot_size).dump(value)
        return out.getvalue()

    def loads(self, payload: bytes) -> Any:
        """The value :meth:`dumps` pickled (its shared bytes copied out of the arena)."""
        return _Reader(io.BytesIO(payload), self.memory).load()

    def close(self) -> None:
        self.memory.close()


class _Writer(pickle.Pickler):
    def __init__(self, out: io.BytesIO, memory: mmap.mmap, start: int, end: int):
        super().__init__(out, protocol=pickle.HIGHEST_PROTOCOL)
        self.memory = memory
        self.position = start
        self.end = end
        self.placed: dict[int, tuple[int, int]] = {}  # id(bytes) -> (offset, length)

    def persistent_id(self, obj: Any) -> tuple[int, int] | None:
        if type(obj) is not bytes or len(obj) < SHARED_MIN:
            return None
        placed = self.placed.get(id(obj))
        if placed is not None:  # the same object again: one copy, one reference
            return placed
        if self.position + len(obj) > self.end:
            return None  # does not fit: in-band
        start = self.position
        self.memory[start : start + len(obj)] = obj
        self.position += len(obj)
        self.placed[id(obj)] = placed = (start, len(obj))
        return placed


class _Reader(pickle.Unpickler):
    def __init__(self, payload: io.BytesIO, memory: mmap.mmap):
        super().__init__(payload)
        self.memory = memory
        self.loaded: dict[tuple[int, int], bytes] = {}

    def persistent_load(self, pid: Any) -> bytes:
        found = self.loaded.get(pid)
        if found is None:
            start, length = pid
            if not (0 <= start and 0 <= length and start + length <= len(self.memory)):
                raise pickle.UnpicklingError("a shared object outside the arena")
            found = self.loaded[pid] = self.memory[start : start + length]
        return found
