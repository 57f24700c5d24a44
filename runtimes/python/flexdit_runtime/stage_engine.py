"""One interface for whatever runs a stage graph, and the registry of engine kinds.

A ``StageEngine`` runs one stage on exactly its static batch. It feeds the graph by the input
and output names the manifest declares (roles by position: latent x, timestep t, class label y;
the model output), and checks at load that the graph it opened declares the same names, shapes
and element types, so a bundle whose manifest and graphs disagree fails with one line instead of
computing garbage. Everything above it (chunking rows into static batches, the sampler) is
engine-agnostic.

An engine kind also declares, on its class, what the rest of the runtime asks of it: which
artifact runs a stage (``choose_artifact``), whether this process can run it (``library``,
``preflight``), the devices it runs on and what ``--device`` makes of it (``devices``,
``default_on``, ``on_device``), whether ``--backend auto`` measures it (``auto``), whether it
keeps the whole trajectory on its device (``keeps_trajectory_on_device``, ``run_trajectory``)
and whether its stages share one loaded graph (``shares_stages``). ``device.resolve``,
``engine_select``, the server's pre-check and ``Model.run`` ask the registry, never a kind by
name, so a new kind is its own module plus one line in ``ENGINE_KINDS``. An engine module
imports its library lazily (in ``library``/``open``): listing the kinds imports every engine
module, and a missing library must cost the others nothing.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod

import numpy as np

from flexdit_bundle.manifest import Bundle, BundleError
from flexdit_bundle.spec import Artifact, Stage
from flexdit_bundle.precision import PrecisionError, canonical

from .settings import RuntimeSettings

# kind -> (artifact backend it runs from the manifest, "module:class" of its StageEngine, or the
# class itself). Modules are imported when the registry is first asked about a kind.
ENGINE_KINDS = {
    "onnx": ("onnx", "flexdit_runtime.ort_engine:OrtStageEngine"),
    "tensorrt": ("tensorrt", "flexdit_runtime.tensorrt_engine:TensorRTStageEngine"),
    "openvino": ("openvino", "flexdit_runtime.openvino_engine:OpenVINOStageEngine"),
    "aoti": ("aoti", "flexdit_runtime.aoti_engine:AotiStageEngine"),
}
DEFAULT_KIND = "onnx"  # what runs a bundle when neither --backend nor --device is given
AUTO = "auto"  # not an engine: per stage, the fastest engine and precision allowed (engine_select)
AUTO_DEVICES = ("cpu",)  # where ``auto`` measures its candidates
DEVICE_NAMES = {"cpu": "CPU", "cuda": "GPU"}


def backend_choices() -> tuple[str, ...]:
    """What ``--backend`` accepts: every engine kind, plus ``auto``."""
    return (*ENGINE_KINDS, AUTO)

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


def engine_kind(kind: str) -> tuple[str, type]:
    """-> (artifact backend, StageEngine class) of an engine kind."""
    if kind not in ENGINE_KINDS:
        raise BundleError(f"unknown backend {kind!r} (choose from {', '.join(backend_choices())})")
    backend, target = ENGINE_KINDS[kind]
    if isinstance(target, str):
        module, name = target.split(":")
        target = getattr(importlib.import_module(module), name)
    return backend, target


def engine_classes() -> list[type]:
    """The StageEngine class of every registered kind, in registry order."""
    return [engine_kind(k)[1] for k in ENGINE_KINDS]


def kinds_on(device: str) -> list[str]:
    """The registered kinds that run on ``device``."""
    return [cls.kind for cls in engine_classes() if device in cls.devices]


def artifact_backend(cls: type) -> str:
    """The manifest backend whose artifacts engine class ``cls`` runs."""
    return ENGINE_KINDS[cls.kind][0] if cls.kind in ENGINE_KINDS else cls.kind


def has_backend(bundle: Bundle, backend: str) -> bool:
    """Whether every stage has an artifact of ``backend``."""
    return all(any(a.backend == backend for a in st.artifacts) for st in bundle.stages)


def default_artifact(bundle: Bundle, st: Stage, backend: str = "onnx", want: str | None = None) -> Artifact:
    """The ``backend`` artifact a stage runs: ``want`` (a precision or the alias ``int8``), else
    the stage's ``default_precision`` (the conversion's policy), else the first one listed."""
    if want is not None:
        try:
            want = canonical(want, backend)
        except PrecisionError as e:
            raise BundleError(str(e)) from None
        return bundle.artifact(st, backend, want)
    default = st.default_precision
    if default and any(a.backend == backend and a.precision == default for a in st.artifacts):
        return bundle.artifact(st, backend, default)
    return bundle.artifact(st, backend)


class NotChosen(Exception):
    """``on_device`` of a kind tried by default (no --backend): why it does not run the bundle
    there, as a clause the caller joins with the other kinds' reasons."""


class StageEngine(ABC):
    """A loaded stage graph. Safe to call from several threads at once (implementations that
    are not must serialise ``run`` themselves)."""

    kind: str = ""
    devices: tuple[str, ...] = ("cpu",)  # where it runs
    default_on: dict = {}  # {device: rank}: tried in rank order for --device without --backend
    auto: bool = False  # a candidate --backend auto measures (on AUTO_DEVICES)
    keeps_trajectory_on_device: bool = False  # Model.run hands whole trajectories to run_trajectory

    # ---- what the kind supports (class-level: asked before anything loads) -----------------

    @classmethod
    def choose_artifact(cls, bundle: Bundle, stage: Stage, want: str | None) -> Artifact:
        """The artifact this kind runs for ``stage`` at precision ``want`` (None: the stage's
        default); BundleError when the bundle has none."""
        return default_artifact(bundle, stage, artifact_backend(cls), want)

    @classmethod
    def library(cls) -> str | None:
        """None when this kind's library can be used by this process, else the one-line reason."""
        return None

    @classmethod
    def preflight(cls, bundle: Bundle, stage: Stage, artifact: Artifact, settings: RuntimeSettings) -> None:
        """Refuse in one line, without loading anything, what ``open`` would refuse on this
        machine: the library missing, hardware or a build the artifact needs and this process
        lacks."""
        why = cls.library()
        if why is not None:
            raise BundleError(why)

    @classmethod
    def on_device(cls, bundle: Bundle, device: str, settings: RuntimeSettings, probes: dict,
                  explicit: bool) -> RuntimeSettings:
        """The settings this kind runs ``bundle`` with on ``device``. ``explicit``: the user named
        this kind (refuse with a BundleError line), else it is tried by default (raise
        ``NotChosen`` with a clause). ``probes``: availability checks replaced by tests."""
        if device in cls.devices:
            return settings
        where = " or ".join(DEVICE_NAMES.get(d, d) for d in cls.devices)
        others = [k for k in kinds_on(device) if k != cls.kind]
        use = f" (leave --backend out, or use {or_list(others)})" if others else ""
        raise BundleError(f"--device {device}: --backend {cls.kind} runs on the {where} only{use}")

    @classmethod
    def shares_stages(cls, settings: RuntimeSettings) -> bool:
        """Whether stages that can share one loaded graph do (``RuntimeSettings.shared_graphs``,
        None: on)."""
        return settings.shared_graphs is not False

    @classmethod
    def run_trajectory(cls, model, request, progress) -> None:
        """Take every remaining step of ``request`` on this kind's device (kinds that declare
        ``keeps_trajectory_on_device``)."""
        raise NotImplementedError(f"{cls.kind} does not keep trajectories on its device")

    # ---- one loaded stage ------------------------------------------------------------------

    def __init__(self, stage: Stage, artifact: Artifact):
        self.stage = stage
        self.artifact = artifact
        self.batch: int = stage.batch
        self.precision: str = artifact.precision
        self.input_names = tuple(e.name for e in stage.inputs)  # (latent, timestep, class label)
        self.output_name: str = stage.outputs[0].name
        self._dtypes = tuple(NUMPY_DTYPES[e.dtype] for e in stage.inputs)

    @classmethod
    @abstractmethod
    def open(cls, bundle: Bundle, stage: Stage, artifact: Artifact, settings: RuntimeSettings, weights) -> "StageEngine":
        """Load ``artifact`` of ``stage``; ``weights`` is the bundle's ``SharedWeights``."""

    @abstractmethod
    def _run(self, feeds: dict) -> np.ndarray:
        """One call of the graph: {input name: array} -> the output named ``self.output_name``."""

    def run(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The model output for exactly ``batch`` rows: latent x, original timesteps t, labels y."""
        arrays = (x, t, y)
        if any(a.shape[0] != self.batch for a in arrays):
            raise ValueError(f"stage {self.stage.id} runs exactly {self.batch} rows per call")
        feeds = {n: np.ascontiguousarray(a, dtype=d) for n, a, d in zip(self.input_names, arrays, self._dtypes)}
        return self._run(feeds)

    def check_graph_io(self, inputs: dict, outputs: dict) -> None:
        """``inputs``/``outputs``: what the loaded graph declares, {name: (dtype, shape)} with
        None for a dimension the graph leaves free. Refuses any disagreement with the manifest."""
        where = f"{self.artifact.path} (stage {self.stage.id})"
        declared = {e.name: (e.dtype, list(e.shape)) for e in self.stage.inputs}
        if set(declared) != set(inputs):
            raise BundleError(f"{where}: the manifest names the inputs {sorted(declared)} but the graph has "
                              f"{sorted(inputs)}; re-run flexdit-export convert")
        if self.output_name not in outputs:
            raise BundleError(f"{where}: the manifest names the output {self.output_name!r} but the graph has "
                              f"{sorted(outputs)}; re-run flexdit-export convert")
        wanted = dict(declared)
        wanted[self.output_name] = (self.stage.outputs[0].dtype, list(self.stage.outputs[0].shape))
        for name, (dtype, shape) in wanted.items():
            g_dtype, g_shape = inputs[name] if name in inputs else outputs[name]
            same_shape = len(g_shape) == len(shape) and all(g is None or g == d for g, d in zip(g_shape, shape))
            if g_dtype != dtype or not same_shape:
                shown = [d if d is not None else "?" for d in g_shape]
                raise BundleError(f"{where}: the manifest declares {name!r} as {dtype} {shape} but the graph has "
                                  f"{g_dtype} {shown}; re-run flexdit-export convert")

    def describe(self) -> dict:
        return {"kind": self.kind, "stage": self.stage.id, "precision": self.precision, "batch": self.batch,
                "path": self.artifact.path, "inputs": list(self.input_names), "output": self.output_name}


def or_list(kinds: list[str]) -> str:
    """["a", "b", "c"] -> "a, b or c"."""
    return kinds[0] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} or {kinds[-1]}"


def auto_kinds() -> list[str]:
    """The kinds ``--backend auto`` may choose from, installed or not."""
    return [cls.kind for cls in engine_classes() if cls.auto]


def installed_kinds() -> list[str]:
    """The kinds ``--backend auto`` may choose from whose library this process has."""
    return [cls.kind for cls in engine_classes() if cls.auto and cls.library() is None]
