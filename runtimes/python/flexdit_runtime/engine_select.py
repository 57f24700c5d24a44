"""``--backend auto``: per stage, the fastest installed engine (the kinds that declare
``StageEngine.auto``: CPU engines) and precision the bundle's policy allows, by measurement.

Why measure: the best engine depends on the machine (the same graphs rank differently on
different CPUs; OpenVINO bf16 needs bf16 hardware). Allowed precisions: with no
override, every precision of the stage's policy tier or better (``precision.allowed_by``: an
fp32 policy allows only exact engines, fp16 allows bf16, int8 allows every int8 form); with an
override, exactly that precision (``int8``: any int8 form). Every candidate is opened, then
timed inside the real sampler (``time_in_sampler``: short trajectories, candidates interleaved
round by round), and the median per stage decides. The choice is saved as a profile next to
OpenVINO's compiled-model cache, keyed by the bundle, the threads and the CPU, so a second start
opens only the winners.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from flexdit_bundle.manifest import Bundle, BundleError
from flexdit_bundle.spec import Artifact, Stage
from flexdit_bundle.precision import PrecisionError, allowed_by, canonical

from .settings import RuntimeSettings
from .stage_engine import StageEngine, auto_kinds, engine_kind, installed_kinds

ENV_PROFILE = "FLEXDIT_AUTO_PROFILE"  # "off": always measure, never read or write a profile
CALLS_PER_STEP = 4  # engine calls per denoising step while timing: a batch of prompts, as flexdit-run is used


def allowed(stage: Stage, want: str | None) -> tuple:
    """Precisions stage ``stage`` may run: ``want`` (a precision, or int8 = any int8 form), else
    its policy's tier."""
    if want is None:
        return allowed_by(stage.default_precision or "fp32")
    try:
        want = canonical(want, "auto")
    except PrecisionError as e:
        raise BundleError(str(e)) from None
    return ("int8-dynamic", "int8-static") if want == "int8" else (want,)


def candidates(bundle: Bundle, stage: Stage, want: str | None, kinds=None, settings: RuntimeSettings | None = None,
               machine: bool = True) -> list[tuple[str, Artifact]]:
    """(kind, artifact) of every engine kind ``auto`` measures and allowed precision the bundle
    has. ``kinds``: those kinds (default: the installed ones, or all with ``machine`` False).
    ``machine``: keep only what this machine can run (``StageEngine.preflight``: e.g. bf16 on a
    CPU without it); False judges the bundle's artifacts alone (for replicas on other machines)."""
    settings = settings or RuntimeSettings()
    out = []
    for kind in kinds or (installed_kinds() if machine else auto_kinds()):
        cls = engine_kind(kind)[1]
        for prec in allowed(stage, want):
            try:
                art = cls.choose_artifact(bundle, stage, prec)
                if machine:
                    cls.preflight(bundle, stage, art, settings)
            except BundleError:
                continue  # not in the bundle, not run by this engine, or not on this machine
            out.append((kind, art))
    if not out:
        raise BundleError(f"--backend auto: no installed engine runs stage {stage.id} in "
                          f"{' or '.join(allowed(stage, want))} with this bundle's artifacts")
    return out


def sample_inputs(stage: Stage, seed: int = 0) -> tuple:
    """Inputs of the stage's real shapes: noise, timesteps inside its range, labels."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(stage.inputs[0].shape, dtype=np.float32)
    b = stage.batch
    t = rng.integers(stage.t_min, stage.t_max + 1, b).astype(np.float32)
    return x, t, np.zeros(b, np.int64)


def covering_steps(bundle: Bundle, visits: int = 2) -> int:
    """The fewest respaced steps ("sections" spacing) that visit every stage ``visits`` times."""
    from .diffusion import space_timesteps

    T = bundle.diffusion.num_timesteps
    for n in range(visits * len(bundle.stages), T + 1):
        seen = [bundle.stage_for(t).id for t in space_timesteps(T, str(n))]
        if all(seen.count(st.id) >= visits for st in bundle.stages):
            return n
    return T


def time_in_sampler(bundle: Bundle, settings: RuntimeSettings, weights, named: list[dict], rounds: int = 5,
                    warmup: int = 1, settle_ms: float = 20.0) -> list[dict]:
    """Per stage {label: median ms per engine call}, measured inside the real sampler: for each
    label, a short trajectory (``covering_steps``: every stage visited twice; the bundle's
    default guidance; ``CALLS_PER_STEP`` full engine calls per step, i.e. a batch of prompts)
    runs with that label's engine on every stage that has one (other stages: their first
    candidate, not counted), labels interleaved round by round. Why not time single calls: on
    the 2-core machine here, calls timed one at a time after a pause put ONNX Runtime ahead of
    OpenVINO on two of four Fashion stages, while whole flexdit-run processes were 1.3x faster on
    OpenVINO on every stage; inside the sampler, with calls back to back as a batch makes them,
    the timing agrees with the whole runs (benchmarks/README.md, "--backend auto")."""
    from .engines import StageRunner
    from .model import Model

    labels = sorted({n for per in named for n in per})
    steps = covering_steps(bundle)
    models = {}
    for n in labels:
        engines = [per.get(n) or next(iter(per.values())) for per in named]
        models[n] = Model(bundle, settings, runner=StageRunner.from_engines(bundle, engines, weights), decoder=False)
    any_model = next(iter(models.values()))
    params = any_model.params(steps=steps, sampler="ddim", spacing="sections")
    n_images = CALLS_PER_STEP * any_model.capacity(params.cfg_scale)
    visits = defaultdict(int)  # engine calls per stage in one trajectory (one per step)
    for t in any_model.diffusion(steps).timestep_map:
        visits[bundle.stage_for(int(t)).id] += 1
    times = [{n: [] for n in per} for per in named]
    for r in range(warmup + rounds):
        for n, model in models.items():
            time.sleep(settle_ms / 1e3)
            req = model.start([0] * n_images, params, seed=r)
            model.run(req)
            if r < warmup:
                continue
            for sid, per in enumerate(named):
                if n in per:
                    times[sid][n].append(req.stage_seconds[sid] / (visits[sid] * CALLS_PER_STEP))
    return [{n: statistics.median(v) * 1e3 for n, v in per.items()} for per in times]


def label(kind: str, artifact: Artifact) -> str:
    return f"{kind}/{artifact.precision}"


def profile_path(bundle: Bundle, settings: RuntimeSettings, wants, kinds) -> Path | None:
    if os.environ.get(ENV_PROFILE, "").lower() == "off":
        return None
    from .openvino_engine import cache_dir

    base = cache_dir()
    if not base:
        return None
    key = json.dumps([str(Path(bundle.root).resolve()),
                      hashlib.sha256(json.dumps(bundle.manifest.to_json(), sort_keys=True).encode()).hexdigest(),
                      settings.threads, os.cpu_count(), platform.processor() or platform.machine(), wants, kinds])
    return Path(base) / "auto-profiles" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def _read_profile(path: Path | None):
    try:
        return json.loads(path.read_text()) if path else None
    except (OSError, ValueError):
        return None


def select_engines(bundle: Bundle, settings: RuntimeSettings, wants: list, weights,
                   rounds: int = 5) -> tuple[tuple[StageEngine, ...], list[dict]]:
    """-> (one engine per stage, per stage {"chosen": label, "ms": {label: median}, "from": how})."""
    kinds = installed_kinds()
    per_stage = [candidates(bundle, st, w, kinds, settings) for st, w in zip(bundle.stages, wants)]
    path = profile_path(bundle, settings, wants, kinds)
    profile = _read_profile(path)
    if profile and len(profile) == len(per_stage) and all(
            p["chosen"] in {label(k, a) for k, a in c} for p, c in zip(profile, per_stage)):
        chosen = [next((k, a) for k, a in c if label(k, a) == p["chosen"]) for p, c in zip(profile, per_stage)]
        engines = _open_all(bundle, settings, weights, [[c] for c in chosen])
        return tuple(e[0] for e in engines), [{**p, "from": f"profile {path}"} for p in profile]
    opened = _open_all(bundle, settings, weights, per_stage)
    named = [{label(k, a): e for (k, a), e in zip(cands, engs)} for cands, engs in zip(per_stage, opened)]
    timed = time_in_sampler(bundle, settings, weights, named, rounds) if any(len(per) > 1 for per in named) \
        else [{} for _ in named]
    picks, record = [], []
    for per, ms in zip(named, timed):
        if len(per) == 1:  # nothing to choose: no time reported
            ms = {n: None for n in per}
        best = min(per, key=lambda n: ms[n] or 0.0)
        picks.append(per[best])
        record.append({"chosen": best, "ms": {n: (round(v, 3) if v else v) for n, v in ms.items()}})
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs the measurement next time
    return tuple(picks), [{**r, "from": "measured at load"} for r in record]


def _open_all(bundle, settings, weights, per_stage) -> list[list[StageEngine]]:
    jobs = [(i, k, a) for i, cands in enumerate(per_stage) for k, a in cands]

    def open_one(job):
        i, kind, art = job
        return engine_kind(kind)[1].open(bundle, bundle.stages[i], art, settings, weights)

    workers = settings.load_threads or max(1, min(len(jobs), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        engines = list(pool.map(open_one, jobs))
    out, n = [], 0
    for cands in per_stage:
        out.append(engines[n:n + len(cands)])
        n += len(cands)
    return out
