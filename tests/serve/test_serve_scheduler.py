"""The serving scheduler without Ray: stage-aware packing, bit-identical images whatever shares
a call, the starvation bound, back-pressure, deadlines, cancellation, shutdown."""

import threading
import time
from collections import Counter

import numpy as np
import pytest

from conftest import run_cli
from flexdit_runtime.images import png_bytes
from flexdit_runtime.model import Model
from flexdit_runtime.pipeline import Pipeline
from flexdit_serve.scheduler import (BadRequest, Cancelled, QueueFull, Scheduler, ServeError, ShuttingDown, TimedOut,
                                     make_ticket)


@pytest.fixture(scope="module")
def model(serve_bundle):
    return Model.from_bundle(serve_bundle)


class Recorder:
    """Wraps Model.step: records, per engine call, the stage of every image and the rows."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self._step = model.step

    def __call__(self, requests):
        reqs = list(requests)
        stages = {self.model.runner.stage_for(r.timestep) for r in reqs}
        rows = sum(r.n * (2 if r.params.guided else 1) for r in reqs)
        self.calls.append((stages, rows, [id(r) for r in reqs]))
        return self._step(reqs)


def reference(model, prompts, seed, **kw):
    pipe = Pipeline(model.bundle)
    pipe.model = model
    return pipe(prompts, seed=seed, **kw)


MIXED = [  # prompts, seed, sampling options: different lengths, samplers, guidance, images per request
    ([0, 3], 11, dict(steps=12)),
    ([1], 12, dict(steps=7, sampler="ddim")),
    ([2, 2, 1], 13, dict(steps=20, cfg_scale=1.0)),
    ([3], 14, dict(steps=12, sampler="ddim", eta=0.5)),
    ([1, 0], 15, dict(steps=9, cfg_scale=2.5)),
    ([0], 16, dict(steps=15)),
]


def run_all(sched, tickets, stagger=None):
    loop = threading.Thread(target=sched.serve_forever, daemon=True)
    loop.start()
    for i, t in enumerate(tickets):
        sched.submit(t)
        if stagger:
            stagger(i)
    for t in tickets:
        assert t.wait(120), "a request never finished"
    sched.close(0)
    loop.join(10)


def test_packed_images_equal_one_request_at_a_time(model, monkeypatch):
    """Requests arriving at different times, with different steps, samplers, guidance and image
    counts, share engine calls; every image equals what the flexdit-run path draws alone."""
    rec = Recorder(model)
    monkeypatch.setattr(model, "step", rec)
    sched = Scheduler(model, max_inflight=8)
    tickets = [make_ticket(model, f"r{i}", p, model.params(**kw), s, 120) for i, (p, s, kw) in enumerate(MIXED)]
    arrived = threading.Event()

    def stagger(i):  # the later half arrives while the first half is mid-trajectory
        if i == 2:
            while sched._calls < 5:
                arrived.wait(0.005)

    run_all(sched, tickets, stagger)
    monkeypatch.undo()
    for t, (prompts, seed, kw) in zip(tickets, MIXED):
        assert t.error is None, t.error
        ref = reference(model, prompts, seed, **kw)
        assert np.array_equal(ref.samples, t.result.samples)
        assert np.array_equal(ref.images, t.result.images)
    batches = model.runner.batches
    for stages, rows, _ in rec.calls:
        assert len(stages) == 1, "one engine call mixed stages"
        assert rows <= batches[next(iter(stages))]
    shared = [c for c in rec.calls if len({tid for tid in c[2]}) > 1]
    assert shared, "no call packed images of more than one request"
    alone = sum(kw["steps"] * len(p) for p, _, kw in MIXED)  # one call per image per step, unpacked
    assert len(rec.calls) < alone / 2


def test_served_png_is_flexdit_runs_png(model, serve_bundle, tmp_path):
    """Byte for byte the PNG files of the real flexdit-run CLI, while other requests share the calls."""
    sched = Scheduler(model)
    mine = make_ticket(model, "mine", ["2", "0"], model.params(steps=10), 5, 60)
    other = make_ticket(model, "other", [1, 3], model.params(steps=14, sampler="ddim"), 9, 60)
    run_all(sched, [other, mine])
    (tmp_path / "p.txt").write_text("2\n0\n")
    run_cli("flexdit-run", tmp_path / "p.txt", "--bundle", serve_bundle, "-o", tmp_path / "out", "--steps", 10,
            "--seed", 5, "-q")
    files = sorted((tmp_path / "out").glob("0*.png"))
    assert [f.read_bytes() for f in files] == [png_bytes(im) for im in mine.result.images]


def test_starvation_bound(model, monkeypatch):
    """A lone image in another stage waits at most max_wait_calls + stages - 1 engine calls
    between its steps, even while a full stage keeps winning on fill."""
    rec = Recorder(model)
    monkeypatch.setattr(model, "step", rec)
    sched = Scheduler(model, max_inflight=9, max_wait_calls=3)
    crowd = [make_ticket(model, f"c{i}", [i % 4], model.params(steps=40, cfg_scale=1.0), i, 120) for i in range(8)]
    for t in crowd:
        sched.submit(t)
    for _ in range(6):  # the crowd moves on together; then the lone image arrives at stage 0's start
        sched.run_once()
    lone = make_ticket(model, "lone", [1], model.params(steps=40, cfg_scale=1.0), 99, 120)
    sched.submit(lone)
    lone_id = id(lone.images[0])
    while not lone.done:
        sched.run_once()
    monkeypatch.undo()
    idx = [i for i, c in enumerate(rec.calls) if lone_id in c[2]]
    gaps = [b - a for a, b in zip(idx, idx[1:])]
    stages = len(model.runner.batches)
    assert max(gaps) <= 3 + stages, gaps  # a gap of g calls = g - 1 calls waited
    assert len(idx) == 40
    assert lone.error is None
    ref = reference(model, [1], 99, steps=40, cfg_scale=1.0)
    assert np.array_equal(ref.samples, lone.result.samples)


def test_queue_full_refuses_at_once(model):
    """The waiting queue is bounded: a request beyond it is refused at once (429), never parked."""
    sched = Scheduler(model, max_inflight=2, max_queue=2)
    sched.submit(make_ticket(model, "a", [0, 1], model.params(steps=5), 0, 60))
    with pytest.raises(QueueFull, match="queue full"):
        sched.submit(make_ticket(model, "b", [0], model.params(steps=5), 0, 60))
    sched.run_once()  # "a" is admitted (in flight): its place in the queue frees up
    sched.submit(make_ticket(model, "b", [0, 1], model.params(steps=5), 0, 60))
    with pytest.raises(QueueFull):
        sched.submit(make_ticket(model, "c", [0], model.params(steps=5), 0, 60))
    with pytest.raises(BadRequest, match="at most 2"):
        sched.submit(make_ticket(model, "d", [0, 1, 2], model.params(steps=5), 0, 60))
    assert sched.queue_depth == 2 and sched.inflight == 2
    assert QueueFull.status == 429 and BadRequest.status == 400


def test_bad_prompt_is_a_bad_request(model):
    n = model.classes.num_classes
    with pytest.raises(BadRequest, match=f"class id {n} is outside 0..{n - 1}"):
        make_ticket(model, "x", [n], model.params(steps=5), 0, 60)
    with pytest.raises(BadRequest, match="not a class id"):
        make_ticket(model, "x", ["no such thing"], model.params(steps=5), 0, 60)
    with pytest.raises(BadRequest, match="seed"):
        make_ticket(model, "x", [1], model.params(steps=5), -1, 60)


def test_deadline_cancel_and_shutdown(model):
    now = [0.0]
    sched = Scheduler(model, max_inflight=8, clock=lambda: now[0])
    slow = make_ticket(model, "slow", [0], model.params(steps=50), 1, 60)
    slow.deadline = 5.0
    gone = make_ticket(model, "gone", [1], model.params(steps=50), 2, 60)
    gone.deadline = 1e9
    keep = make_ticket(model, "keep", [2], model.params(steps=6), 3, 60)
    keep.deadline = 1e9
    for t in (slow, gone, keep):
        sched.submit(t)
    sched.run_once()
    assert sched.cancel("gone") and not sched.cancel("nobody")
    now[0] = 6.0  # past slow's deadline: it ends wherever it is
    while not keep.done:
        sched.run_once()
    assert isinstance(slow.error, TimedOut) and slow.error.status == 504
    assert isinstance(gone.error, Cancelled)
    assert keep.error is None
    assert np.array_equal(keep.result.samples, reference(model, [2], 3, steps=6).samples)
    late = make_ticket(model, "late", [0], model.params(steps=50), 4, 60)
    late.deadline = 1e9
    sched.submit(late)
    sched.close(0)  # the loop is not running: nothing can finish, so it fails explicitly
    assert isinstance(late.error, ShuttingDown) and late.error.status == 503
    with pytest.raises(ShuttingDown):
        sched.submit(make_ticket(model, "after", [0], model.params(steps=5), 0, 60))


def test_policy_none_runs_one_request_at_a_time(model, monkeypatch):
    rec = Recorder(model)
    monkeypatch.setattr(model, "step", rec)
    sched = Scheduler(model, policy="none")
    tickets = [make_ticket(model, f"n{i}", [i % 4], model.params(steps=5), i, 60) for i in range(3)]
    run_all(sched, tickets)
    owners = {id(r): t.id for t in tickets for r in t.images}
    assert all(len({owners[i] for i in c[2]}) == 1 for c in rec.calls)
    assert [t.finished for t in tickets] == sorted(t.finished for t in tickets)


def test_engine_failure_fails_that_call_not_the_server(model, monkeypatch):
    sched = Scheduler(model)
    real = model.step
    boom = {"left": 1}

    def flaky(reqs):
        if boom["left"]:
            boom["left"] -= 1
            raise RuntimeError("device lost\nsecond line")
        return real(reqs)

    monkeypatch.setattr(model, "step", flaky)
    first = make_ticket(model, "first", [0], model.params(steps=4), 0, 60)
    sched.submit(first)
    sched.run_once()
    assert isinstance(first.error, ServeError) and "device lost" in str(first.error) and "\n" not in str(first.error)
    second = make_ticket(model, "second", [0], model.params(steps=4), 0, 60)
    sched.submit(second)
    while not second.done:
        sched.run_once()
    assert second.error is None


def test_run_whole_static_baseline(model):
    sched = Scheduler(model, max_queue=0)
    tickets = [sched.track(make_ticket(model, f"w{i}", p, model.params(**kw), s, 60))
               for i, (p, s, kw) in enumerate(MIXED[:3])]
    sched.run_whole(tickets)
    for t, (p, s, kw) in zip(tickets, MIXED):
        assert t.error is None
        assert np.array_equal(t.result.samples, reference(model, p, s, **kw).samples)


def test_run_whole_drops_a_cancelled_ticket_at_the_next_step(model, monkeypatch):
    """Request-mode batching: a client that leaves takes its images out of the group at once,
    and close() ends what is left (503), so nothing runs on for nobody."""
    sched = Scheduler(model, max_queue=0)
    gone, kept = (sched.track(make_ticket(model, n, [1], model.params(steps=400), 0, 60)) for n in ("gone", "kept"))
    calls, real = [], model.step

    def step(reqs):
        calls.append(len(reqs))
        if len(calls) == 3:
            sched.cancel("gone")
        if len(calls) == 6:
            threading.Thread(target=sched.close, args=(0,)).start()
            time.sleep(0.2)
        return real(reqs)

    monkeypatch.setattr(model, "step", step)
    sched.run_whole([gone, kept])
    assert calls[:3] == [2, 2, 2] and calls[3:] == [1, 1, 1], calls
    assert isinstance(gone.error, Cancelled) and isinstance(kept.error, ShuttingDown)


def test_default_admission_by_work_not_batch_size(model):
    """Without --max-queue, a request is admitted while the engine work queued ahead of it plus
    its own, at the measured call times, ends within its time-out: many short requests on a
    small static batch get in, long ones beyond the time-out are refused at once."""
    sched = Scheduler(model, fill_wait_s=0)
    assert sched.max_queue is None and all(s > 0 for s in sched.call_seconds)
    sched.call_seconds = [0.01] * len(sched.call_seconds)  # fixed, for a deterministic bound
    quick = model.params(steps=5, cfg_scale=1)
    for i in range(40):  # 40 x 5 steps: about 40 * 5 / 2 calls of 10 ms: a second of work
        sched.submit(make_ticket(model, f"q{i}", [i % 4], quick, i, 60))
    assert sched.queue_depth == 40 > 4 * sched.max_inflight
    with pytest.raises(QueueFull, match="time-out"):
        sched.submit(make_ticket(model, "long", [0], model.params(steps=1000), 0, 1.5))
    sched.submit(make_ticket(model, "patient", [0], model.params(steps=1000), 0, 120))
    alone = Scheduler(model)
    alone.call_seconds = [10.0] * len(alone.call_seconds)  # nothing ahead: admitted, it may time out (504)
    alone.submit(make_ticket(model, "alone", [0], model.params(steps=1000), 0, 1))


def test_metrics_record_fill_and_outcomes(model):
    from flexdit_serve.metrics import Metrics

    m = Metrics()
    sched = Scheduler(model, metrics=m, max_queue=0)
    t = make_ticket(model, "m", [0, 1], model.params(steps=3), 0, 60)
    with pytest.raises(QueueFull):
        sched.submit(t)
    sched = Scheduler(model, metrics=m)
    sched.submit(t)
    while not t.done:
        sched.run_once()
    text = m.text().decode()
    assert 'flexdit_requests_total{outcome="ok"} 1.0' in text
    assert 'flexdit_requests_total{outcome="rejected"} 1.0' in text
    assert "flexdit_images_total 2.0" in text
    fills = Counter(line.split("{")[0] for line in text.splitlines() if line.startswith("flexdit_batch_fill_count"))
    assert fills["flexdit_batch_fill_count"] >= 1
    assert "flexdit_step_seconds_bucket" in text and "flexdit_queue_depth 0.0" in text


def test_ticket_cancelled_while_decoding_does_not_end_a_retry_with_its_id(model, monkeypatch):
    """A client cancels while its images are being decoded (outside the lock) and retries under
    the same id: the first ticket stays Cancelled and the retry is answered (the scheduler used to
    match endings by id, so it re-ended the first and dropped the retry, whose waiter then hung)."""
    sched = Scheduler(model, fill_wait_s=0)
    params = model.params(steps=4, cfg_scale=1)
    state, real_finish = {}, model.finish

    def finish(reqs):  # what another thread may do meanwhile
        if not state:
            state["cancelled"] = sched.cancel("req-1")
            state["retry"] = sched.submit(make_ticket(model, "req-1", [3], params, seed=0, timeout_s=60))
        return real_finish(reqs)

    monkeypatch.setattr(model, "finish", finish)
    first = sched.submit(make_ticket(model, "req-1", [3], params, seed=0, timeout_s=60))
    for _ in range(100):
        if "retry" in state and state["retry"].done:
            break
        sched.run_once()
    retry = state["retry"]
    assert state["cancelled"] and isinstance(first.error, Cancelled) and first.result is None
    assert retry.done and retry.error is None, retry.error
    assert np.array_equal(retry.result.samples, reference(model, [3], 0, steps=4, cfg_scale=1).samples)
    assert sched.queue_depth == 0 and sched.inflight == 0
    sched.close(0)
