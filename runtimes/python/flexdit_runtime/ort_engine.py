"""ONNX Runtime sessions for bundle graphs, and the ONNX Runtime stage engine.

Execution providers: the CPU provider (what every test here runs), and the CUDA and TensorRT
providers of onnxruntime-gpu. For a GPU provider the options come from ``RuntimeSettings``
(``provider_options``: device, cuDNN algorithm search, arena, CUDA graphs, the TensorRT
provider's precision flags per artifact and its engine and timing caches, one cache directory
per GPU / TensorRT / ONNX Runtime version), and the stage engine binds its inputs and output
once to buffers on the device (``IOBinding`` of ``OrtValue``s): each call copies the new rows
into the same device addresses and replays, which is what ONNX Runtime's CUDA graphs require
(the static batch of a stage makes fixed addresses possible). None of the GPU code has run on a
GPU (none was available to this work): the option names follow ONNX Runtime's documentation,
and what can run on the CPU (provider selection and its errors, the options built per
precision, cache keys, the IO-binding mechanics on CPU buffers) is tested.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
import shutil
import subprocess
import threading

import numpy as np

from flexdit_bundle.manifest import Bundle, BundleError
from flexdit_bundle.spec import Artifact, SharedGraph, Stage
from flexdit_bundle.precision import cpu_optimization_level

from .settings import RuntimeSettings, process_shares_pool, use_env_arena
from .stage_engine import NUMPY_DTYPES, NotChosen, StageEngine, has_backend

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider"}
CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
GPU_PROVIDERS = (TRT, CUDA)
GPU_HINT = "install onnxruntime-gpu in place of onnxruntime (README, section GPU)"
ENV_TRT_CACHE = "FLEXDIT_ORT_TRT_CACHE"
# ONNX Runtime's element type names -> the manifest's
ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(double)": "float64", "tensor(int32)": "int32", "tensor(bfloat16)": "bfloat16"}


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def resolve_providers(names, available=None, gpu_present=None) -> list[str]:
    """Provider names or aliases -> ONNX Runtime provider names, in priority order. None: the
    accelerators that are really present, then the CPU. A GPU provider named explicitly must be
    in this onnxruntime build and see a GPU, else one line says which and what to install; the
    TensorRT provider gets the CUDA provider after it (for the nodes TensorRT does not take) and
    every list ends with the CPU provider. ``available``/``gpu_present``: for tests."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    available = list(available)
    gpu = _gpu_present() if gpu_present is None else gpu_present
    if not names:
        # Prefer accelerators that are really present; always keep the CPU fallback.
        order = [TRT, CUDA, CPU]
        return [p for p in order if p in available and (p == CPU or gpu)]
    out = []
    for n in names:
        p = PROVIDER_ALIASES.get(n.lower(), n)
        if p not in available:
            hint = f"; {GPU_HINT}" if p in GPU_PROVIDERS else ""
            raise BundleError(f"execution provider {n!r} is not available in this onnxruntime ({_ort_version()}, "
                              f"available: {', '.join(available)}){hint}")
        if p in GPU_PROVIDERS and not gpu:
            raise BundleError(f"execution provider {n!r}: this onnxruntime has it, but no NVIDIA GPU is visible to "
                              "this process (no /dev/nvidia0)")
        if p not in out:
            out.append(p)
    if TRT in out and CUDA not in out and CUDA in available:
        out.insert(out.index(TRT) + 1, CUDA)
    if CPU not in out:
        out.append(CPU)
    return out


def _gpu_present() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/dxg")


def ort_cuda() -> str | None:
    """None when ONNX Runtime's CUDA provider can run here, else why not."""
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return f"this onnxruntime ({_ort_version()}) has no CUDA provider (install onnxruntime-gpu: README, GPU)"
    if not _gpu_present():
        return "no NVIDIA GPU is visible to this process (no /dev/nvidia0)"
    return None


def names_gpu_provider(providers) -> bool:
    """Whether ``--providers`` names a GPU provider (by alias or ONNX Runtime name)."""
    gpu = {n.lower() for n in GPU_PROVIDERS}
    return any(PROVIDER_ALIASES.get(p.lower(), p).lower() in gpu for p in providers or ())


# ---------------------------------------------------------------- GPU provider options

def uses_io_binding(providers, settings: RuntimeSettings) -> bool:
    """Whether a session with these providers is fed through device buffers bound once: the
    setting, else exactly when its first provider is a GPU provider (never on the CPU by default:
    there ``session.run`` on host arrays is what IO binding would do, with more steps)."""
    if settings.io_binding is not None:
        return settings.io_binding
    return bool(providers) and providers[0] in GPU_PROVIDERS


def uses_cuda_graph(providers, settings: RuntimeSettings) -> bool:
    """CUDA graphs: only for a GPU provider first in line, only with IO binding (fixed device
    addresses), and unless turned off."""
    return (bool(providers) and providers[0] in GPU_PROVIDERS and uses_io_binding(providers, settings)
            and settings.cuda_graph is not False)


def _flag(on: bool) -> str:
    return "True" if on else "False"  # the form ONNX Runtime's Python docs give for boolean options


def trt_precision_flags(precision: str) -> dict:
    """The TensorRT provider's precision switches for an artifact: fp16 graphs may run fp16
    kernels, int8-static (QDQ) graphs int8 ones; fp32 graphs stay fp32 (TensorRT would otherwise
    pick fp16 kernels wherever they are faster, which the fp32 artifact's parity never saw).
    int8-dynamic graphs (DynamicQuantizeLinear + MatMulInteger) and fp8 graphs get no switch:
    TensorRT leaves the dynamic-quantisation nodes to the CUDA provider, and fp8 Q/DQ is typed by
    the graph itself. (The non-quantised layers of an int8-static graph stay fp32, as its quality
    gate measured them.)"""
    return {"trt_fp16_enable": _flag(precision == "fp16"), "trt_int8_enable": _flag(precision == "int8-static")}


def provider_options(providers, settings: RuntimeSettings, precision: str = "fp32", trt_dirs: dict | None = None
                     ) -> list[dict]:
    """One options dict per provider of ``providers`` (same order), as ``InferenceSession(...,
    provider_options=)`` takes them (strings). ``trt_dirs``: ``trt_cache_dirs()`` for the
    artifact, or None for no TensorRT caches."""
    graph = uses_cuda_graph(providers, settings)
    out = []
    for i, p in enumerate(providers):
        if p == CUDA:
            o = {"device_id": str(settings.device_id), "cudnn_conv_algo_search": settings.cudnn_conv_algo_search,
                 "arena_extend_strategy": settings.arena_extend_strategy, "do_copy_in_default_stream": "1",
                 # a CUDA graph covers the whole session, so only where CUDA runs it all (first in line)
                 "enable_cuda_graph": "1" if graph and i == 0 else "0"}
            if settings.gpu_mem_limit:
                o["gpu_mem_limit"] = str(settings.gpu_mem_limit)
        elif p == TRT:
            o = {"device_id": str(settings.device_id), **trt_precision_flags(precision)}
            if trt_dirs:
                o.update(trt_engine_cache_enable="True", trt_engine_cache_path=trt_dirs["engines"],
                         trt_timing_cache_enable="True", trt_timing_cache_path=trt_dirs["timing"])
            if graph and i == 0:
                o["trt_cuda_graph_enable"] = "True"
        else:
            o = {}
        out.append(o)
    return out


@functools.lru_cache(maxsize=None)
def tensorrt_version() -> str:
    """The TensorRT library the TensorRT provider will load: the tensorrt module's version, else
    libnvinfer's getInferLibVersion() as a number (its encoding differs between 8.x and 10.x, so
    it is kept raw), else "unknown"."""
    try:
        import tensorrt

        return tensorrt.__version__
    except ImportError:
        pass
    import ctypes

    for name in ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so"):
        try:
            return f"lib{int(ctypes.CDLL(name).getInferLibVersion())}"
        except (OSError, AttributeError):
            continue
    return "unknown"


@functools.lru_cache(maxsize=None)
def gpu_environment(device_id: int = 0) -> dict:
    """What a TensorRT engine depends on: the GPU (name and compute capability, from nvidia-smi:
    no CUDA binding needed), the TensorRT library and ONNX Runtime's version."""
    env = {"gpu": "unknown", "compute_capability": "unknown", "tensorrt": tensorrt_version(),
           "onnxruntime": _ort_version()}
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            p = subprocess.run([exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=20)
            rows = [r.split(",") for r in p.stdout.splitlines() if r.strip()]
            if p.returncode == 0 and len(rows) > device_id and len(rows[device_id]) >= 2:
                env["gpu"], env["compute_capability"] = (v.strip() for v in rows[device_id][:2])
        except (OSError, subprocess.SubprocessError):
            pass
    return env


def trt_cache_key(env: dict) -> str:
    """A directory name for one GPU model, TensorRT and ONNX Runtime version: engines and timing
    caches built under another key are never offered to this one (the TensorRT provider itself
    names its engine files by model and would load a stale engine after an upgrade)."""
    parts = (env.get("gpu"), env.get("compute_capability"), env.get("tensorrt"), env.get("onnxruntime"))
    readable = re.sub(r"[^A-Za-z0-9.]+", "-", "{}-sm{}-trt{}-ort{}".format(*parts)).strip("-")[:96]
    return f"{readable}-{hashlib.sha256(repr(parts).encode()).hexdigest()[:8]}"


def trt_cache_root(explicit: str | None = None) -> str | None:
    """``explicit`` ("" = no caches), else ``$FLEXDIT_ORT_TRT_CACHE``, else
    ``$XDG_CACHE_HOME/flexdit/ort-tensorrt`` (~/.cache/...)."""
    value = explicit if explicit is not None else os.environ.get(ENV_TRT_CACHE)
    if value is not None:
        return value or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flexdit", "ort-tensorrt")


def trt_cache_dirs(root: str | None, env: dict, artifact) -> dict | None:
    """{"engines": ..., "timing": ...} for one artifact: engines per graph content (its sha256)
    and precision under the environment's key; one timing cache per key, shared by all graphs."""
    if not root:
        return None
    base = os.path.join(root, trt_cache_key(env))
    tag = f"{artifact.sha256[:16]}-{artifact.precision}"
    return {"engines": os.path.join(base, "engines", tag), "timing": os.path.join(base, "timing")}


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
    return cpu_optimization_level(precision) if cpu_only else "all"


def make_session(path, providers, threads: int | None = None, weights=None, artifact: Artifact | None = None, *,
                 shared_pool: bool | None = None, prepack_weights: bool = False, optimization: str = "all",
                 provider_options: list | None = None):
    """An ONNX Runtime session for one graph. ``weights`` (a ``SharedWeights``) binds the
    bundle's shared tensors that ``artifact`` uses, so every stage uses the same buffers.
    ``shared_pool``: use the process's global thread pool (None: when the process has one).
    ``optimization``: all | extended | basic | none (ONNX Runtime's graph optimisation level).
    ``provider_options``: one dict per provider (``provider_options()``), or None for defaults."""
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
    bound = weights.bind(so, artifact) if weights is not None and artifact is not None else []
    if bound:
        if not prepack_weights:
            # Pre-packing copies every MatMul weight into a per-session packed form: with four
            # stage sessions that is four more copies of the model. Unpacked GEMMs cost ~5% per call.
            so.add_session_config_entry("session.disable_prepacking", "1")
        if "CPUExecutionProvider" in providers:
            use_env_arena()
            so.add_session_config_entry("session.use_env_allocators", "1")
    try:
        if provider_options is not None and any(provider_options):
            session = ort.InferenceSession(str(path), sess_options=so, providers=list(providers),
                                           provider_options=list(provider_options))
        else:
            session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types
        raise BundleError(f"cannot load graph {path}: {ort_error(e)}") from None
    # ONNX Runtime reads added initializers in place and does not keep them alive itself: the
    # session does, so whoever holds it (an engine, a decoder) can outlive the SharedWeights
    session.flexdit_initializers = bound
    return session


def shared_graph(bundle: Bundle, artifact: Artifact, settings: RuntimeSettings, providers, level: str) -> SharedGraph | None:
    """The manifest's shared graph for this stage artifact, if the session would run where the
    compiler checked it bit-identical to the stage graph: the CPU provider alone, host feeds, the
    recorded optimisation level; else None (the stage gets its own session)."""
    ref = artifact.shared_graph
    if (not ref or not OrtStageEngine.shares_stages(settings) or list(providers) != [CPU]
            or uses_io_binding(providers, settings)):
        return None
    graph = bundle.shared_graphs.get(ref.id)
    if graph is None or graph.verified.graph_optimization != level:
        return None
    return graph


def session_io(session) -> tuple[dict, dict]:
    """-> ({input name: (dtype, shape)}, {output name: (dtype, shape)}) as the graph declares
    them; a free dimension is None."""
    def table(args):
        return {a.name: (ORT_DTYPES.get(a.type, a.type), [d if isinstance(d, int) else None for d in a.shape])
                for a in args}
    return table(session.get_inputs()), table(session.get_outputs())


class BoundIO:
    """The inputs and the output of one stage session as ``OrtValue``s on the session's device,
    bound once to one ``IOBinding``: a call copies the new rows into the same buffers
    (``update_inplace``), runs, and copies the output to the host. Fixed addresses are what a
    captured CUDA graph replays on. Not thread-safe: the engine serialises calls."""

    def __init__(self, session, stage: Stage, input_names, output_name: str, device_type: str, device_id: int = 0):
        import onnxruntime as ort

        self.device_type = device_type
        self.binding = session.io_binding()
        self.inputs = []
        for e, name in zip(stage.inputs, input_names):
            v = ort.OrtValue.ortvalue_from_shape_and_type(list(e.shape), NUMPY_DTYPES[e.dtype], device_type,
                                                          device_id)
            self.binding.bind_ortvalue_input(name, v)
            self.inputs.append(v)
        out = stage.outputs[0]
        self.output = ort.OrtValue.ortvalue_from_shape_and_type(list(out.shape), NUMPY_DTYPES[out.dtype],
                                                                device_type, device_id)
        self.binding.bind_ortvalue_output(output_name, self.output)
        self.addresses = self._addresses()

    def _addresses(self) -> tuple:
        return tuple(v.data_ptr() for v in (*self.inputs, self.output))

    def run(self, session, arrays) -> np.ndarray:
        for v, a in zip(self.inputs, arrays):
            v.update_inplace(a)
        session.run_with_iobinding(self.binding)
        return self.binding.copy_outputs_to_cpu()[0]


class OrtStageEngine(StageEngine):
    """A stage graph in an ONNX Runtime session (CPU, CUDA or TensorRT execution provider). With
    a GPU provider first, inputs and output live in device buffers bound once (``BoundIO``) and,
    unless turned off, ONNX Runtime replays the stage as a CUDA graph, captured at load by two
    warm-up calls on zeros; if the CUDA-graph session fails there, the engine reopens the stage
    without the graph and says why in ``describe()``."""

    kind = "onnx"
    devices = ("cpu", "cuda")
    default_on = {"cpu": 0, "cuda": 1}  # on CUDA, after packages compiled for the GPU
    auto = True

    @classmethod
    def library(cls) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "ONNX Runtime is not installed: pip install onnxruntime"
        return None

    @classmethod
    def preflight(cls, bundle: Bundle, stage: Stage, artifact: Artifact, settings: RuntimeSettings) -> None:
        super().preflight(bundle, stage, artifact, settings)
        resolve_providers(settings.providers)

    @classmethod
    def on_device(cls, bundle: Bundle, device: str, settings: RuntimeSettings, probes: dict,
                  explicit: bool) -> RuntimeSettings:
        """CPU: the CPU provider alone. CUDA: the bundle's ONNX graphs on the CUDA provider
        (GPU providers named in ``settings.providers`` are kept as given)."""
        if device == "cpu":
            return dataclasses.replace(settings, providers=("cpu",))
        super().on_device(bundle, device, settings, probes, explicit)
        whose = "the bundle's" if explicit else "its"
        if not has_backend(bundle, "onnx"):
            why = "the bundle has no ONNX graphs" if explicit else "it has no ONNX graphs"
        else:
            why = probes.get("ort_cuda", ort_cuda)()
            why = why and f"for {whose} ONNX graphs {why}"
        if why:
            if explicit:
                raise BundleError(f"--device {device}: {why}")
            raise NotChosen(why)
        if names_gpu_provider(settings.providers):
            return settings
        return dataclasses.replace(settings, providers=("cuda",))

    def __init__(self, stage: Stage, artifact: Artifact, session, bound: BoundIO | None = None,
                 constants: dict | None = None, shared_graph: SharedGraph | None = None):
        super().__init__(stage, artifact)
        self.session = session
        self.constants = constants or {}  # extra inputs of a shared graph: this stage's constants
        self.shared_graph = shared_graph
        inputs, outputs = session_io(session)
        for name, value in self.constants.items():
            dtype, shape = inputs.pop(name, (None, None))
            if dtype != str(value.dtype) or len(shape) != value.ndim:
                raise BundleError(f"{shared_graph.path}: stage {stage.id} feeds {name!r} as {value.dtype} "
                                  f"{list(value.shape)}, which the graph does not take; re-run flexdit-export convert")
        self.check_graph_io(inputs, outputs)
        self.bound = bound
        self._lock = threading.Lock()
        self.options: list = []
        self.cuda_graph = False
        self.cuda_graph_error = None
        self.trt_cache_note = None
        self.optimization = None

    @classmethod
    def open(cls, bundle: Bundle, stage: Stage, artifact: Artifact, settings: RuntimeSettings, weights) -> "OrtStageEngine":
        providers = resolve_providers(settings.providers)
        level = optimization_level(settings.graph_optimization, artifact.precision, providers)
        trt_dirs, cache_note = None, None
        if TRT in providers:
            trt_dirs, cache_note = make_dirs(trt_cache_dirs(trt_cache_root(settings.trt_cache_dir),
                                                            gpu_environment(settings.device_id), artifact))
        options = provider_options(providers, settings, artifact.precision, trt_dirs)

        shared = shared_graph(bundle, artifact, settings, providers, level)

        def session_with(opts, graph=artifact):
            return make_session(bundle.path(graph), providers, settings.threads, weights, graph,
                                shared_pool=settings.apply(), prepack_weights=settings.prepack_weights,
                                optimization=level, provider_options=opts)

        if shared is not None:  # one session for every stage of the group, made by the first to ask
            session = weights.once(("onnx", shared.id, level), lambda: session_with(options, shared))
            constants = {n: weights.array(shared.weights.file, i)
                         for n, i in artifact.shared_graph.inputs.items()}
            engine = cls(stage, artifact, session, constants=constants, shared_graph=shared)
            engine.options, engine.optimization = options, level
            return engine

        def engine_with(opts):
            session = session_with(opts)
            engine = cls(stage, artifact, session)
            if uses_io_binding(providers, settings):
                device = "cpu" if providers[0] == CPU else "cuda"
                try:
                    engine.bound = BoundIO(session, stage, engine.input_names, engine.output_name, device,
                                           settings.device_id)
                except Exception as e:  # onnxruntime raises its own exception types
                    raise BundleError(f"stage {stage.id}: cannot bind its inputs and output to {device} "
                                      f"memory: {ort_error(e)}") from None
            engine.options, engine.optimization = opts, level
            return engine

        graph = uses_cuda_graph(providers, settings)
        try:
            engine = engine_with(options)
            if graph:
                engine.warm_up()  # ONNX Runtime captures the CUDA graph in the first runs
                engine.cuda_graph = True
        except BundleError as e:
            if not graph:
                raise
            engine = engine_with(without_cuda_graph(options))
            engine.cuda_graph_error = str(e)
        engine.trt_cache_note = cache_note
        return engine

    def warm_up(self, calls: int = 2) -> None:
        """Run the stage on zeros (ONNX Runtime captures a CUDA graph on its first runs)."""
        zeros = [np.zeros(e.shape, NUMPY_DTYPES[e.dtype]) for e in self.stage.inputs]
        for _ in range(calls):
            self._run(dict(zip(self.input_names, zeros)))

    def _run(self, feeds: dict) -> np.ndarray:
        try:
            if self.bound is not None:
                with self._lock:  # one set of device buffers per engine
                    return self.bound.run(self.session, [feeds[n] for n in self.input_names])
            return self.session.run([self.output_name], {**feeds, **self.constants} if self.constants else feeds)[0]
        except Exception as e:  # onnxruntime raises its own exception types
            raise BundleError(f"stage {self.stage.id} ({self.artifact.path}) failed in ONNX Runtime: "
                              f"{ort_error(e)}") from None

    def describe(self) -> dict:
        d = {**super().describe(), "providers": self.session.get_providers(), "graph_optimization": self.optimization,
             "io_binding": self.bound is not None, "cuda_graph": self.cuda_graph}
        if self.bound is not None:
            d["io_device"] = self.bound.device_type
        if self.cuda_graph_error:
            d["cuda_graph_error"] = self.cuda_graph_error
        if self.trt_cache_note:
            d["trt_cache"] = self.trt_cache_note
        if self.shared_graph is not None:
            d["shared_graph"] = self.shared_graph.path
        if any(self.options):
            d["provider_options"] = self.options
        return d


def make_dirs(dirs: dict | None) -> tuple[dict | None, str | None]:
    """Create the cache directories; -> (dirs, None), or (None, why) when they cannot be made (a
    read-only cache costs the TensorRT provider its caches, not the run)."""
    if not dirs:
        return None, None
    try:
        for d in dirs.values():
            os.makedirs(d, exist_ok=True)
    except OSError as e:
        return None, f"TensorRT caches off: cannot create {e.filename}: {e.strerror or e}"
    return dirs, None


def without_cuda_graph(options: list) -> list:
    """The same provider options with CUDA graphs off (the fallback when capture fails)."""
    out = []
    for o in options:
        o = dict(o)
        if "enable_cuda_graph" in o:
            o["enable_cuda_graph"] = "0"
        o.pop("trt_cuda_graph_enable", None)
        out.append(o)
    return out
