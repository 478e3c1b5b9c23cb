"""The Prometheus endpoint: text format a scraper accepts, served over real HTTP."""

from __future__ import annotations

import re

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web.client import Agent, readBody
from twisted.web.server import Site

from smimeproxy.metrics import MetricsResource, Registry

LINE = re.compile(r'^[a-z_][a-z0-9_]*(\{([a-z_]+="([^"\\]|\\.)*",?)*\})? -?[0-9.e+Inf-]+$')


def test_render_is_valid_exposition():
    r = Registry()
    c = r.counter("smimeproxy_messages_total", "Messages", ("direction", "outcome"))
    c.inc(direction="inbound", outcome="pass")
    c.inc(2, direction="outbound", outcome='we"ird\n')
    g = r.gauge("smimeproxy_imap_sessions", "Open sessions")
    g.inc()
    g.inc()
    g.dec()
    h = r.histogram("smimeproxy_open_seconds", "Open latency", buckets=(0.1, 1.0))
    h.observe(0.05)
    h.observe(0.5)
    text = r.render().decode()
    for line in text.splitlines():
        assert line.startswith("# ") or LINE.match(line), line
    assert 'smimeproxy_messages_total{direction="inbound",outcome="pass"} 1' in text
    assert 'outcome="we\\"ird\\n"' in text
    assert "smimeproxy_imap_sessions 1" in text
    assert 'smimeproxy_open_seconds_bucket{le="0.1"} 1' in text
    assert 'smimeproxy_open_seconds_bucket{le="+Inf"} 2' in text
    assert "smimeproxy_open_seconds_count 2" in text


def test_wrong_labels_and_negative_counter_rejected():
    r = Registry()
    c = r.counter("x_total", "x", ("a",))
    with pytest.raises(ValueError):
        c.inc(b="1")
    with pytest.raises(ValueError):
        c.inc(-1, a="1")
    with pytest.raises(ValueError):
        r.gauge("x_total", "x")


@pytest_twisted.inlineCallbacks
def test_served_over_http():
    r = Registry()
    r.counter("smimeproxy_up_total", "up").inc()
    port = reactor.listenTCP(0, Site(MetricsResource(r)), interface="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/metrics".encode()
        response = yield Agent(reactor).request(b"GET", url)
        body = yield readBody(response)
        assert response.code == 200
        assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
        assert b"smimeproxy_up_total 1" in body
        missing = yield Agent(reactor).request(b"GET", url.replace(b"/metrics", b"/other"))
        assert missing.code == 404
    finally:
        yield port.stopListening()


def test_take_and_add_carry_counts_from_one_registry_to_another():
    """What a worker process counted is added to its parent's registry, once."""
    worker, parent = Registry(), Registry()
    worker.counter("jobs_total", "Jobs", ("result",)).inc(result="ok")
    worker.counter("jobs_total", "Jobs", ("result",)).inc(2, result="failed")
    worker.histogram("job_seconds", "Time", buckets=(0.1, 1.0)).observe(0.5)
    worker.gauge("busy", "Busy now").set(3)
    parent.counter("jobs_total", "Jobs", ("result",)).inc(result="ok")
    parent.add(worker.take())
    assert parent.counter("jobs_total", "Jobs", ("result",)).value(result="ok") == 2
    assert parent.counter("jobs_total", "Jobs", ("result",)).value(result="failed") == 2
    text = parent.render().decode()
    assert 'job_seconds_bucket{le="0.1"} 0' in text and 'job_seconds_bucket{le="1"} 1' in text
    assert "job_seconds_count 1" in text and "busy" not in text  # gauges are not taken
    assert worker.take() == []  # taken once: nothing counted twice
    parent.add(worker.take())
    assert parent.counter("jobs_total", "Jobs", ("result",)).value(result="ok") == 2
