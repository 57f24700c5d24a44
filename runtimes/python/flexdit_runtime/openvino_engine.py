"""OpenVINO CPU stage engines: the bundle's fp32 ONNX graphs in fp32 or bf16, and NNCF int8 models.

Why a second CPU engine: which engine is fastest depends on the CPU (and bf16 exists only where
the CPU has it; measurements in benchmarks/README.md), so the runtime offers both and
``engine_select`` measures. Precisions and what each one loads:

    fp32          the stage's onnx/fp32 graph, OpenVINO inference precision f32 (exact)
    bf16          the same graph, inference precision bf16 (only where the CPU has bf16)
    int8-dynamic  the same graph with its MatMul weights quantised to int8 at load, activations
                  quantised at run time (``openvino_int8_weights``: no calibration, one model)
    int8-static   the stage's openvino/int8-static model (NNCF post-training quantisation,
                  written at convert time from the stage's calibration rows)

Memory: OpenVINO's CPU plugin repacks the weights of every compiled model into its own blocked
layout and JIT-compiles its own kernels, and its weight cache is per compiled model, so four
static stage models cost four repacked copies of the weights (Fashion: +50 MB per stage, 3.7x
the RSS of ONNX Runtime's dense model; see benchmarks/README.md). But the stage graphs of a
bundle are the same graph: they differ only in a few small constants (the pooling table, the
recovery index, reshape targets holding the token count). So fp32/bf16 stages whose graphs have
the same structure share **one compiled model**: the constants that differ between them become
inputs (dimensions that differ become dynamic), and each stage engine feeds its own values. The
weights are repacked once and every stage costs what one dense model costs. Which constants are
identical is known without reading the weights: two initializers bound by the manifest to the
same tensor of the same weight file are the same bytes (v2); everything else is compared by
value. ``RuntimeSettings(shared_graphs=False)``, or ``$FLEXDIT_OPENVINO_SHARE_STAGES=0`` where
the setting is left at None, compiles one static model per stage instead (no dynamic shapes: a
little faster per call on small graphs, one weight copy per stage). int8-dynamic
is derived from that shared model, so its int8 weights exist once too. NNCF int8 models are
calibrated per stage (different quantiser ranges, SmoothQuant-scaled weights), so they stay one
static model each.

Weights: OpenVINO's ONNX reader maps the bundle's weight file (mmap) instead of copying it, and
the runtime checks the file's sha256 once, streaming it, without keeping a copy. Compiled
models go to a cache directory (``CACHE_DIR``; default ``$FLEXDIT_OPENVINO_CACHE``, else the user
cache dir), so a second start imports them instead of compiling again.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import weakref
from pathlib import Path

import numpy as np

from flexdit_bundle.files import sha256_file
from flexdit_bundle.manifest import Bundle, BundleError
from flexdit_bundle.spec import Artifact, Stage
from flexdit_bundle.precision import PrecisionError, canonical

from .openvino_int8_weights import GROUP_SIZE, compress_weights
from .settings import RuntimeSettings
from .stage_engine import StageEngine
from .weights import checksum_mismatch

INSTALL_HINT = 'OpenVINO is not installed: pip install "flexdit-export[openvino]" (or pip install openvino)'
ENV_CACHE = "FLEXDIT_OPENVINO_CACHE"
ENV_SHARE = "FLEXDIT_OPENVINO_SHARE_STAGES"  # "0": one static compiled model per stage
STAGE_INPUT = "flexdit.stage_const."  # inputs of a shared model that carry a stage's own constants
PRECISIONS = ("fp32", "bf16", "int8-dynamic", "int8-static")  # what this engine runs; int8 = int8-static
FROM_FP32 = ("fp32", "bf16", "int8-dynamic")  # run from the fp32 graph (stages share one compiled model)
HINTS = {"fp32": "f32", "bf16": "bf16", "int8-dynamic": "f32", "int8-static": "f32"}  # int8 layers are int8 whatever the hint
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


def artifact_for(bundle: Bundle, stage: Stage, precision: str) -> Artifact:
    """The manifest artifact a precision runs from; bf16 and int8-dynamic run the fp32 graph, so
    they get a copy of that artifact whose precision says so."""
    if precision not in PRECISIONS:
        raise BundleError(f"the openvino backend runs {', '.join(PRECISIONS)} (int8 = int8-static), not {precision}")
    if precision == "int8-static":
        return bundle.artifact(stage, "openvino", "int8-static")
    return dataclasses.replace(bundle.artifact(stage, "onnx", "fp32"), precision=precision)


_VERIFIED: set = set()
_VERIFY_LOCK = threading.Lock()


def verify_weight_file(bundle: Bundle, artifact: Artifact) -> None:
    """The shared weight file OpenVINO will map must be the one the manifest hashed. Streamed
    (no copy kept); once per file and process."""
    ref = artifact.weights
    if not ref:
        return
    entry = bundle.weight_files[ref.file]
    path = bundle.path(entry)
    key = (str(path), entry.sha256)
    with _VERIFY_LOCK:
        if key in _VERIFIED:
            return
        try:
            ok = path.stat().st_size == entry.bytes and sha256_file(path) == entry.sha256
        except OSError as e:
            raise BundleError(f"cannot read weight file {entry.path}: {e}") from None
        if not ok:
            raise checksum_mismatch(entry)
        _VERIFIED.add(key)


def compile_config(precision: str, threads: int | None, cache: str | None) -> dict:
    cfg = {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if precision == "int8-dynamic":
        cfg["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = GROUP_SIZE
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
    devices = ("cpu",)
    auto = True

    @classmethod
    def library(cls) -> str | None:
        try:
            openvino()
        except BundleError as e:
            return str(e)
        return None

    @classmethod
    def preflight(cls, bundle: Bundle, stage: Stage, artifact: Artifact, settings: RuntimeSettings) -> None:
        super().preflight(bundle, stage, artifact, settings)
        if artifact.precision == "bf16" and not has_bf16():
            raise BundleError("bf16 needs a CPU with bf16 instructions (AVX512-BF16 or AMX), which this one lacks; "
                              "use fp32 or int8 on the openvino backend")

    @classmethod
    def shares_stages(cls, settings: RuntimeSettings) -> bool:
        """The setting, else ``$FLEXDIT_OPENVINO_SHARE_STAGES`` (default on)."""
        return settings.shared_graphs if settings.shared_graphs is not None else share_stages()

    def __init__(self, stage: Stage, artifact: Artifact, compiled, cache: str | None, shared=None):
        super().__init__(stage, artifact)
        self.compiled, self.cache = compiled, cache
        self.shared = shared  # the SharedStageModel this stage runs on, or None (a static model of its own)
        self._stage_feeds = shared.feeds[stage.id] if shared else {}
        # one infer request per calling thread (run() is thread-safe); the stages of a shared
        # model share it, since one thread runs one stage at a time
        self._local = shared.local if shared else threading.local()
        inputs, outputs = compiled_io(compiled)
        self.check_graph_io({k: v for k, v in inputs.items() if not k.startswith(STAGE_INPUT)}, outputs)

    @classmethod
    def choose_artifact(cls, bundle: Bundle, stage: Stage, want: str | None) -> Artifact:
        """The artifact for precision ``want`` (None: the stage's default precision if this
        engine runs it, else fp32)."""
        if want is None:
            want = stage.default_precision or "fp32"
            if want not in PRECISIONS:
                want = "fp32"
        try:
            want = canonical(want, "openvino")
        except PrecisionError as e:
            raise BundleError(str(e)) from None
        return artifact_for(bundle, stage, want)

    @classmethod
    def open(cls, bundle: Bundle, stage: Stage, artifact: Artifact, settings: RuntimeSettings,
             weights) -> "OpenVINOStageEngine":
        precision = artifact.precision
        cls.preflight(bundle, stage, artifact, settings)
        verify_weight_file(bundle, artifact)
        cache = cache_dir(getattr(settings, "openvino_cache", None))
        config = compile_config(precision, settings.threads, cache)
        if precision in FROM_FP32 and cls.shares_stages(settings):
            shared = shared_model(bundle, stage, precision, config)
            if shared is not None:
                return cls(stage, artifact, shared.compiled, cache, shared)
        path = bundle.path(artifact)
        try:
            if precision == "int8-dynamic":
                model = core().read_model(str(path))
                compress_weights(openvino(), model)
                compiled = core().compile_model(model, "CPU", config)
            else:  # compiling from the path lets a cache hit skip reading the graph altogether
                compiled = core().compile_model(str(path), "CPU", config)
        except RuntimeError as e:
            raise BundleError(f"cannot load graph {artifact.path} in OpenVINO: {ov_error(e)}") from None
        return cls(stage, artifact, compiled, cache)

    def _request(self):
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._local.request = self.compiled.create_infer_request()
        return req

    def _run(self, feeds: dict) -> np.ndarray:
        req = self._request()
        try:
            req.infer({**feeds, **self._stage_feeds} if self._stage_feeds else feeds)
            return req.get_tensor(self.output_name).data.copy()
        except RuntimeError as e:
            raise BundleError(f"stage {self.stage.id} ({self.artifact.path}) failed in OpenVINO: "
                              f"{ov_error(e)}") from None

    def describe(self) -> dict:
        shared = {"shared_with_stages": list(self.shared.stage_ids),
                  "stage_inputs": len(self._stage_feeds)} if self.shared else {}
        dynamic = {"weights": "int8 per output channel, quantised at load",
                   "dynamic_quantization_group_size": GROUP_SIZE} if self.precision == "int8-dynamic" else {}
        return {**super().describe(), "device": "CPU", "inference_precision": HINTS[self.precision],
                "cache_dir": self.cache, **dynamic, **shared}


def share_stages() -> bool:
    return os.environ.get(ENV_SHARE, "1").strip().lower() not in ("0", "off", "false", "no")


class SharedStageModel:
    """One compiled model that runs several stages: ``feeds[stage id]`` are that stage's values
    of the constants that differ between the stages (inputs named ``STAGE_INPUT + index``)."""

    def __init__(self, compiled, feeds: dict, stage_ids: tuple):
        self.compiled, self.feeds, self.stage_ids = compiled, feeds, stage_ids
        self.local = threading.local()


_SHARED = weakref.WeakValueDictionary()  # (key, stage ids) -> SharedStageModel, alive while an engine uses it
_ALONE: set = set()  # (key, stage id): stages that share with no other (compiled one static model each)
_SHARED_LOCK = threading.Lock()
_KEY_LOCKS: dict = {}


def _structure(model) -> tuple:
    """What must be equal for two stage graphs to share one compiled model."""
    return tuple((op.get_type_name(), op.get_input_size(), op.get_output_size()) for op in model.get_ordered_ops())


def _bound(artifact: Artifact) -> dict:
    """{initializer name: (weight file, tensor index)} of a v2 artifact (empty for v1)."""
    ref = artifact.weights
    return {n: (ref.file, i) for n, i in ref.bindings.items()} if ref else {}


def shared_model(bundle: Bundle, stage: Stage, precision: str, config: dict) -> SharedStageModel | None:
    """The compiled model ``stage`` shares with every other stage of the same graph structure, or
    None when it has no such stage (or the shared model cannot be built: then each stage compiles
    its own static model, as before)."""
    arts = {}
    for st in bundle.stages:
        try:
            arts[st.id] = artifact_for(bundle, st, precision)
        except BundleError:
            continue
    if len(arts) < 2 or stage.id not in arts:
        return None
    key = (str(Path(bundle.root).resolve()), tuple(a.sha256 for a in arts.values()), precision,
           tuple(sorted((k, str(v)) for k, v in config.items())))
    with _SHARED_LOCK:
        key_lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with key_lock:  # the stages open in parallel: the first of a group builds, the others wait for it
        with _SHARED_LOCK:  # other keys' builders insert concurrently (--backend auto opens in parallel)
            if (key, stage.id) in _ALONE:
                return None
            for (k, ids), model in list(_SHARED.items()):
                if k == key and stage.id in ids:
                    return model
        found = _build_shared(bundle, arts, stage.id, config, precision)
        with _SHARED_LOCK:
            if found is None:
                _ALONE.add((key, stage.id))
            else:
                _SHARED[(key, found.stage_ids)] = found
        return found


def _build_shared(bundle: Bundle, arts: dict, stage_id, config: dict, precision: str) -> SharedStageModel | None:
    """Read every stage graph (the weights stay mapped, untouched), find the stages of the same
    structure as ``stage_id`` and compile one model for them (int8-dynamic: its weights
    quantised first); None when there are none."""
    ov = openvino()
    c = core()
    try:
        models = {sid: c.read_model(str(bundle.path(a))) for sid, a in arts.items()}
    except RuntimeError:
        return None
    mine = _structure(models[stage_id])
    sids = [sid for sid, m in models.items() if sid == stage_id or _structure(m) == mine]
    if len(sids) < 2:
        return None
    merged = _merge(ov, [models[s] for s in sids], [_bound(arts[s]) for s in sids])
    del models
    if merged is None:
        return None
    model, feeds = merged
    try:
        if precision == "int8-dynamic":
            compress_weights(ov, model)
        compiled = c.compile_model(model, "CPU", config)
    except RuntimeError:
        return None  # e.g. an op without dynamic-shape support: a static model per stage
    return SharedStageModel(compiled, dict(zip(sids, feeds)), tuple(sids))


def _merge(ov, models: list, bindings: list):
    """-> (the first model with every constant that differs between ``models`` replaced by an
    input, [per model {input name: its value}]), or None when they differ in more than values."""
    consts = [[op for op in m.get_ordered_ops() if op.get_type_name() == "Constant"] for m in models]
    if len({len(c) for c in consts}) != 1:
        return None
    differing = []
    for i, ops in enumerate(zip(*consts)):
        names = [frozenset(op.output(0).get_names()) for op in ops]
        refs = [tuple(sorted(b.get(n) for n in ns if n in b)) for ns, b in zip(names, bindings)]
        if refs[0] and all(r == refs[0] for r in refs) and all(ns == names[0] for ns in names):
            continue  # the same tensor of the same weight file in every stage: equal without reading it
        types = {op.get_element_type() for op in ops}
        shapes = [tuple(op.get_output_shape(0)) for op in ops]
        if len(types) != 1 or len({len(s) for s in shapes}) != 1:
            return None
        values = [op.get_data() for op in ops]
        if all(v.shape == values[0].shape and np.array_equal(v, values[0]) for v in values[1:]):
            continue
        differing.append((i, shapes, values))
    if not differing:
        return None  # identical graphs: nothing to feed, but also nothing to gain over one static model each
    base = models[0]
    params, fed = [], []
    for i, shapes, values in differing:
        const = consts[0][i]
        common = _common_reshape_target(ov, [c[i] for c in consts])
        if common is not None:
            # a reshape target holding the token count: one constant with -1 there keeps every
            # other dimension static (as an input, the reshaped tensor would lose all of them)
            for target in list(const.output(0).get_target_inputs()):
                target.replace_source_output(common.output(0))
            continue
        dims = [d if all(s[k] == d for s in shapes) else -1 for k, d in enumerate(shapes[0])]
        param = ov.opset13.parameter(ov.PartialShape(dims), const.get_element_type(), name=f"{STAGE_INPUT}{i}")
        param.output(0).get_tensor().set_names({f"{STAGE_INPUT}{i}"})
        for target in list(const.output(0).get_target_inputs()):
            target.replace_source_output(param.output(0))
        params.append(param)
        fed.append((i, values))
    if params:
        base.add_parameters(params)
    try:
        base.validate_nodes_and_infer_types()
    except RuntimeError:
        return None
    feeds = [{f"{STAGE_INPUT}{i}": np.array(values[k], copy=True, order="C") for i, values in fed}
             for k in range(len(models))]
    return base, feeds


def _common_reshape_target(ov, consts: list):
    """The stages' versions of one constant that is only ever the target shape of Reshapes: a
    constant valid for all of them (their static output shapes, -1 in the one dimension that
    differs), or None when it is used otherwise or more than one dimension differs."""
    outs = []
    for c in consts:
        shapes = set()
        for target in c.output(0).get_target_inputs():
            node = target.get_node()
            if (target.get_index() != 1 or node.get_type_name() != "Reshape"
                    or not node.get_output_partial_shape(0).is_static):
                return None
            shapes.add(tuple(node.get_output_shape(0)))
        if len(shapes) != 1:
            return None
        outs.append(list(shapes.pop()))
    if len({len(o) for o in outs}) != 1 or len(outs[0]) != consts[0].get_output_shape(0)[0]:
        return None
    dims = [d if all(o[k] == d for o in outs) else -1 for k, d in enumerate(outs[0])]
    if dims.count(-1) != 1:
        return None
    return ov.opset13.constant(np.array(dims, dtype=consts[0].get_data().dtype))


def cache_files(directory) -> list[Path]:
    """The compiled-model blobs in a cache directory (tests and tools look for hits here)."""
    d = Path(directory)
    return sorted(d.glob("*.blob")) if d.is_dir() else []
