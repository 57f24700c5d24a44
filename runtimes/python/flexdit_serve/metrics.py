"""Prometheus metrics of one replica (text exposition at ``GET /metrics``).

Each replica has its own registry, so a scrape of ``/metrics`` answers for the replica that
served it; on a cluster, scrape every replica (or Ray's own metrics endpoint). Images per
second is both a counter (``rate(flexdit_images_total[1m])``) and a gauge over the last
``window`` seconds for a quick look.
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

FILL_BUCKETS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, window: float = 30.0):
        self.registry = r = CollectorRegistry()
        self.queue = Gauge("flexdit_queue_depth", "images waiting for admission", registry=r)
        self.inflight = Gauge("flexdit_inflight_images", "images being denoised", registry=r)
        self.fill = Histogram("flexdit_batch_fill", "rows used / static batch of each engine call", ["stage"],
                              buckets=FILL_BUCKETS, registry=r)
        self.step = Histogram("flexdit_step_seconds", "wall time of one stage engine call", ["stage"],
                              buckets=SECONDS_BUCKETS, registry=r)
        self.images = Counter("flexdit_images", "images returned", registry=r)
        self.requests = Counter("flexdit_requests", "requests by outcome", ["outcome"], registry=r)
        self.latency = Histogram("flexdit_request_seconds", "submit to answer, per request", buckets=SECONDS_BUCKETS,
                                 registry=r)
        self.rate = Gauge("flexdit_images_per_second", "images returned per second over the last window", registry=r)
        self.window = window
        self._done = collections.deque()
        self._lock = threading.Lock()
        self.rate.set_function(self._rate)

    def engine_call(self, stage: int, rows: int, batch: int, seconds: float) -> None:
        self.fill.labels(str(stage)).observe(rows / batch)
        self.step.labels(str(stage)).observe(seconds)

    def request_done(self, outcome: str, images: int, seconds: float | None) -> None:
        self.requests.labels(outcome).inc()
        if outcome == "ok":
            self.images.inc(images)
            with self._lock:
                self._done.append((time.monotonic(), images))
            if seconds is not None:
                self.latency.observe(seconds)

    def gauges(self, queued: int, inflight: int) -> None:
        self.queue.set(queued)
        self.inflight.set(inflight)

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._done and self._done[0][0] < now - self.window:
                self._done.popleft()
            return sum(n for _, n in self._done) / self.window

    def text(self) -> bytes:
        return generate_latest(self.registry)
