"""ONNX Runtime sessions for the stage graphs and the decoder, and the stage switch.

Each stage graph has a fixed batch B; ``StageRunner`` feeds any number of rows by chunking
and padding to B, so the sampler never needs to know the graph's batch.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from flexdit_bundle.manifest import Bundle, BundleError
from flexdit_bundle.precision import PrecisionError, canonical, parse_policy

from .weights import SharedWeights

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider"}


def resolve_providers(names) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if not names:
        # Prefer accelerators that are really present; always keep the CPU fallback.
        order = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        return [p for p in order if p in available and (p == "CPUExecutionProvider" or _gpu_present())]
    out = []
    for n in names:
        p = PROVIDER_ALIASES.get(n.lower(), n)
        if p not in available:
            raise BundleError(f"execution provider {n!r} is not available in this onnxruntime "
                              f"(available: {', '.join(available)})")
        out.append(p)
    return out


def _gpu_present() -> bool:
    import os
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/dxg")


# Each stage graph is its own session, and by default each session has its own intra-op thread
# pool. When the sampler switches stage, the workers of the stage that just ran keep spinning
# while the next stage's workers want the same cores: on the 2-core machine the 4-stage Fashion
# bundle sampled at ~200 ms/image against ~120 for its 1-session dense twin. One process-wide
# pool shared by every session removes that contention (~105-110 ms/image).
_shared_pool = False  # set by share_thread_pool()


def share_thread_pool(threads: int | None = None) -> bool:
    """Make every session that ``make_session`` creates from now on share one process-wide pool
    of ``threads`` intra-op threads (None: ONNX Runtime's default). Must run before any ONNX
    Runtime session exists in the process, and afterwards ONNX Runtime refuses sessions with
    their own pools, so only a process whose sessions all come from here (``flexdit-run``)
    should call it. False when this onnxruntime build cannot."""
    import onnxruntime.capi._pybind_state as C

    setter = getattr(C, "set_global_thread_pool_sizes", None)
    if setter is None:
        return False
    global _shared_pool
    setter(int(threads or 0), 1)
    _shared_pool = True
    return True


_arena_lock = threading.Lock()
_shared_arena = False


def _register_shared_arena() -> None:
    """One CPU memory arena for all sessions that ask for it: each stage session would otherwise
    grow its own arena to the size of its activations (~30 MB per DiT-S/2 stage at batch 2)."""
    global _shared_arena
    with _arena_lock:
        if _shared_arena:
            return
        import onnxruntime as ort

        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
        _shared_arena = True


def make_session(path, providers, threads: int | None = None, weights=None, artifact: dict | None = None):
    """An ONNX Runtime session for one graph. ``weights`` (a ``SharedWeights``) binds the
    bundle's shared tensors that ``artifact`` uses, so every stage uses the same buffers."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if _shared_pool:  # its size was fixed by share_thread_pool()
        so.use_per_session_threads = False
    elif threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if weights is not None and artifact is not None and weights.bind(so, artifact):
        # Pre-packing copies every MatMul weight into a per-session packed form: with four stage
        # sessions that is four more copies of the model. Unpacked GEMMs cost ~5% per call.
        so.add_session_config_entry("session.disable_prepacking", "1")
        if "CPUExecutionProvider" in providers:
            _register_shared_arena()
            so.add_session_config_entry("session.use_env_allocators", "1")
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types
        raise BundleError(f"cannot load graph {path}: {str(e).splitlines()[0][:300]}") from None


BACKENDS = ("onnx", "tensorrt")


def choose_artifact(bundle: Bundle, st: dict, backend: str = "onnx", want: str | None = None) -> dict:
    """The artifact a stage runs: ``want`` (a precision or the alias ``int8``), else the stage's
    ``default_precision`` (the conversion's policy), else the first one listed for the backend."""
    if want is not None:
        try:
            want = canonical(want, backend)
        except PrecisionError as e:
            raise BundleError(str(e)) from None
        return bundle.artifact(st, backend, want)
    default = st.get("default_precision")
    if default and any(a["backend"] == backend and a["precision"] == default for a in st["artifacts"]):
        return bundle.artifact(st, backend, default)
    return bundle.artifact(st, backend)


def precision_overrides(bundle: Bundle, spec: str | None, backend: str = "onnx") -> dict:
    """A ``--precision`` spec -> {stage id: precision} for the stages it names (the others keep
    their default)."""
    if spec is None:
        return {}
    try:
        return parse_policy(spec, len(bundle.stages), backend, default=None)
    except PrecisionError as e:
        raise BundleError(str(e)) from None


class StageRunner:
    """All stage sessions of a bundle; ``__call__(x, t, y)`` picks the stage by the original
    timestep t and runs it, accumulating time per stage. ``precision``: {stage id or "*":
    precision} overriding the bundle's per-stage default."""

    def __init__(self, bundle: Bundle, providers=None, threads=None, precision: dict | None = None,
                 backend: str = "onnx"):
        if backend not in BACKENDS:
            raise BundleError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
        self.bundle = bundle
        self.backend = backend
        self.providers = resolve_providers(providers) if backend == "onnx" else []
        self.weights = SharedWeights(bundle)
        precision = precision or {}
        arts = [choose_artifact(bundle, st, backend, precision.get(st["id"], precision.get("*")))
                for st in bundle.stages]

        def open_stage(art):
            if backend == "tensorrt":
                from .tensorrt_engine import open_engine
                return open_engine(bundle.path(art), art["path"], bundle.root)
            return make_session(bundle.path(art), self.providers, threads, self.weights, art)

        # Sessions build their graphs in parallel (ONNX Runtime releases the GIL while it loads
        # and optimises); the shared weights are read once, by whichever stage needs them first.
        with ThreadPoolExecutor(max(1, min(len(arts), os.cpu_count() or 1))) as pool:
            self.sessions = list(pool.map(open_stage, arts))
        self.batches = [st["batch"] for st in bundle.stages]
        self.precisions = [a["precision"] for a in arts]
        self.time_per_stage = defaultdict(float)
        self.calls_per_stage = defaultdict(int)

    def stage_for(self, t: int) -> int:
        for st in self.bundle.stages:
            if st["t_min"] <= t <= st["t_max"]:
                return st["id"]
        raise BundleError(f"no stage serves timestep {t}")

    def __call__(self, x: np.ndarray, t: int, y: np.ndarray) -> np.ndarray:
        sid = self.stage_for(t)
        sess, B = self.sessions[sid], self.batches[sid]
        rows = x.shape[0]
        outs = []
        start = time.perf_counter()
        for lo in range(0, rows, B):
            xb, yb = x[lo:lo + B], y[lo:lo + B]
            n = xb.shape[0]
            if n < B:  # pad with copies of the first row; rows are independent
                xb = np.concatenate([xb, np.repeat(xb[:1], B - n, 0)])
                yb = np.concatenate([yb, np.repeat(yb[:1], B - n, 0)])
            tb = np.full((B,), t, dtype=np.float32)
            out = sess.run(["out"], {"x": np.ascontiguousarray(xb, np.float32), "t": tb, "y": yb.astype(np.int64)})[0]
            outs.append(out[:n])
        self.time_per_stage[sid] += time.perf_counter() - start
        self.calls_per_stage[sid] += 1
        return np.concatenate(outs)


class Decoder:
    """The bundle's VAE decoder graph (latent -> image in [-1, 1]), or None for pixel space."""

    def __init__(self, bundle: Bundle, providers=None, threads=None):
        d = bundle.decoder
        art = bundle.artifact(d, "onnx")
        self.session = make_session(bundle.path(art), resolve_providers(providers), threads)
        self.batch = d["inputs"][0]["shape"][0]
        self.in_name, self.out_name = d["inputs"][0]["name"], d["outputs"][0]["name"]

    def __call__(self, z: np.ndarray) -> np.ndarray:
        outs = []
        for lo in range(0, z.shape[0], self.batch):
            zb = z[lo:lo + self.batch]
            n = zb.shape[0]
            if n < self.batch:
                zb = np.concatenate([zb, np.repeat(zb[:1], self.batch - n, 0)])
            outs.append(self.session.run([self.out_name], {self.in_name: zb.astype(np.float32)})[0][:n])
        return np.concatenate(outs)
