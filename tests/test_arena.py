"""The shared memory between the reactor's side and an engine worker
(:mod:`smimeproxy.arena`): large bytes go through it, everything else in-band, and what
is read back is what was written."""

from __future__ import annotations

import pickle

import pytest

from smimeproxy.arena import SHARED_MIN, Arena


@pytest.fixture
def arena():
    created = Arena.create(slots=2, slot_size=256 << 10)
    if created is None:
        pytest.skip("no memfd_create on this system: the pipes carry everything")
    a, fd = created
    # the worker's side maps the same memory through the descriptor
    worker = Arena.attach(fd, 2, 256 << 10)
    yield a, worker
    a.close()
    worker.close()


def test_large_bytes_cross_through_shared_memory(arena):
    reactor_side, worker_side = arena
    body = bytes(range(256)) * 400  # 100 KiB
    value = ("open", (["alice@acme.test"], body, True))
    payload = reactor_side.dumps(value, reactor_side.input_region(1))
    assert len(payload) < 1024  # the pipe carries a reference, not the message
    assert worker_side.loads(payload) == value


def test_one_object_referenced_twice_is_copied_once_and_stays_one(arena):
    reactor_side, worker_side = arena
    data = b"x" * (64 << 10)
    payload = worker_side.dumps({"data": data, "tree": [data, data]}, 3)
    assert len(payload) < 1024
    back = reactor_side.loads(payload)
    assert back["data"] == data and back["tree"][0] is back["data"] is back["tree"][1]


def test_small_values_and_values_that_do_not_fit_go_in_band(arena):
    reactor_side, worker_side = arena
    small = b"s" * (SHARED_MIN - 1)
    too_big = b"b" * (300 << 10)  # larger than a region
    fits = b"f" * (200 << 10)
    payload = reactor_side.dumps([small, fits, too_big], 0)
    assert len(small) + len(too_big) < len(payload) < len(small) + len(too_big) + 1024
    assert worker_side.loads(payload) == [small, fits, too_big]
    # without a region, everything is in-band and a plain pickle
    assert pickle.loads(reactor_side.dumps([fits], None)) == [fits]


def test_regions_do_not_overlap(arena):
    """Each job slot's input and output region are separate: answers written for one
    job never overwrite another job's input."""
    reactor_side, worker_side = arena
    payloads = {
        region: reactor_side.dumps(bytes([region]) * (200 << 10), region) for region in range(4)
    }
    for region, payload in payloads.items():
        assert worker_side.loads(payload) == bytes([region]) * (200 << 10)


def test_a_reference_outside_the_arena_is_refused(arena):
    reactor_side, _ = arena

    class Forged(pickle.Pickler):
        def persistent_id(self, obj):
            return (1 << 40, 10) if obj == b"forged" else None

    import io

    out = io.BytesIO()
    Forged(out).dump([b"forged"])
    with pytest.raises(pickle.UnpicklingError):
        reactor_side.loads(out.getvalue())


def test_region_numbers_are_checked(arena):
    reactor_side, _ = arena
    with pytest.raises(ValueError):
        reactor_side.dumps(b"x" * SHARED_MIN, 4)
