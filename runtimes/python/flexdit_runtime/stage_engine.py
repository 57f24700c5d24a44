"""One interface for whatever runs a stage graph, and the registry of engine kinds.

A ``StageEngine`` runs one stage on exactly its static batch. It feeds the graph by the input
and output names the manifest declares (roles by position: latent x, timestep t, class label y;
the model output), and checks at load that the graph it opened declares the same names, shapes
and element types, so a bundle whose manifest and graphs disagree fails with one line instead of
computing garbage. Everything above it (chunking rows into static batches, the sampler) is
engine-agnostic; a new kind is one module with a subclass plus one line in ``ENGINE_KINDS``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod

import numpy as np

from flexdit_bundle.manifest import Bundle, BundleError

from .settings import RuntimeSettings

# kind -> (artifact backend it runs from the manifest, "module:class" of its StageEngine).
# Imported only when chosen, so an engine whose library is absent costs nothing to the others.
ENGINE_KINDS = {
    "onnx": ("onnx", "flexdit_runtime.ort_engine:OrtStageEngine"),
    "tensorrt": ("tensorrt", "flexdit_runtime.tensorrt_engine:TensorRTStageEngine"),
    "openvino": ("openvino", "flexdit_runtime.openvino_engine:OpenVINOStageEngine"),
    "aoti": ("aoti", "flexdit_runtime.aoti_engine:AotiStageEngine"),
}
AUTO = "auto"  # not an engine: per stage, the fastest engine and precision allowed (engine_select)


def backend_choices() -> tuple[str, ...]:
    """What ``--backend`` accepts: every engine kind, plus ``auto``."""
    return (*ENGINE_KINDS, AUTO)

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


def engine_kind(kind: str) -> tuple[str, type]:
    """-> (artifact backend, StageEngine class) of an engine kind."""
    if kind not in ENGINE_KINDS:
        raise BundleError(f"unknown backend {kind!r} (choose from {', '.join(backend_choices())})")
    backend, target = ENGINE_KINDS[kind]
    module, name = target.split(":")
    return backend, getattr(importlib.import_module(module), name)


class StageEngine(ABC):
    """A loaded stage graph. Safe to call from several threads at once (implementations that
    are not must serialise ``run`` themselves)."""

    kind: str = ""

    def __init__(self, stage: dict, artifact: dict):
        self.stage = stage
        self.artifact = artifact
        self.batch: int = stage["batch"]
        self.precision: str = artifact["precision"]
        self.input_names = tuple(e["name"] for e in stage["inputs"])  # (latent, timestep, class label)
        self.output_name: str = stage["outputs"][0]["name"]
        self._dtypes = tuple(NUMPY_DTYPES[e["dtype"]] for e in stage["inputs"])

    @classmethod
    @abstractmethod
    def open(cls, bundle: Bundle, stage: dict, artifact: dict, settings: RuntimeSettings, weights) -> "StageEngine":
        """Load ``artifact`` of ``stage``; ``weights`` is the bundle's ``SharedWeights``."""

    @abstractmethod
    def _run(self, feeds: dict) -> np.ndarray:
        """One call of the graph: {input name: array} -> the output named ``self.output_name``."""

    def run(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The model output for exactly ``batch`` rows: latent x, original timesteps t, labels y."""
        arrays = (x, t, y)
        if any(a.shape[0] != self.batch for a in arrays):
            raise ValueError(f"stage {self.stage['id']} runs exactly {self.batch} rows per call")
        feeds = {n: np.ascontiguousarray(a, dtype=d) for n, a, d in zip(self.input_names, arrays, self._dtypes)}
        return self._run(feeds)

    def check_graph_io(self, inputs: dict, outputs: dict) -> None:
        """``inputs``/``outputs``: what the loaded graph declares, {name: (dtype, shape)} with
        None for a dimension the graph leaves free. Refuses any disagreement with the manifest."""
        where = f"{self.artifact['path']} (stage {self.stage['id']})"
        declared = {e["name"]: (e["dtype"], list(e["shape"])) for e in self.stage["inputs"]}
        if set(declared) != set(inputs):
            raise BundleError(f"{where}: the manifest names the inputs {sorted(declared)} but the graph has "
                              f"{sorted(inputs)}; re-run flexdit-export convert")
        if self.output_name not in outputs:
            raise BundleError(f"{where}: the manifest names the output {self.output_name!r} but the graph has "
                              f"{sorted(outputs)}; re-run flexdit-export convert")
        wanted = dict(declared)
        wanted[self.output_name] = (self.stage["outputs"][0]["dtype"], list(self.stage["outputs"][0]["shape"]))
        for name, (dtype, shape) in wanted.items():
            g_dtype, g_shape = inputs[name] if name in inputs else outputs[name]
            same_shape = len(g_shape) == len(shape) and all(g is None or g == d for g, d in zip(g_shape, shape))
            if g_dtype != dtype or not same_shape:
                shown = [d if d is not None else "?" for d in g_shape]
                raise BundleError(f"{where}: the manifest declares {name!r} as {dtype} {shape} but the graph has "
                                  f"{g_dtype} {shown}; re-run flexdit-export convert")

    def describe(self) -> dict:
        return {"kind": self.kind, "stage": self.stage["id"], "precision": self.precision, "batch": self.batch,
                "path": self.artifact["path"], "inputs": list(self.input_names), "output": self.output_name}
