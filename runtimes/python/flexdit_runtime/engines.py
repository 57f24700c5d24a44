"""The stage engines of a loaded bundle: which artifact each stage runs, opening them (in
parallel, sharing one copy of the weights), and running any number of rows on a stage.

``make_session`` and ``share_thread_pool`` are re-exported for scripts that build sessions
themselves (benchmarks, the Fashion evaluator's timing processes).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from flexdit_bundle.manifest import Bundle, BundleError
from flexdit_bundle.spec import Artifact, Stage
from flexdit_bundle.precision import PrecisionError, parse_policy

from .ort_engine import make_session, resolve_providers  # noqa: F401  (public: used by benchmarks)
from .settings import RuntimeSettings, share_thread_pool  # noqa: F401  (public: used by scripts)
from .stage_engine import AUTO, DEFAULT_KIND, ENGINE_KINDS, StageEngine, default_artifact, engine_kind
from .static_batch import in_static_batches
from .weights import SharedWeights

BACKENDS = tuple(ENGINE_KINDS)


choose_artifact = default_artifact  # the name scripts import; engine kinds use StageEngine.choose_artifact


def precision_overrides(bundle: Bundle, spec: str | None, backend: str = DEFAULT_KIND) -> dict:
    """A ``--precision`` spec -> {stage id: precision} for the stages it names (the others keep
    their default)."""
    if spec is None:
        return {}
    try:
        return parse_policy(spec, len(bundle.stages), backend, default=None)
    except PrecisionError as e:
        raise BundleError(str(e)) from None


def stage_artifacts(bundle: Bundle, backend: str, wants: list) -> tuple[type, list[Artifact]]:
    """-> (the engine class of ``backend``, the artifact each stage runs for its wanted precision
    (None: its default)); refuses in one line what the bundle lacks, without opening anything."""
    engine_cls = engine_kind(backend)[1]
    return engine_cls, [engine_cls.choose_artifact(bundle, st, want) for st, want in zip(bundle.stages, wants)]


class StageRunner:
    """Every stage engine of a bundle, immutable once loaded. ``precision``: {stage id or "*":
    precision} overriding the bundle's per-stage default. ``weights`` holds the shared weight
    buffers the sessions were bound to and lives as long as the runner."""

    def __init__(self, bundle: Bundle, settings: RuntimeSettings | None = None, precision: dict | None = None,
                 backend: str = DEFAULT_KIND):
        settings = settings or RuntimeSettings()
        self.bundle, self.backend = bundle, backend
        self.weights = SharedWeights(bundle)
        precision = precision or {}
        wants = [precision.get(st.id, precision.get("*")) for st in bundle.stages]
        self.selection = None  # backend "auto": engine_select's timings and choices
        if backend == AUTO:
            from .engine_select import select_engines

            self.engines, self.selection = select_engines(bundle, settings, wants, self.weights)
            self.weights.verify()
            return
        engine_cls, arts = stage_artifacts(bundle, backend, wants)

        def open_stage(i):
            return engine_cls.open(bundle, bundle.stages[i], arts[i], settings, self.weights)

        # Sessions build their graphs in parallel (ONNX Runtime releases the GIL while it loads
        # and optimises); the shared weights are read once, by whichever stage needs them first.
        workers = settings.load_threads or max(1, min(len(arts), os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            self.engines: tuple[StageEngine, ...] = tuple(pool.map(open_stage, range(len(arts))))
        self.weights.verify()  # the weight files' sha256, computed while the sessions built

    @classmethod
    def from_engines(cls, bundle: Bundle, engines, weights, backend: str = "auto") -> "StageRunner":
        """A runner over engines opened elsewhere (``engine_select`` times candidate sets with
        the real sampler); ``weights``: the SharedWeights they were loaded with."""
        self = cls.__new__(cls)
        self.bundle, self.backend, self.weights, self.selection = bundle, backend, weights, None
        self.engines = tuple(engines)
        return self

    @property
    def batches(self) -> list[int]:
        return [e.batch for e in self.engines]

    @property
    def precisions(self) -> list[str]:
        return [e.precision for e in self.engines]

    def stage_for(self, t: int) -> int:
        return self.bundle.stage_for(int(t)).id

    def run_rows(self, stage_id: int, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Stage ``stage_id``'s output for any number of rows (per-row timesteps ``t``)."""
        engine = self.engines[stage_id]
        return in_static_batches(engine.run, engine.batch, x, t, y)

    def __call__(self, x: np.ndarray, t: int, y: np.ndarray) -> np.ndarray:
        """Rows that all sit at original timestep ``t``: picks the stage by ``t``."""
        return self.run_rows(self.stage_for(t), x, np.full(x.shape[0], t, np.float32), y)

    def describe(self) -> list[dict]:
        """Per stage: its engine's ``describe()`` (kind, precision, path...); with backend
        ``auto`` also ``auto``: the median milliseconds of every candidate it was chosen from."""
        out = [e.describe() for e in self.engines]
        for d, sel in zip(out, self.selection or ()):
            d["auto"] = sel
        return out
