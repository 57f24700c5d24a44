"""How the runtime runs a bundle (threads, providers, pools, pre-packing), as one explicit object.

Some ONNX Runtime options are not per session but per process: a global intra-op thread pool
(once created it cannot be resized, and every later session must use it) and a shared CPU memory
arena. ``RuntimeSettings.apply()`` sets them once for the process and refuses, with one line, a
later request that contradicts what the process already has.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from flexdit_bundle.manifest import BundleError


OPTIMIZATION_LEVELS = ("auto", "all", "extended", "basic", "none")
CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")  # the CUDA provider's cudnn_conv_algo_search values
ARENA_EXTEND = ("kSameAsRequested", "kNextPowerOfTwo")  # its arena_extend_strategy values


@dataclass(frozen=True)
class RuntimeSettings:
    """``providers``: ONNX Runtime execution providers or aliases (cpu, cuda, tensorrt), None for
    the best available. ``threads``: intra-op threads per session, or the size of the shared pool.
    ``shared_thread_pool``: True makes every session of the process share one pool (when the
    sampler switches stage, per-session pools fight for the same cores: the 4-stage Fashion
    bundle ran at ~200 ms/image against ~110 with one pool on 2 cores); False gives each session
    its own; None follows the process (shared once a pool exists, since ONNX Runtime then refuses
    per-session pools). ``load_threads``: stage sessions created in parallel (None: one per stage,
    at most one per CPU). ``prepack_weights``: let ONNX Runtime keep a pre-packed copy of the
    GEMM weights per session (~5% faster calls, one more copy of the weights per stage).
    ``graph_optimization``: ONNX Runtime's graph optimisation level for stage sessions: ``auto``
    (``basic`` for fp32/fp16 graphs on the CPU provider, where the higher levels cost 10-30 ms
    of load per stage session and measured no faster steps; ``all`` for int8 graphs, whose
    quantised-MatMul fusions are extended-level, and for GPU providers), or one level for every
    session: ``all``, ``extended``, ``basic``, ``none``. ``shared_graphs``: where the bundle has
    a graph shared by several stages (``shared_graphs`` in the manifest: the stage graphs differ
    only in a few constants) and it was checked bit-identical at the level a session would run,
    open that one session for all those stages instead of one per stage (the same results, a
    quarter of the session build time and memory plans for a 4-stage bundle); False: always one
    session per stage. The setting is every engine kind's (``StageEngine.shares_stages``):
    OpenVINO compiles the stages of one graph structure as one model; AOTI and TensorRT have no
    shared stage graphs (AOTI packages share one copy of the weights anyway). None: each kind's
    default, which is to share (for OpenVINO, ``$FLEXDIT_OPENVINO_SHARE_STAGES=0`` makes the
    default one static model per stage: scripts set that variable).

    GPU execution providers (ONNX Runtime's CUDA and TensorRT providers; ``ort_engine.provider_options``
    turns these into the providers' options; unverified: no GPU was available to this work):
    ``device_id``: the CUDA device. ``io_binding``: feed each stage session through one set of
    device buffers bound once (``OrtValue`` + ``IOBinding``) instead of host arrays; None: on when
    the session's first provider is a GPU provider, off on the CPU. ``cuda_graph``: the CUDA
    provider's ``enable_cuda_graph`` (and the TensorRT provider's ``trt_cuda_graph_enable``): ONNX
    Runtime captures the stage graph once and replays it; it needs inputs and outputs at fixed
    device addresses, which the static batch and the bound buffers give; None: on whenever IO
    binding is. ``cudnn_conv_algo_search``: EXHAUSTIVE (ONNX Runtime's default), HEURISTIC or
    DEFAULT. ``arena_extend_strategy``: kSameAsRequested by default (every stage has its own
    session and arena; kNextPowerOfTwo may reserve up to twice what each needs), or
    kNextPowerOfTwo. ``gpu_mem_limit``: bytes per session arena (None: unlimited).
    ``trt_cache_dir``: the TensorRT provider's engine and timing caches (None:
    ``$FLEXDIT_ORT_TRT_CACHE``, else ``$XDG_CACHE_HOME/flexdit/ort-tensorrt``; "": no caches),
    one subdirectory per GPU, TensorRT and ONNX Runtime version (``ort_engine.trt_cache_key``)."""

    providers: tuple[str, ...] | None = None
    threads: int | None = None
    shared_thread_pool: bool | None = None
    load_threads: int | None = None
    prepack_weights: bool = False
    graph_optimization: str = "auto"
    shared_graphs: bool | None = None
    device_id: int = 0
    io_binding: bool | None = None
    cuda_graph: bool | None = None
    cudnn_conv_algo_search: str = "EXHAUSTIVE"
    arena_extend_strategy: str = "kSameAsRequested"
    gpu_mem_limit: int | None = None
    trt_cache_dir: str | None = None
    notes: tuple = field(default=(), init=False, compare=False)  # what was adjusted (threads capped)

    def __post_init__(self):
        if self.graph_optimization not in OPTIMIZATION_LEVELS:
            raise BundleError(f"unknown graph optimisation level {self.graph_optimization!r} "
                              f"(choose from {', '.join(OPTIMIZATION_LEVELS)})")
        for name, allowed in (("cudnn_conv_algo_search", CONV_ALGO_SEARCH), ("arena_extend_strategy", ARENA_EXTEND)):
            if getattr(self, name) not in allowed:
                raise BundleError(f"unknown {name} {getattr(self, name)!r} (choose from {', '.join(allowed)})")
        for name in ("device_id", "gpu_mem_limit"):
            v = getattr(self, name)
            least = 0 if name == "device_id" else 1
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
                raise BundleError(f"{name} must be a {'non-negative' if name == 'device_id' else 'positive'} "
                                  f"integer, got {v!r}")
        if self.cuda_graph and self.io_binding is False:
            raise BundleError("cuda_graph needs io_binding: ONNX Runtime replays a captured graph on fixed device "
                              "buffers, which only IO binding gives")
        if isinstance(self.providers, str):
            object.__setattr__(self, "providers", tuple(p for p in self.providers.split(",") if p))
        elif self.providers is not None:
            object.__setattr__(self, "providers", tuple(self.providers))
        notes = []
        for name in ("threads", "load_threads"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise BundleError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
            if v is not None and v > usable_cores():  # more threads than cores only contend (1000: 50x slower)
                notes.append(f"--{name.replace('_', '-')} {v} capped at the {usable_cores()} usable cores")
                object.__setattr__(self, name, usable_cores())
        object.__setattr__(self, "notes", tuple(notes))

    def apply(self) -> bool:
        """Apply the process-wide options these settings need; -> whether sessions share the
        process's thread pool."""
        return _PROCESS.thread_pool(self.shared_thread_pool, self.threads)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class _ProcessOptions:
    """What this process has set in ONNX Runtime's environment (there is one per process)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.pool_threads: int | None = None  # size of the global pool (0: ONNX Runtime's default)
        self.arena = False

    @property
    def has_pool(self) -> bool:
        return self.pool_threads is not None

    def thread_pool(self, shared: bool | None, threads: int | None) -> bool:
        with self._lock:
            if self.has_pool:
                if shared is False:
                    raise BundleError("this process already shares one ONNX Runtime thread pool between its sessions, "
                                      "and ONNX Runtime refuses sessions with their own pools after that: "
                                      "use shared_thread_pool=True (or None) in this process")
                if threads is not None and threads != self.pool_threads:
                    raise BundleError(f"this process already shares an ONNX Runtime thread pool of "
                                      f"{self.pool_threads or 'the default number of'} threads, which cannot be "
                                      f"resized to {threads}: use the same --threads in one process")
                return True
            if not shared:
                return False
            import onnxruntime.capi._pybind_state as C

            setter = getattr(C, "set_global_thread_pool_sizes", None)
            if setter is None:  # this onnxruntime build cannot: per-session pools
                return False
            try:
                setter(int(threads or 0), 1)
            except Exception as e:  # onnxruntime raises its own exception types
                raise BundleError(f"cannot create the shared ONNX Runtime thread pool: {str(e).splitlines()[0]}") from None
            self.pool_threads = int(threads or 0)
            return True

    def env_arena(self) -> None:
        """One CPU memory arena for every session that asks for it (each stage session would
        otherwise grow its own arena to the size of its activations)."""
        with self._lock:
            if self.arena:
                return
            import onnxruntime as ort

            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
            self.arena = True


_PROCESS = _ProcessOptions()


def process_shares_pool() -> bool:
    """Whether this process has a global ONNX Runtime thread pool (sessions must then use it)."""
    return _PROCESS.has_pool


def use_env_arena() -> None:
    _PROCESS.env_arena()


def share_thread_pool(threads: int | None = None) -> bool:
    """Shorthand kept for scripts: ``RuntimeSettings(threads=threads, shared_thread_pool=True).apply()``.
    Call it before any ONNX Runtime session exists; False when this onnxruntime build cannot."""
    return RuntimeSettings(threads=threads, shared_thread_pool=True).apply()
