"""Processes as ``/proc`` shows them, for tests and benchmarks that start real servers
(a service's engine worker processes are its children)."""

from __future__ import annotations

from pathlib import Path


def status(pid: int) -> dict[str, str]:
    """The fields of ``/proc/PID/status`` (``{}`` once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict((k, v.strip()) for k, _, v in (line.partition(":") for line in text.splitlines()))


def alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    state = status(pid).get("State", "")
    return bool(state) and not state.startswith("Z")


def children(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        fields = status(int(entry.name))
        if fields.get("PPid") == str(pid) and not fields.get("State", "Z").startswith("Z"):
            found.append(int(entry.name))
    return sorted(found)


def rss_kib(pid: int, *, with_children: bool = True) -> int:
    """Resident memory of ``pid`` (and of its children) in KiB."""
    pids = [pid, *children(pid)] if with_children else [pid]
    return sum(int(status(p).get("VmRSS", "0 kB").split()[0]) for p in pids)
