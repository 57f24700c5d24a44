"""The manifest as typed, immutable values: one frozen dataclass per object of
``manifest.schema.json`` (tests/bundle/test_bundle_types.py checks that fields and schema agree).

``Manifest.from_json`` turns a validated manifest dict into these types once; ``to_json`` gives
the dict back, equal to what was read and in the same key order, so a bundle rewritten from the
types is byte-identical. Keys the schema does not name (the compiler's informational extras, the
model config's architecture details) are kept in ``extra`` and written back in place.

Sequences are tuples; objects the schema leaves free-form (``parity``, ``source``, ``quality``,
initializer bindings...) stay plain dicts, copied on the way in and out. Two nodes are equal
when their fields and extras are (the key order read does not count).

Nodes are read by attribute only: they are no mappings (``x["batch"]`` is a TypeError) and equal
no dict, so the manifest's JSON keys live here and in the schema, not in the code that reads it.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

_REQ = "required"
_KIND = "kind"
_NULL = "nullable"


def req(kind=None, nullable: bool = False):
    """A property the schema requires (``nullable``: it may be JSON null)."""
    return field(metadata={_REQ: True, _KIND: kind, _NULL: nullable})


def opt(kind=None, nullable: bool = False):
    """A property the schema allows to be absent (None here, and then absent from ``to_json``)."""
    return field(default=None, metadata={_REQ: False, _KIND: kind, _NULL: nullable})


class Seq:
    """Field kind: a JSON array, held as a tuple (of ``item`` nodes when ``item`` is a Node type)."""

    def __init__(self, item=None):
        self.item = item


OBJ = "object"  # field kind: a free-form JSON object, held as a dict


def _read(kind, v):
    if v is None:
        return None
    if isinstance(kind, type) and issubclass(kind, Node):
        return kind.from_json(v)
    if isinstance(kind, Seq):
        return tuple(_read(kind.item, x) for x in v)
    return copy.deepcopy(v) if isinstance(v, (dict, list)) else v


def _write(v):
    if isinstance(v, Node):
        return v.to_json()
    if isinstance(v, tuple):
        return [_write(x) for x in v]
    if isinstance(v, (dict, list)):
        return copy.deepcopy(v)
    return v


@dataclass(frozen=True, kw_only=True, eq=False)
class Node:
    """Base of every manifest object: JSON round trip, unknown keys kept."""

    extra: dict = field(default_factory=dict, metadata={_KIND: "extra"})
    """Keys the schema does not name, with their JSON values, as read."""
    key_order: tuple | None = field(default=None, compare=False, repr=False, metadata={_KIND: "extra"})
    """The keys as read, in order (None when built in code: schema fields first, then ``extra``)."""

    @classmethod
    def props(cls) -> dict:
        """JSON key -> dataclass field, for the schema's properties of this object."""
        got = cls.__dict__.get("_props")
        if got is None:
            got = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get(_KIND) != "extra"}
            cls._props = got
        return got

    @classmethod
    def from_json(cls, d: dict):
        """A validated JSON object -> this node (nested objects and arrays converted too)."""
        if isinstance(d, cls):
            return d
        props = cls.props()
        values = {k: _read(f.metadata[_KIND], d[k]) for k, f in props.items() if k in d}
        extra = {k: copy.deepcopy(v) for k, v in d.items() if k not in props}
        return cls(**values, extra=extra, key_order=tuple(d))

    def _present(self, key: str) -> bool:
        """Required fields always; optional ones when set, or when null was read and is allowed."""
        f = self.props()[key]
        if f.metadata[_REQ] or getattr(self, key) is not None:
            return True
        return f.metadata[_NULL] and self.key_order is not None and key in self.key_order

    def _keys(self):
        props = self.props()
        order = list(self.key_order) if self.key_order is not None else list(props) + list(self.extra)
        seen = set(order)
        order += [k for k in props if k not in seen] + [k for k in self.extra if k not in seen]
        for k in order:
            if (k in props and self._present(k)) or (k not in props and k in self.extra):
                yield k

    def to_json(self) -> dict:
        """The JSON object again: ``to_json(from_json(d)) == d``, keys in the order read."""
        props = self.props()
        return {k: _write(getattr(self, k)) if k in props else copy.deepcopy(self.extra[k]) for k in self._keys()}

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self.extra == other.extra and all(getattr(self, k) == getattr(other, k) for k in self.props())

    __hash__ = None  # free-form parts are dicts


@dataclass(frozen=True, kw_only=True, eq=False)
class Format(Node):
    name: str = req()
    version: int = req()


@dataclass(frozen=True, kw_only=True, eq=False)
class CreatedBy(Node):
    """The writer's name and version; library versions it used are in ``extra``."""
    tool: str = req()


@dataclass(frozen=True, kw_only=True, eq=False)
class ModelConfig(Node):
    """What a runtime needs of the architecture; the rest of the compiler's config is in ``extra``."""
    hidden_size: int = req()
    num_heads: int = req()
    patch_size: int = req()
    input_size: int = req()
    in_channels: int = req()
    learn_sigma: bool = req()
    num_classes: int = req()
    depth: int = req()

    @property
    def out_channels(self) -> int:
        """Channels of the model output: eps, plus the variance interpolation when learned."""
        return 2 * self.in_channels if self.learn_sigma else self.in_channels


@dataclass(frozen=True, kw_only=True, eq=False)
class Model(Node):
    family: str = req()
    name: str = req()
    config: ModelConfig = req(ModelConfig)
    num_classes: int = req()
    null_class: int = req()
    class_names: tuple | None = req(Seq(), nullable=True)
    source: dict | None = opt(OBJ)


@dataclass(frozen=True, kw_only=True, eq=False)
class SamplingDefaults(Node):
    """The bundle's own sampling defaults; each absent one falls back to ``SAMPLING_DEFAULTS``."""
    sampler: str | None = opt()
    steps: int | None = opt()
    cfg_scale: float | None = opt()
    eta: float | None = opt()
    clip_denoised: bool | None = opt()


@dataclass(frozen=True, kw_only=True, eq=False)
class Diffusion(Node):
    num_timesteps: int = req()
    beta_schedule: str = req()
    beta_start: float = req()
    beta_end: float = req()
    variance_type: str = req()
    prediction_type: str = req()
    cfg_channels: str = req()
    defaults: SamplingDefaults | None = opt(SamplingDefaults)


@dataclass(frozen=True, kw_only=True, eq=False)
class TensorSpec(Node):
    """A graph input or output: bound by name, static shape."""
    name: str = req()
    shape: tuple = req(Seq())
    dtype: str = req()


@dataclass(frozen=True, kw_only=True, eq=False)
class ExternalData(Node):
    path: str = req()
    sha256: str = req()
    bytes: int | None = opt()


@dataclass(frozen=True, kw_only=True, eq=False)
class Optimization(Node):
    level: str = req()
    onnxsim: bool | None = opt()
    nodes_before: int = req()
    nodes_after: int = req()


@dataclass(frozen=True, kw_only=True, eq=False)
class Quantization(Node):
    mode: str = req()
    calibration_sha256: str | None = opt()
    op_types: tuple | None = opt(Seq())
    include: tuple | None = opt(Seq())
    exclude: tuple | None = opt(Seq())


@dataclass(frozen=True, kw_only=True, eq=False)
class MeasuredOn(Node):
    arch: str = req()
    features: tuple = req(Seq())


@dataclass(frozen=True, kw_only=True, eq=False)
class ArtifactError(Node):
    """Error against the fp32 graph; the measured numbers (rel_rms, ...) are in ``extra``."""
    measured_on: MeasuredOn | None = opt(MeasuredOn)


@dataclass(frozen=True, kw_only=True, eq=False)
class Check(Node):
    status: str = req()
    by: str | None = opt()
    reason: str | None = opt()


@dataclass(frozen=True, kw_only=True, eq=False)
class TensorRTInfo(Node):
    tensorrt_version: str = req()
    compute_capability: str = req()
    cache_key: str = req()
    strongly_typed: bool | None = opt()


@dataclass(frozen=True, kw_only=True, eq=False)
class AOTICompat(Node):
    key: str = req()
    torch: str = req()
    cuda: str | None = opt(nullable=True)
    compute_capability: str | None = opt()
    cpu_isa: str | None = opt()


@dataclass(frozen=True, kw_only=True, eq=False)
class AOTIInfo(Node):
    device: str = req()
    compat: AOTICompat = req(AOTICompat)
    recipe: str | None = opt()


@dataclass(frozen=True, kw_only=True, eq=False)
class WeightBindings(Node):
    """Initializer (or AOTI constant) name -> index into the tensors of shared weight file ``file``."""
    file: str = req()
    bindings: dict = req(OBJ)


@dataclass(frozen=True, kw_only=True, eq=False)
class SharedGraphRef(Node):
    """An artifact's way into a shared graph: its id, and the tensor feeding each stage input."""
    id: str = req()
    inputs: dict = req(OBJ)


@dataclass(frozen=True, kw_only=True, eq=False)
class Artifact(Node):
    """One file that implements a stage (or the decoder) for one backend and precision."""
    backend: str = req()
    precision: str = req()
    path: str = req()
    sha256: str = req()
    bytes: int | None = opt()
    opset: int | None = opt()
    external_data: ExternalData | None = opt(ExternalData)
    source_sha256: str | None = opt()
    optimization: Optimization | None = opt(Optimization)
    fp32_islands: dict | None = opt(OBJ)
    quantization: Quantization | None = opt(Quantization)
    error: ArtifactError | None = opt(ArtifactError)
    check: Check | None = opt(Check)
    tensorrt: TensorRTInfo | None = opt(TensorRTInfo)
    aoti: AOTIInfo | None = opt(AOTIInfo)
    weights: WeightBindings | None = opt(WeightBindings)
    shared_graph: SharedGraphRef | None = opt(SharedGraphRef)


@dataclass(frozen=True, kw_only=True, eq=False)
class Stage(Node):
    """The graphs that serve original timesteps t_min..t_max at a static batch."""
    id: int = req()
    t_min: int = req()
    t_max: int = req()
    sparse_grid: int | None = req(nullable=True)
    tokens: int = req()
    batch: int = req()
    inputs: tuple = req(Seq(TensorSpec))
    outputs: tuple = req(Seq(TensorSpec))
    artifacts: tuple = req(Seq(Artifact))
    parity: dict | None = opt(OBJ)
    macs: int | None = opt()
    default_precision: str | None = opt()

    def serves(self, t: int) -> bool:
        return self.t_min <= t <= self.t_max


@dataclass(frozen=True, kw_only=True, eq=False)
class Decoder(Node):
    kind: str = req()
    scale_factor: float = req()
    inputs: tuple = req(Seq(TensorSpec))
    outputs: tuple = req(Seq(TensorSpec))
    artifacts: tuple = req(Seq(Artifact))
    parity: dict | None = opt(OBJ)


@dataclass(frozen=True, kw_only=True, eq=False)
class Output(Node):
    space: str = req()
    value_range: tuple = req(Seq())


@dataclass(frozen=True, kw_only=True, eq=False)
class CalibrationStage(Node):
    id: int = req()
    t_values: tuple | None = opt(Seq())
    calib_rows: int = req()
    holdout_rows: int = req()


@dataclass(frozen=True, kw_only=True, eq=False)
class Calibration(Node):
    sha256: str = req()
    method: str | None = opt()
    settings: dict = req(OBJ)
    stages: tuple = req(Seq(CalibrationStage))


@dataclass(frozen=True, kw_only=True, eq=False)
class WeightTensor(Node):
    """One raw tensor in a shared weight file: little-endian, C order, no header."""
    offset: int = req()
    bytes: int = req()
    dtype: str = req()
    shape: tuple = req(Seq())


@dataclass(frozen=True, kw_only=True, eq=False)
class WeightFile(Node):
    """A file of raw tensors shared by the graphs of one precision (format v2)."""
    id: str = req()
    path: str = req()
    sha256: str = req()
    bytes: int = req()
    alignment: int | None = opt()
    tensors: tuple = req(Seq(WeightTensor))


@dataclass(frozen=True, kw_only=True, eq=False)
class Verified(Node):
    graph_optimization: str = req()
    threads: tuple | None = opt(Seq())
    onnxruntime: str | None = opt()


@dataclass(frozen=True, kw_only=True, eq=False)
class SharedGraph(Node):
    """One ONNX graph standing for several node-identical stage graphs of a precision."""
    id: str = req()
    precision: str = req()
    path: str = req()
    sha256: str = req()
    bytes: int = req()
    opset: int | None = opt()
    stages: tuple = req(Seq())
    stage_inputs: tuple = req(Seq())
    verified: Verified = req(Verified)
    weights: WeightBindings = req(WeightBindings)


@dataclass(frozen=True, kw_only=True, eq=False)
class Manifest(Node):
    """A bundle's manifest.json. Build it from a validated dict with ``from_json``."""
    format: Format = req(Format)
    created_by: CreatedBy = req(CreatedBy)
    model: Model = req(Model)
    diffusion: Diffusion = req(Diffusion)
    stages: tuple = req(Seq(Stage))
    decoder: Decoder | None = req(Decoder, nullable=True)
    output: Output = req(Output)
    calibration: Calibration | None = opt(Calibration, nullable=True)
    quality: dict | None = opt(OBJ, nullable=True)
    weights: tuple | None = opt(Seq(WeightFile))
    shared_graphs: tuple | None = opt(Seq(SharedGraph))

    @property
    def graph_entries(self) -> tuple:
        """The stages, then the decoder when there is one: every entry with artifacts."""
        return self.stages + ((self.decoder,) if self.decoder is not None else ())


def field_kind(cls, name: str) -> Any:
    """How a field is held (a Node type, a ``Seq``, ``OBJ`` or None for a JSON scalar); for tests."""
    return cls.props()[name].metadata[_KIND]


def is_required(cls, name: str) -> bool:
    return cls.props()[name].metadata[_REQ]


def is_nullable(cls, name: str) -> bool:
    return cls.props()[name].metadata[_NULL]
