"""OpenVINO CPU stage engines: the bundle's fp32 ONNX graphs in fp32 or bf16, and NNCF int8 models.

Why a second CPU engine: which engine is fastest depends on the CPU (issue 12: on an AMX Xeon
OpenVINO ran the same fp32 graphs 1.1-1.3x faster than ONNX Runtime, and 3.3x in bf16), so the
runtime offers both and ``engine_select`` measures. Precisions and what each one loads:

    fp32          the stage's onnx/fp32 graph, OpenVINO inference precision f32 (exact)
    bf16          the same graph, inference precision bf16 (only where the CPU has bf16)
    int8-static   the stage's openvino/int8-static model (NNCF post-training quantisation,
                  written at convert time from the stage's calibration rows)

Weights: every stage graph of a v2 bundle references one weight file; OpenVINO's ONNX reader
maps that file (mmap) instead of copying it, so the stages' constants are the same page-cache
pages, and the runtime checks the file's sha256 once, streaming it, without keeping a copy.
Compiled models go to a cache directory (``CACHE_DIR``; default ``$FLEXDIT_OPENVINO_CACHE``, else
the user cache dir), so a second start imports them instead of compiling again.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from flexdit_bundle.files import sha256_file
from flexdit_bundle.manifest import Bundle, BundleError
from flexdit_bundle.precision import PrecisionError, canonical

from .settings import RuntimeSettings
from .stage_engine import StageEngine
from .weights import checksum_mismatch

INSTALL_HINT = 'OpenVINO is not installed: pip install "flexdit-export[openvino]" (or pip install openvino)'
ENV_CACHE = "FLEXDIT_OPENVINO_CACHE"
PRECISIONS = ("fp32", "bf16", "int8-static")  # what this engine runs; int8 is the alias of int8-static
HINTS = {"fp32": "f32", "bf16": "bf16", "int8-static": "f32"}  # int8 layers are int8 whatever the hint
OV_DTYPES = {"f32": "float32", "f16": "float16", "i64": "int64", "i32": "int32", "bf16": "bfloat16", "f64": "float64"}


def openvino():
    """The ``openvino`` module, or one BundleError line naming the install extra."""
    try:
        import openvino as ov
    except ImportError:
        raise BundleError(INSTALL_HINT) from None
    return ov


_CORE = None
_CORE_LOCK = threading.Lock()


def core():
    """One ``ov.Core`` per process (it holds the plugins; creating one costs ~0.1 s)."""
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            _CORE = openvino().Core()
        return _CORE


def cpu_capabilities() -> set:
    """What the CPU plugin says this CPU can run natively (e.g. BF16, INT8, FP32)."""
    return set(core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def has_bf16() -> bool:
    return "BF16" in cpu_capabilities()


def cache_dir(explicit=None) -> str | None:
    """Where compiled models are cached: ``explicit`` (empty string: no cache), else
    ``$FLEXDIT_OPENVINO_CACHE``, else ``$XDG_CACHE_HOME/flexdit/openvino`` (~/.cache/...)."""
    value = explicit if explicit is not None else os.environ.get(ENV_CACHE)
    if value is not None:
        return value or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flexdit", "openvino")


def artifact_for(bundle: Bundle, stage: dict, precision: str) -> dict:
    """The manifest artifact a precision runs from; bf16 runs the fp32 graph, so it gets a copy
    of that artifact whose precision says bf16."""
    if precision not in PRECISIONS:
        raise BundleError(f"the openvino backend runs {', '.join(PRECISIONS)} (int8 = int8-static), not {precision}")
    if precision == "int8-static":
        return bundle.artifact(stage, "openvino", "int8-static")
    return {**bundle.artifact(stage, "onnx", "fp32"), "precision": precision}


_VERIFIED: set = set()
_VERIFY_LOCK = threading.Lock()


def verify_weight_file(bundle: Bundle, artifact: dict) -> None:
    """The shared weight file OpenVINO will map must be the one the manifest hashed. Streamed
    (no copy kept); once per file and process."""
    ref = artifact.get("weights")
    if not ref:
        return
    entry = bundle.weight_files[ref["file"]]
    path = bundle.path(entry)
    key = (str(path), entry["sha256"])
    with _VERIFY_LOCK:
        if key in _VERIFIED:
            return
        try:
            ok = path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]
        except OSError as e:
            raise BundleError(f"cannot read weight file {entry['path']}: {e}") from None
        if not ok:
            raise checksum_mismatch(entry)
        _VERIFIED.add(key)


def compile_config(precision: str, threads: int | None, cache: str | None) -> dict:
    cfg = {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    if cache:
        cfg["CACHE_DIR"] = cache
    return cfg


def compiled_io(compiled) -> tuple[dict, dict]:
    """-> ({input name: (dtype, shape)}, {output name: (dtype, shape)}); a free dimension is None."""
    def table(ports):
        out = {}
        for p in ports:
            shape = [d.get_length() if d.is_static else None for d in p.get_partial_shape()]
            et = p.get_element_type().get_type_name()
            out[p.get_any_name()] = (OV_DTYPES.get(et, et), shape)
        return out
    return table(compiled.inputs), table(compiled.outputs)


def ov_error(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Exception from")]
    return (lines[0] if lines else type(e).__name__)[:300]


class OpenVINOStageEngine(StageEngine):
    """A stage graph compiled by OpenVINO for the CPU, at an explicit inference precision."""

    kind = "openvino"

    def __init__(self, stage: dict, artifact: dict, compiled, cache: str | None):
        super().__init__(stage, artifact)
        self.compiled, self.cache = compiled, cache
        self._local = threading.local()  # one infer request per calling thread: run() is thread-safe
        self.check_graph_io(*compiled_io(compiled))

    @classmethod
    def choose_artifact(cls, bundle: Bundle, stage: dict, want: str | None) -> dict:
        """The artifact for precision ``want`` (None: the stage's default precision if this
        engine runs it, else fp32)."""
        if want is None:
            want = stage.get("default_precision") or "fp32"
            if want not in PRECISIONS:
                want = "fp32"
        try:
            want = canonical(want, "openvino")
        except PrecisionError as e:
            raise BundleError(str(e)) from None
        return artifact_for(bundle, stage, want)

    @classmethod
    def open(cls, bundle: Bundle, stage: dict, artifact: dict, settings: RuntimeSettings,
             weights) -> "OpenVINOStageEngine":
        precision = artifact["precision"]
        if precision == "bf16" and not has_bf16():
            raise BundleError("bf16 needs a CPU with bf16 instructions (AVX512-BF16 or AMX), which this one lacks; "
                              "use fp32 or int8 on the openvino backend")
        verify_weight_file(bundle, artifact)
        cache = cache_dir(getattr(settings, "openvino_cache", None))
        path = bundle.path(artifact)
        try:
            # Compiling from the path lets a cache hit skip reading the graph altogether.
            compiled = core().compile_model(str(path), "CPU", compile_config(precision, settings.threads, cache))
        except RuntimeError as e:
            raise BundleError(f"cannot load graph {artifact['path']} in OpenVINO: {ov_error(e)}") from None
        return cls(stage, artifact, compiled, cache)

    def _request(self):
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._local.request = self.compiled.create_infer_request()
        return req

    def _run(self, feeds: dict) -> np.ndarray:
        req = self._request()
        try:
            req.infer(feeds)
            return req.get_tensor(self.output_name).data.copy()
        except RuntimeError as e:
            raise BundleError(f"stage {self.stage['id']} ({self.artifact['path']}) failed in OpenVINO: "
                              f"{ov_error(e)}") from None

    def describe(self) -> dict:
        return {**super().describe(), "device": "CPU", "inference_precision": HINTS[self.precision],
                "cache_dir": self.cache}


def cache_files(directory) -> list[Path]:
    """The compiled-model blobs in a cache directory (tests and tools look for hits here)."""
    d = Path(directory)
    return sorted(d.glob("*.blob")) if d.is_dir() else []
