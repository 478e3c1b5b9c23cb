"""Prometheus metrics in the text exposition format, without a client library.

A :class:`Registry` holds counters, gauges and histograms with labels; every face
takes the registry as a constructor argument (default: a private one, so tests never
share state) and the metrics listener serves ``/metrics`` from it. Values are updated
on the reactor thread or from pool threads, so updates take a lock.

Not guaranteed: no exemplars, no summaries, no OpenMetrics format; Prometheus' text
format 0.0.4 only (what every scraper reads).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

#: latency buckets in seconds (mail work: milliseconds to a minute)
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value):
        return str(int(value))
    return repr(value)


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Sequence[str], lock: threading.Lock):
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)
        self._lock = lock

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, not {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def lines(self) -> Iterable[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def lines(self) -> Iterable[str]:
        for key, value in sorted(self._values.items()):
            yield f"{self.name}{_labels(self.label_names, key)} {_number(value)}"


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) - amount

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, *args: object, buckets: Sequence[float] = DEFAULT_BUCKETS, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.buckets = tuple(sorted(buckets))
        self._data: dict[tuple[str, ...], tuple[list[int], float, int]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts, total, n = self._data.get(key, ([0] * len(self.buckets), 0.0, 0))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
            self._data[key] = (counts, total + value, n + 1)

    def count(self, **labels: str) -> int:
        return self._data.get(self._key(labels), ([], 0.0, 0))[2]

    def lines(self) -> Iterable[str]:
        for key, (counts, total, n) in sorted(self._data.items()):
            for bound, count in zip(self.buckets, counts, strict=True):
                le = f'le="{_number(bound)}"'
                yield f"{self.name}_bucket{_labels(self.label_names, key, le)} {count}"
            inf = _labels(self.label_names, key, 'le="+Inf"')
            yield f"{self.name}_bucket{inf} {n}"
            yield f"{self.name}_sum{_labels(self.label_names, key)} {_number(total)}"
            yield f"{self.name}_count{_labels(self.label_names, key)} {n}"


class Registry:
    """Named metrics of one process; :meth:`render` gives the text exposition."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[str, _Metric] = {}

    def _get(
        self, cls: type[_Metric], name: str, help_text: str, labels: Sequence[str], **kw: object
    ):  # type: ignore[no-untyped-def]
        existing = self._metrics.get(name)
        if existing is not None:
            if type(existing) is not cls or existing.label_names != tuple(labels):
                raise ValueError(f"metric {name} registered twice with different shapes")
            return existing
        metric = cls(name, help_text, labels, self._lock, **kw)  # type: ignore[call-arg]
        self._metrics[name] = metric
        return metric

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        return self._get(Counter, name, help_text, labels)  # type: ignore[no-any-return]

    def gauge(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Gauge:
        return self._get(Gauge, name, help_text, labels)  # type: ignore[no-any-return]

    def histogram(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        return self._get(Histogram, name, help_text, labels, buckets=buckets)  # type: ignore[no-any-return]

    def take(self) -> list[tuple[Any, ...]]:
        """Every metric's values since the last take, and reset them to zero: what a
        worker process sends back so that its parent's :meth:`add` counts them too."""
        taken: list[tuple[Any, ...]] = []
        with self._lock:
            for metric in self._metrics.values():
                if isinstance(metric, Histogram):
                    if metric._data:
                        shape = (metric.help, metric.label_names, metric.buckets)
                        taken.append(("histogram", metric.name, shape, metric._data))
                        metric._data = {}
                elif isinstance(metric, Counter) and not isinstance(metric, Gauge):
                    if metric._values:
                        shape = (metric.help, metric.label_names)
                        taken.append(("counter", metric.name, shape, metric._values))
                        metric._values = {}
        return taken

    def add(self, taken: list[tuple[Any, ...]]) -> None:
        """Count what another registry's :meth:`take` returned (gauges are not taken:
        a worker's gauge says nothing about this process)."""
        for kind, name, shape, values in taken:
            if kind == "counter":
                counter = self.counter(name, shape[0], shape[1])
                with self._lock:
                    for key, amount in values.items():
                        counter._values[key] = counter._values.get(key, 0.0) + amount
            elif kind == "histogram":
                histogram = self.histogram(name, shape[0], shape[1], buckets=shape[2])
                if histogram.buckets != tuple(shape[2]):
                    raise ValueError(f"metric {name} has other buckets here")
                with self._lock:
                    for key, (counts, total, n) in values.items():
                        mine, my_total, my_n = histogram._data.get(
                            key, ([0] * len(histogram.buckets), 0.0, 0)
                        )
                        merged = [a + b for a, b in zip(mine, counts, strict=True)]
                        histogram._data[key] = (merged, my_total + total, my_n + n)

    def render(self) -> bytes:
        with self._lock:
            out: list[str] = []
            for name in sorted(self._metrics):
                metric = self._metrics[name]
                out.extend(metric.header())
                out.extend(metric.lines())
        return ("\n".join(out) + "\n").encode("utf-8")


class MetricsResource(Resource):
    """``/metrics`` for Prometheus; everything else is 404."""

    isLeaf = False

    def __init__(self, registry: Registry):
        super().__init__()
        self.putChild(b"metrics", _Exposition(registry))


class _Exposition(Resource):
    isLeaf = True

    def __init__(self, registry: Registry):
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE)
        return self.registry.render()
