"""Stage-aware continuous batching: many requests, one set of stage engines.

Every in-flight image keeps its own sampler state (a ``flexdit_runtime.request.Request`` of one
image: its class, seed, index, noise generator, x and step). Between engine calls the scheduler
admits waiting requests, then picks one stage and packs into one call the rows of the images
whose next timestep falls in that stage, up to the stage's static batch. An image's result does
not depend on what shared its calls (noise is drawn per image; rows are independent in the
graph), so every image equals what ``flexdit-run`` draws for the same prompt, seed and options.

Policy (which stage runs next):
  1. Starvation bound first: once an image has waited ``max_wait_calls`` engine calls since its
     last step, the stage of the longest-waiting image runs next. Starving images in other
     stages are served oldest first, so no image waits more than ``max_wait_calls + stages - 1``
     calls between two of its steps.
  2. Otherwise the stage with the most rows waiting (the fullest call), ties to the stage
     holding the longest-waiting image.
  3. Within the chosen stage, images are packed longest-waiting first, until the next one
     would not fit the static batch.
Admission: waiting requests enter in arrival order while the images in flight stay within
``max_inflight``. When a call would run less than half full while requests are arriving (one
came within ``fill_wait_s``, default 20 ms) and there is room, the engine waits that long for
them, so that arrivals moments apart start as one cohort (a lone request never waits). The
waiting queue holds at most ``max_queue`` images, beyond which ``submit`` refuses at once (``QueueFull``: HTTP 429) instead of growing. Deadlines are checked between
calls; a request past its deadline fails with ``TimedOut`` wherever it is.

``policy="none"`` admits one request at a time and runs it to the end (the unbatched baseline);
``run_whole`` is the static baseline (a fixed group taken through whole trajectories together).
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from flexdit_bundle.manifest import BundleError
from flexdit_runtime.prompts import PromptError
from flexdit_runtime.request import Request, Result
from flexdit_runtime.sampling_params import SamplingParams

POLICIES = ("stage", "none")


class ServeError(Exception):
    """A request that did not produce images; ``status`` is the HTTP status it answers with."""

    status = 500


class BadRequest(ServeError):
    status = 400


class SamplingFailed(ServeError):
    status = 422


class QueueFull(ServeError):
    status = 429


class ShuttingDown(ServeError):
    status = 503


class TimedOut(ServeError):
    status = 504


class Cancelled(ServeError):
    status = 499  # the client went away; nobody reads the answer


@dataclass
class Ticket:
    """One client request: several images, answered together."""

    id: str
    images: list[Request]
    deadline: float
    on_done: Callable[["Ticket"], None] | None = None
    submitted: float = field(default_factory=time.monotonic)
    result: Result | None = None
    error: ServeError | None = None
    finished: float | None = None
    _event: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def n(self) -> int:
        return len(self.images)

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)


@dataclass
class _Image:
    """Scheduler bookkeeping of one in-flight image."""

    ticket: Ticket
    request: Request
    rows: int
    last_call: int  # the engine call count when it last stepped (or was admitted)
    order: int  # admission order, for ties


def make_ticket(model, ticket_id: str, prompts, params: SamplingParams, seed: int, timeout_s: float,
                on_done=None) -> Ticket:
    """A ticket of one ``Request`` per image (image i: ``default_rng([seed, i])``, as flexdit-run).
    Bad prompts or options raise ``BadRequest`` with the runtime's one-line message."""
    try:
        ids = model.class_ids(prompts)
        images = [model.start([cid], params, seed=seed, indices=[i]) for i, cid in enumerate(ids)]
    except (BundleError, PromptError) as e:
        raise BadRequest(str(e)) from None
    return Ticket(ticket_id, images, time.monotonic() + timeout_s, on_done)


class Scheduler:
    """Thread-safe: ``submit``/``cancel`` from any thread; ``run_once`` (or ``serve_forever``
    in one background thread) does the engine work."""

    def __init__(self, model, *, policy: str = "stage", max_inflight: int | None = None, max_queue: int | None = None,
                 max_wait_calls: int | None = None, fill_wait_s: float = 0.02, metrics=None,
                 clock: Callable[[], float] = time.monotonic):
        if policy not in POLICIES:
            raise ValueError(f"unknown batching policy {policy!r} (choose from {', '.join(POLICIES)})")
        self.model, self.policy, self.metrics, self.clock = model, policy, metrics, clock
        batches = model.runner.batches
        per_call = max(batches)  # rows; images: half of it under guidance
        self.max_inflight = max_inflight or per_call
        self.max_queue = max_queue if max_queue is not None else 4 * self.max_inflight
        self.max_wait_calls = max_wait_calls or 2 * len(batches)
        self._lock = threading.Condition()
        self._waiting: list[Ticket] = []  # not yet admitted, arrival order
        self._inflight: list[_Image] = []
        self._tickets: dict[str, Ticket] = {}
        self._calls = 0
        self._order = itertools.count()
        self._draining = False
        self._stopped = threading.Event()
        self.fill_wait_s = fill_wait_s
        self._last_submit = float("-inf")

    # ---- called by request handlers ----------------------------------------------------------

    def submit(self, ticket: Ticket) -> Ticket:
        with self._lock:
            if self._draining:
                raise ShuttingDown("the server is shutting down; retry on another replica")
            if ticket.n > self.max_inflight:
                raise BadRequest(f"{ticket.n} images in one request; this server takes at most {self.max_inflight}")
            queued = self._queued()
            if queued + ticket.n > self.max_queue:
                self._count("rejected")
                raise QueueFull(f"queue full ({queued} images waiting, limit {self.max_queue}); retry later")
            if ticket.id in self._tickets:
                raise BadRequest(f"request id {ticket.id!r} is already in flight")
            self._waiting.append(ticket)
            self._tickets[ticket.id] = ticket
            self._last_submit = self.clock()
            self._gauges()
            self._lock.notify_all()
        return ticket

    def cancel(self, ticket_id: str) -> bool:
        """Drop a request wherever it is (its images leave the next call). -> whether it was live."""
        with self._lock:
            t = self._tickets.get(ticket_id)
            if t is None:
                return False
            self._end(t, error=Cancelled("cancelled by the client"))
            return True

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return self._queued()

    @property
    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    @property
    def draining(self) -> bool:
        return self._draining

    # ---- the engine loop ---------------------------------------------------------------------

    def run_once(self) -> bool:
        """Expire, admit, then one engine call. -> False when there was nothing to run."""
        with self._lock:
            self._expire()
            self._admit()
            chosen = self._choose()
            if not chosen:
                return False
            if self._worth_waiting(chosen):
                self._lock.wait(self.fill_wait_s)  # a submit wakes it early
                self._expire()
                self._admit()
                chosen = self._choose()
                if not chosen:
                    return False
        sid = self.model.runner.stage_for(chosen[0].request.timestep)
        rows = sum(im.rows for im in chosen)
        start = time.perf_counter()
        try:
            self.model.step([im.request for im in chosen])
        except Exception as e:  # an engine failure fails the requests in this call, not the server
            with self._lock:
                for im in chosen:
                    if self._tickets.get(im.ticket.id) is im.ticket:  # not ended meanwhile (nor its id reused)
                        self._end(im.ticket, error=ServeError(f"engine call failed: {str(e).splitlines()[0][:300]}"))
            return True
        seconds = time.perf_counter() - start
        if self.metrics:
            self.metrics.engine_call(sid, rows, self.model.runner.batches[sid], seconds)
        finished = []
        with self._lock:
            self._calls += 1
            for im in chosen:
                im.last_call = self._calls
            done = [im for im in chosen if im.request.done and im in self._inflight]
            for im in done:
                self._inflight.remove(im)
            live = {id(im.ticket) for im in self._inflight}
            for im in done:  # a ticket is finished once none of its images is left in flight
                t = im.ticket
                if id(t) not in live and t.id in self._tickets and t not in finished:
                    finished.append(t)
            self._gauges()
        for t in finished:  # decode outside the lock (the decoder may take a while)
            self._complete(t)
        return True

    def serve_forever(self, idle_wait: float = 0.05) -> None:
        while not self._stopped.is_set():
            if not self.run_once():
                with self._lock:
                    if self._draining and not self._tickets:
                        break
                    self._lock.wait(idle_wait)
        self._stopped.set()

    def close(self, drain_s: float = 0.0) -> None:
        """Stop admitting; let in-flight and waiting requests finish for up to ``drain_s``
        seconds (the loop must be running), then fail every one left with ``ShuttingDown``."""
        with self._lock:
            self._draining = True
            self._lock.notify_all()
        end = time.monotonic() + drain_s
        while time.monotonic() < end:
            with self._lock:
                if not self._tickets:
                    break
            time.sleep(0.02)
        with self._lock:
            for t in list(self._tickets.values()):
                self._end(t, error=ShuttingDown("the server shut down before this request finished"))
        self._stopped.set()

    # ---- policy --------------------------------------------------------------------------------

    def _worth_waiting(self, chosen: list[_Image]) -> bool:
        """Requests are arriving (one came within ``fill_wait_s``), there is room to admit them and
        the call would run less than half full: wait up to ``fill_wait_s`` for them, so that
        arrivals that come moments apart start as one cohort instead of a string of near-empty
        calls (Triton's queue delay; with no arrivals a lone request never waits)."""
        if not self.fill_wait_s or self.policy != "stage":
            return False
        sid = self.model.runner.stage_for(chosen[0].request.timestep)
        rows = sum(im.rows for im in chosen)
        return (rows * 2 < self.model.runner.batches[sid] and len(self._inflight) < self.max_inflight
                and self.clock() - self._last_submit < self.fill_wait_s)

    def _admit(self) -> None:
        while self._waiting:
            t = self._waiting[0]
            if self.policy == "none" and self._inflight:
                return
            if self._inflight and len(self._inflight) + t.n > self.max_inflight:
                return
            self._waiting.pop(0)
            guided_rows = 2 if t.images[0].params.guided else 1
            for req in t.images:
                self._inflight.append(_Image(t, req, guided_rows, self._calls, next(self._order)))

    def _choose(self) -> list[_Image]:
        if not self._inflight:
            return []
        runner = self.model.runner
        by_stage: dict[int, list[_Image]] = {}
        for im in self._inflight:
            by_stage.setdefault(runner.stage_for(im.request.timestep), []).append(im)
        for ims in by_stage.values():
            ims.sort(key=lambda im: (im.last_call, im.order))
        oldest = min(self._inflight, key=lambda im: (im.last_call, im.order))
        if self._calls - oldest.last_call >= self.max_wait_calls:
            sid = runner.stage_for(oldest.request.timestep)
        else:
            def fill(s):
                return (min(sum(im.rows for im in by_stage[s]), runner.batches[s]) / runner.batches[s],
                        -by_stage[s][0].last_call, -by_stage[s][0].order)
            sid = max(by_stage, key=fill)
        chosen, rows = [], 0
        for im in by_stage[sid]:
            if chosen and rows + im.rows > runner.batches[sid]:
                break
            chosen.append(im)
            rows += im.rows
        return chosen

    def _expire(self) -> None:
        now = self.clock()
        for t in [t for t in self._tickets.values() if now > t.deadline]:
            self._end(t, error=TimedOut(f"request {t.id} timed out after {now - t.submitted:.1f} s "
                                        f"(its time-out ends it wherever it is)"))

    # ---- endings --------------------------------------------------------------------------------

    def _complete(self, t: Ticket) -> None:
        try:
            result = self.model.finish(t.images)
            error = None
        except BundleError as e:
            result, error = None, SamplingFailed(str(e))
        with self._lock:
            if self._tickets.get(t.id) is not t:  # cancelled or expired while decoding (its id may be reused)
                return
            self._end(t, result=result, error=error)

    def _end(self, t: Ticket, result: Result | None = None, error: ServeError | None = None) -> None:
        """Under the lock: remove ``t`` everywhere, record its outcome, wake its waiter."""
        self._tickets.pop(t.id, None)
        if t in self._waiting:
            self._waiting.remove(t)
        self._inflight = [im for im in self._inflight if im.ticket is not t]
        t.result, t.error, t.finished = result, error, self.clock()
        outcome = "ok" if error is None else type(error).__name__.lower()
        self._count(outcome, t)
        self._gauges()
        t._event.set()
        if t.on_done:
            try:
                t.on_done(t)
            except RuntimeError:  # the waiter's event loop is gone (shutdown): nobody to tell
                pass

    def _queued(self) -> int:
        """Images waiting for admission (under the lock)."""
        return sum(t.n for t in self._waiting)

    def _count(self, outcome: str, t: Ticket | None = None) -> None:
        if self.metrics:
            self.metrics.request_done(outcome, t.n if t else 0, (t.finished - t.submitted) if t else None)

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.gauges(self._queued(), len(self._inflight))


def run_whole(model, tickets: list[Ticket]) -> None:
    """The static baseline: take a fixed group of tickets through whole trajectories together
    (rows packed per stage, chunked to the static batch; nobody joins until all are done)."""
    live = [t for t in tickets if t.error is None]
    reqs = [r for t in live for r in t.images]
    while not all(r.done for r in reqs):
        now = time.monotonic()
        for t in live:
            if t.error is None and now > t.deadline:
                t.error = TimedOut(f"request {t.id} timed out after {now - t.submitted:.1f} s")
        reqs = [r for t in live if t.error is None for r in t.images]
        if not reqs:
            break
        model.step(reqs)
    for t in live:
        if t.error is None:
            try:
                t.result = model.finish(t.images)
            except BundleError as e:
                t.error = SamplingFailed(str(e))
        t.finished = time.monotonic()
        t._event.set()
