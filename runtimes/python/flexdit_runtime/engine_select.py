"""``--backend auto``: per stage, the fastest installed CPU engine and precision the bundle's
policy allows, by measurement.

Why measure: the best engine depends on the machine (issue 12: ONNX Runtime fp32 was 2x PyTorch
on one CPU and 1.1x on another; OpenVINO bf16 needs bf16 hardware). Allowed precisions: with no
override, every precision of the stage's policy tier or better (``precision.allowed_by``: an
fp32 policy allows only exact engines, fp16 allows bf16, int8 allows every int8 form); with an
override, exactly that precision (``int8``: any int8 form). Every candidate is opened, then
timed on its stage's real shapes, interleaved (each round times every candidate once, in turn),
and the median decides. The choice is saved as a profile next to OpenVINO's compiled-model
cache, keyed by the bundle, the threads and the CPU, so a second start opens only the winners.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from flexdit_bundle.manifest import Bundle, BundleError
from flexdit_bundle.precision import PrecisionError, allowed_by, canonical

from .settings import RuntimeSettings
from .stage_engine import StageEngine, engine_kind

CPU_KINDS = ("onnx", "openvino")  # TensorRT needs its own engines and a GPU: name it explicitly
ENV_PROFILE = "FLEXDIT_AUTO_PROFILE"  # "off": always measure, never read or write a profile


def installed_kinds() -> list[str]:
    kinds = ["onnx"]
    try:
        import openvino  # noqa: F401
        kinds.append("openvino")
    except ImportError:
        pass
    return kinds


def allowed(stage: dict, want: str | None) -> tuple:
    """Precisions stage ``stage`` may run: ``want`` (a precision, or int8 = any int8 form), else
    its policy's tier."""
    if want is None:
        return allowed_by(stage.get("default_precision") or "fp32")
    try:
        want = canonical(want, "auto")
    except PrecisionError as e:
        raise BundleError(str(e)) from None
    return ("int8-dynamic", "int8-static") if want == "int8" else (want,)


def candidates(bundle: Bundle, stage: dict, want: str | None, kinds=None) -> list[tuple[str, dict]]:
    """(kind, artifact) of every installed engine and allowed precision the bundle has."""
    out = []
    for kind in kinds or installed_kinds():
        artifact_backend, cls = engine_kind(kind)
        pick = getattr(cls, "choose_artifact", None)
        for prec in allowed(stage, want):
            try:
                if kind == "openvino":
                    from .openvino_engine import PRECISIONS, has_bf16
                    if prec not in PRECISIONS or (prec == "bf16" and not has_bf16()):
                        continue
                art = pick(bundle, stage, prec) if pick else bundle.artifact(stage, artifact_backend, prec)
            except BundleError:
                continue  # not in the bundle, or not run by this engine
            out.append((kind, art))
    if not out:
        raise BundleError(f"--backend auto: no installed engine runs stage {stage['id']} in "
                          f"{' or '.join(allowed(stage, want))} with this bundle's artifacts")
    return out


def sample_inputs(stage: dict, seed: int = 0) -> tuple:
    """Inputs of the stage's real shapes: noise, timesteps inside its range, labels."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(stage["inputs"][0]["shape"], dtype=np.float32)
    b = stage["batch"]
    t = rng.integers(stage["t_min"], stage["t_max"] + 1, b).astype(np.float32)
    return x, t, np.zeros(b, np.int64)


def time_engines(engines: dict, stage: dict, rounds: int = 5, warmup: int = 2, settle_ms: float = 20.0) -> dict:
    """{name: StageEngine} -> {name: median ms}, interleaved (see benchmarks/timing.py: the
    pause lets the previous engine's spinning threads park)."""
    x, t, y = sample_inputs(stage)
    times = {k: [] for k in engines}
    for r in range(warmup + rounds):
        for name, e in engines.items():
            time.sleep(settle_ms / 1e3)
            t0 = time.perf_counter()
            e.run(x, t, y)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def label(kind: str, artifact: dict) -> str:
    return f"{kind}/{artifact['precision']}"


def profile_path(bundle: Bundle, settings: RuntimeSettings, wants, kinds) -> Path | None:
    if os.environ.get(ENV_PROFILE, "").lower() == "off":
        return None
    from .openvino_engine import cache_dir

    base = cache_dir()
    if not base:
        return None
    key = json.dumps([str(Path(bundle.root).resolve()),
                      hashlib.sha256(json.dumps(bundle.manifest, sort_keys=True).encode()).hexdigest(),
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
    per_stage = [candidates(bundle, st, w, kinds) for st, w in zip(bundle.stages, wants)]
    path = profile_path(bundle, settings, wants, kinds)
    profile = _read_profile(path)
    if profile and len(profile) == len(per_stage) and all(
            p["chosen"] in {label(k, a) for k, a in c} for p, c in zip(profile, per_stage)):
        chosen = [next((k, a) for k, a in c if label(k, a) == p["chosen"]) for p, c in zip(profile, per_stage)]
        engines = _open_all(bundle, settings, weights, [[c] for c in chosen])
        return tuple(e[0] for e in engines), [{**p, "from": f"profile {path}"} for p in profile]
    opened = _open_all(bundle, settings, weights, per_stage)
    picks, record = [], []
    for st, cands, engs in zip(bundle.stages, per_stage, opened):
        named = {label(k, a): e for (k, a), e in zip(cands, engs)}
        ms = time_engines(named, st, rounds) if len(named) > 1 else {n: None for n in named}
        best = min(named, key=lambda n: ms[n] or 0.0)
        picks.append(named[best])
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
