"""ONNX Runtime sessions for bundle graphs, and the ONNX Runtime stage engine."""

from __future__ import annotations

import os

import numpy as np

from flexdit_bundle.manifest import Bundle, BundleError

from .settings import RuntimeSettings, process_shares_pool, use_env_arena
from .stage_engine import StageEngine

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider"}
# ONNX Runtime's element type names -> the manifest's
ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(double)": "float64", "tensor(int32)": "int32", "tensor(bfloat16)": "bfloat16"}


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
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/dxg")


def ort_error(e: Exception) -> str:
    """The first line of an ONNX Runtime exception, without its '[ONNXRuntimeError] : N : KIND :' prefix."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line.rsplit(" : ", 1)[-1][:300] if line.startswith("[ONNXRuntimeError]") else line[:300]


def optimization_level(setting: str, precision: str, providers) -> str:
    """The graph optimisation level a session runs at (see ``RuntimeSettings.graph_optimization``).
    Measured on stage graphs here (benchmarks/README.md, "load time"): for fp32/fp16 graphs on
    the CPU provider every level runs steps equally fast, while ``all`` costs 2-3x the load time
    of ``basic``; int8-dynamic graphs run ~20% faster with the extended-level fusions."""
    if setting != "auto":
        return setting
    cpu_only = all(p == "CPUExecutionProvider" for p in providers)
    return "basic" if cpu_only and precision in ("fp32", "fp16") else "all"


def make_session(path, providers, threads: int | None = None, weights=None, artifact: dict | None = None, *,
                 shared_pool: bool | None = None, prepack_weights: bool = False, optimization: str = "all"):
    """An ONNX Runtime session for one graph. ``weights`` (a ``SharedWeights``) binds the
    bundle's shared tensors that ``artifact`` uses, so every stage uses the same buffers.
    ``shared_pool``: use the process's global thread pool (None: when the process has one).
    ``optimization``: all | extended | basic | none (ONNX Runtime's graph optimisation level)."""
    import onnxruntime as ort

    L = ort.GraphOptimizationLevel
    so = ort.SessionOptions()
    so.graph_optimization_level = {"all": L.ORT_ENABLE_ALL, "extended": L.ORT_ENABLE_EXTENDED,
                                   "basic": L.ORT_ENABLE_BASIC, "none": L.ORT_DISABLE_ALL}[optimization]
    # Errors reach the caller as exceptions (one line each); ONNX Runtime's own log lines would
    # add a second, unformatted copy on stderr.
    so.log_severity_level = 4
    if process_shares_pool() if shared_pool is None else shared_pool:
        so.use_per_session_threads = False  # the pool's size was fixed by RuntimeSettings.apply()
    elif threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if weights is not None and artifact is not None and weights.bind(so, artifact):
        if not prepack_weights:
            # Pre-packing copies every MatMul weight into a per-session packed form: with four
            # stage sessions that is four more copies of the model. Unpacked GEMMs cost ~5% per call.
            so.add_session_config_entry("session.disable_prepacking", "1")
        if "CPUExecutionProvider" in providers:
            use_env_arena()
            so.add_session_config_entry("session.use_env_allocators", "1")
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types
        raise BundleError(f"cannot load graph {path}: {ort_error(e)}") from None


def session_io(session) -> tuple[dict, dict]:
    """-> ({input name: (dtype, shape)}, {output name: (dtype, shape)}) as the graph declares
    them; a free dimension is None."""
    def table(args):
        return {a.name: (ORT_DTYPES.get(a.type, a.type), [d if isinstance(d, int) else None for d in a.shape])
                for a in args}
    return table(session.get_inputs()), table(session.get_outputs())


class OrtStageEngine(StageEngine):
    """A stage graph in an ONNX Runtime session (CPU, CUDA or TensorRT execution provider)."""

    kind = "onnx"

    def __init__(self, stage: dict, artifact: dict, session):
        super().__init__(stage, artifact)
        self.session = session
        self.check_graph_io(*session_io(session))

    @classmethod
    def open(cls, bundle: Bundle, stage: dict, artifact: dict, settings: RuntimeSettings, weights) -> "OrtStageEngine":
        providers = resolve_providers(settings.providers)
        level = optimization_level(settings.graph_optimization, artifact["precision"], providers)
        session = make_session(bundle.path(artifact), providers, settings.threads, weights, artifact,
                               shared_pool=settings.apply(), prepack_weights=settings.prepack_weights,
                               optimization=level)
        engine = cls(stage, artifact, session)
        engine.optimization = level
        return engine

    def _run(self, feeds: dict) -> np.ndarray:
        try:
            return self.session.run([self.output_name], feeds)[0]
        except Exception as e:  # onnxruntime raises its own exception types
            raise BundleError(f"stage {self.stage['id']} ({self.artifact['path']}) failed in ONNX Runtime: "
                              f"{ort_error(e)}") from None

    def describe(self) -> dict:
        return {**super().describe(), "providers": self.session.get_providers(),
                "graph_optimization": getattr(self, "optimization", None)}
