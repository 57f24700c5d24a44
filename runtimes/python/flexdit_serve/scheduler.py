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
them, so that arrivals moments apart start as one cohort (a lone request never waits). Beyond
what the replica can finish, ``submit`` refuses at once (``QueueFull``: HTTP 429) instead of
queueing: by default when the engine calls still owed to the images in flight and waiting, plus
the new request's, at the measured time of each stage's call, would not end within the new
request's time-out (the queue bound follows the model's speed, the steps asked for and the
time-out, not the batch size); with ``max_queue`` when more than that many images would wait.
Deadlines are checked between calls; a request past its deadline fails with ``TimedOut``
wherever it is.

``policy="none"`` admits one request at a time and runs it to the end (the unbatched baseline);
``run_whole`` is the static baseline (a fixed group taken through whole trajectories together),
its tickets registered with ``track`` so that cancellation, time-outs and ``close`` end them too.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

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
        self.max_queue = max_queue  # None: admission by the work queued (see _over_capacity)
        self.max_wait_calls = max_wait_calls or 2 * len(batches)
        self.call_seconds = self._measure_calls() if max_queue is None else None
        self._stage_plans: dict[tuple, np.ndarray] = {}  # (sampler, steps, spacing) -> steps per stage
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
            if self.max_queue is not None and queued + ticket.n > self.max_queue:
                self._count("rejected")
                raise QueueFull(f"queue full ({queued} images waiting, limit {self.max_queue}); retry later")
            if ticket.id in self._tickets:
                raise BadRequest(f"request id {ticket.id!r} is already in flight")
            if self.max_queue is None:
                ahead, total = self._work_seconds(ticket)
                left = ticket.deadline - self.clock()
                if ahead > 0 and total > left:
                    self._count("rejected")
                    raise QueueFull(f"queue full ({queued} images waiting, {len(self._inflight)} in flight: about "
                                    f"{total:.1f} s of engine work with this request, over its {left:.1f} s "
                                    f"time-out); retry later")
            self._waiting.append(ticket)
            self._tickets[ticket.id] = ticket
            self._last_submit = self.clock()
            self._gauges()
            self._lock.notify_all()
        return ticket

    def track(self, ticket: Ticket) -> Ticket:
        """Register a ticket that ``run_whole`` steps instead of the engine loop: cancellation,
        time-outs, ``close`` and the metrics then cover it as they cover a submitted one."""
        with self._lock:
            if self._draining:
                raise ShuttingDown("the server is shutting down; retry on another replica")
            if ticket.id in self._tickets:
                raise BadRequest(f"request id {ticket.id!r} is already in flight")
            self._tickets[ticket.id] = ticket
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
        if self.call_seconds is not None:  # a static graph's call costs the same however full
            self.call_seconds[sid] += 0.2 * (seconds - self.call_seconds[sid])
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

    def run_whole(self, tickets: list[Ticket]) -> None:
        """The static baseline: take a fixed group of tracked tickets through whole trajectories
        together (rows packed per stage, chunked to the static batch; nobody joins until all are
        done). A ticket that is cancelled, times out or is ended by ``close`` meanwhile leaves
        the group at the next step, so abandoned work does not hold up the next group."""
        def live():
            with self._lock:
                self._expire()
                return [t for t in tickets if self._tickets.get(t.id) is t]

        while reqs := [r for t in live() for r in t.images if not r.done]:
            try:
                self.model.step(reqs)
            except Exception as e:  # an engine failure fails this group, not the server
                with self._lock:
                    for t in live():
                        self._end(t, error=ServeError(f"engine call failed: {str(e).splitlines()[0][:300]}"))
                return
        for t in live():
            self._complete(t)

    # ---- admission by work --------------------------------------------------------------------

    def _measure_calls(self) -> list[float]:
        """Seconds of one full call of each stage's engine (the second of two: the first one
        also allocates), the unit of the work estimate; engine calls update it as they run."""
        runner, shape = self.model.runner, self.model.latent_shape
        out = []
        for st, b in zip(self.model.bundle.stages, runner.batches):
            x = np.zeros((b, *shape), np.float32)
            t, y = np.full(b, st.t_min, np.float32), np.zeros(b, np.int64)
            runner.run_rows(st.id, x, t, y)
            start = time.perf_counter()
            runner.run_rows(st.id, x, t, y)
            out.append(time.perf_counter() - start)
        return out

    def _steps_left(self, request: Request) -> np.ndarray:
        """The steps ``request`` still takes in each stage."""
        key = (request.params.sampler, request.params.steps, request.params.spacing)  # what fixes the timesteps
        counts = self._stage_plans.get(key)
        if counts is None:  # counts[k]: steps per stage among the last k to take
            runner, S = self.model.runner, len(self.model.runner.batches)
            stages = [runner.stage_for(t) for t in request.diffusion.timestep_map]
            counts = np.zeros((len(stages) + 1, S))
            counts[1:] = np.cumsum(np.eye(S)[stages], axis=0)
            self._stage_plans[key] = counts
        return counts[request.k + 1]

    def _work_seconds(self, extra: Ticket) -> tuple[float, float]:
        """(Under the lock) seconds of engine calls owed to the images in flight and waiting,
        without and with ``extra``, at the measured call times. Per stage, the calls needed are
        at least the most steps one image still takes there (one step per call) and at least
        the rows over what a call holds (the static batch, or the rows of ``max_inflight``
        images); with ``policy="none"`` every request's calls are its own."""
        batches = np.asarray(self.model.runner.batches, float)
        owed = [(im.ticket, im.request, im.rows) for im in self._inflight]
        for t in self._waiting + [extra]:
            owed += [(t, r, 2 if r.params.guided else 1) for r in t.images]

        def seconds(items) -> float:
            groups: dict[int, list] = {}
            for t, r, rows in items:
                groups.setdefault(id(t) if self.policy == "none" else 0, []).append((r, rows))
            calls = 0.0
            for g in groups.values():
                steps = np.stack([self._steps_left(r) for r, _ in g])
                rows = np.array([rows for _, rows in g], float)
                per_call = np.minimum(batches, max(1.0, self.max_inflight * rows.mean()))
                calls = calls + np.maximum(steps.max(0), np.ceil((rows @ steps) / per_call))
            return float(np.dot(calls, self.call_seconds))

        before = owed[:-extra.n]
        return (seconds(before) if before else 0.0), seconds(owed)

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

