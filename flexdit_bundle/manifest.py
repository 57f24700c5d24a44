"""Read and trust-check a bundle: schema, format version, stage coverage, file checksums.

This module is the bundle format for Python: the compiler validates what it writes with the
same schema, and every runtime path goes through ``load_bundle``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import schema_check
from .files import OutsideError, resolve_inside, sha256_file
from .spec import (Artifact, Decoder, Diffusion, Manifest, Model, ModelConfig, Output, SamplingDefaults, SharedGraph, Stage,
                   WeightFile)

FORMAT_NAME, FORMAT_VERSION = "flexdit-bundle", 2
# Migration rule: a v1 bundle (every graph self-contained, no ``weights``) is a valid v2 bundle
# with no shared weight files, so it loads unchanged. Anything newer is refused.
READABLE_VERSIONS = (1, 2)

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int32": 4, "int64": 8, "bool": 1}
MANIFEST = "manifest.json"

# What a runtime samples with when neither the bundle nor the caller says otherwise.
SAMPLING_DEFAULTS = {"sampler": "ddpm", "steps": 250, "cfg_scale": 4.0, "eta": 0.0, "clip_denoised": False}

# Numeric rules a schema cannot state (docs/bundle-format.md, "Numeric ranges"); the C++ runtime
# holds the same constants (runtimes/cpp/src/manifest.cpp).
MIN_BETA = 1e-10  # smaller scaled betas leave 1 - beta == 1 (or nearly) and the tables divide by zero
MIN_ALPHAS_CUMPROD = 1e-30  # below it 1 / sqrt(alphas_cumprod) and the update overflow float32
MIN_VALUE_SPAN = 1e-6  # hi - lo of output.value_range


from .errors import BundleError  # noqa: E402,F401  (defined with the other user errors; re-exported here)


def schema() -> dict:
    return json.loads(resources.files(__package__).joinpath("manifest.schema.json").read_text())


def validate_manifest(m: dict | Manifest) -> Manifest:
    """Schema plus the rules a schema cannot say (coverage of timesteps, unique ids); -> the
    typed manifest. The schema is checked on the JSON form, before the types are built from it."""
    d = m.to_json() if isinstance(m, Manifest) else m
    try:
        schema_check.validate(d, schema())
    except schema_check.SchemaError as e:
        where = "/".join(str(p) for p in e.path) or "(top)"
        raise BundleError(f"manifest does not match the schema at {where}: {e.message[:200]}") from None
    m = Manifest.from_json(d)
    version = m.format.version
    if version > FORMAT_VERSION:
        raise BundleError(f"bundle format version {version} is newer than this runtime supports "
                          f"({FORMAT_VERSION}); upgrade flexdit-export")
    if version not in READABLE_VERSIONS:
        raise BundleError(f"bundle format version {version} is no longer supported; re-convert the checkpoint "
                          "with flexdit-export convert")
    _validate_weights(m)
    _validate_model(m.model)
    _validate_diffusion(m.diffusion)
    _validate_output(m.output)
    for st in m.stages:
        _validate_stage_io(st, m.model.config)
    if m.decoder and (len(m.decoder.inputs) != 1 or len(m.decoder.outputs) != 1):
        raise BundleError("the decoder must declare exactly one input and one output")
    T = m.diffusion.num_timesteps
    seen = [0] * T
    for st in m.stages:
        if not st.t_min <= st.t_max < T:
            raise BundleError(f"stage {st.id} range [{st.t_min}, {st.t_max}] is outside 0..{T - 1}")
        for t in range(st.t_min, st.t_max + 1):
            seen[t] += 1
    if any(c != 1 for c in seen):
        bad = next(t for t, c in enumerate(seen) if c != 1)
        raise BundleError(f"stages do not cover timesteps 0..{T - 1} exactly once (timestep {bad})")
    if sorted(s.id for s in m.stages) != list(range(len(m.stages))):
        raise BundleError("stage ids must be 0..n-1")
    return m


def _validate_model(model: Model) -> None:
    """Class ids the runtime will feed the graph: 0..num_classes-1 and the null class."""
    n = model.num_classes
    if model.config.num_classes != n:
        raise BundleError(f"model num_classes {n} disagrees with its config ({model.config.num_classes})")
    if not 0 <= model.null_class <= n:
        raise BundleError(f"null class {model.null_class} is outside 0..{n} (the model has {n} classes)")
    if model.null_class != n:
        raise BundleError(f"null class {model.null_class} is one of the real classes 0..{n - 1}: the unconditional "
                          f"half of guidance would use that class (the null class is {n})")
    names = model.class_names
    if names is not None and len(names) != n:
        raise BundleError(f"the manifest lists {len(names)} class names for {n} classes")


def _validate_diffusion(d: Diffusion) -> None:
    """The linear schedule must give finite sampler tables: every beta (scaled by 1000 / T) in
    [MIN_BETA, 1), and alphas_cumprod at the last timestep at least MIN_ALPHAS_CUMPROD."""
    T = d.num_timesteps
    for name, given in (("beta_start", d.beta_start), ("beta_end", d.beta_end)):
        b = given * 1000 / T
        if not MIN_BETA <= b < 1:
            raise BundleError(f"diffusion {name} {given} gives the beta {b:g} at T = {T} (betas are scaled by "
                              f"1000 / T); the linear schedule's betas must lie in [{MIN_BETA:g}, 1)")
    b0, b1 = d.beta_start * 1000 / T, d.beta_end * 1000 / T
    step = (b1 - b0) / (T - 1)
    log_ac = math.fsum(math.log1p(-(b0 + i * step)) for i in range(T))
    if log_ac < math.log(MIN_ALPHAS_CUMPROD):
        raise BundleError(f"diffusion betas {b0:g}..{b1:g} over {T} timesteps leave alphas_cumprod "
                          f"10^{log_ac / math.log(10):.1f} at the last timestep, below {MIN_ALPHAS_CUMPROD:g}: the "
                          "sampler's coefficients would overflow float32")
    steps = d.defaults.steps if d.defaults else None
    if steps is not None and steps > T:
        raise BundleError(f"diffusion defaults.steps {steps} is more than num_timesteps {T}")


def _validate_output(out: Output) -> None:
    """value_range maps the result to pixels 0..255: lo < hi, and not so close that it overflows."""
    lo, hi = out.value_range
    if not hi - lo >= MIN_VALUE_SPAN:
        raise BundleError(f"output value_range [{lo}, {hi}] must have lo < hi, hi - lo at least {MIN_VALUE_SPAN:g}")


def _validate_stage_io(st: Stage, cfg: ModelConfig) -> None:
    """A stage graph takes (latent x, timestep t, class label y) and returns the model output,
    all with the stage's static batch as the leading dimension; the runtime pads every call to
    that batch, so it must be the graph's (a wrong batch would size its buffers)."""
    where = f"stage {st.id}"
    ins, outs = st.inputs, st.outputs
    if len(ins) != 3 or len(outs) < 1:
        raise BundleError(f"{where} must declare 3 inputs (latent, timestep, class label) and an output, "
                          f"not {len(ins)} and {len(outs)}")
    names = [e.name for e in ins + outs]
    if len(set(names)) != len(names):
        raise BundleError(f"{where} declares a tensor name twice: {names}")
    B, C, H = st.batch, cfg.in_channels, cfg.input_size
    expect = [(ins[0], [B, C, H, H]), (ins[1], [B]), (ins[2], [B]), (outs[0], [B, cfg.out_channels, H, H])]
    for e, shape in expect:
        if list(e.shape) != shape:
            raise BundleError(f"{where} declares {e.name!r} with shape {list(e.shape)}, but batch {B} and the model "
                              f"config make it {shape}")


def _validate_weights(m: Manifest) -> None:
    """Shared weight files: unique ids, tensors inside their file with the bytes their dtype and
    shape need, and every artifact binding pointing at a tensor that exists."""
    files = {}
    for w in m.weights or ():
        if m.format.version < 2:
            raise BundleError("a format v1 manifest cannot have shared weight files")
        if w.id in files:
            raise BundleError(f"weight file id {w.id!r} appears twice")
        files[w.id] = w
        align = w.alignment or 1
        for i, t in enumerate(w.tensors):
            n = DTYPE_BYTES[t.dtype]
            for d in t.shape:
                n *= d
            if n != t.bytes or t.offset + t.bytes > w.bytes or t.offset % align:
                raise BundleError(f"weight file {w.path}: tensor {i} ({t.dtype} {list(t.shape)} at {t.offset}, "
                                  f"{t.bytes} bytes) does not fit the file; re-run flexdit-export convert")
    for entry in m.graph_entries:
        for a in entry.artifacts:
            ref = a.weights
            if ref is None:
                continue
            w = files.get(ref.file)
            if w is None:
                raise BundleError(f"{a.path} uses weight file {ref.file!r}, which the manifest does not list")
            bad = [k for k, i in ref.bindings.items() if i >= len(w.tensors)]
            if bad:
                raise BundleError(f"{a.path} binds {bad[0]!r} to a tensor that {w.path} does not have")
    _validate_shared_graphs(m, files)


def _validate_shared_graphs(m: Manifest, files: dict) -> None:
    """Shared graphs: unique ids, their weight file listed, every binding and stage constant a
    tensor of it, and each names exactly the stages whose artifacts point at it."""
    graphs = {}
    for g in m.shared_graphs or ():
        if m.format.version < 2:
            raise BundleError("a format v1 manifest cannot have shared graphs")
        if g.id in graphs:
            raise BundleError(f"shared graph id {g.id!r} appears twice")
        graphs[g.id] = g
        w = files.get(g.weights.file)
        if w is None:
            raise BundleError(f"{g.path} uses weight file {g.weights.file!r}, which the manifest does not list")
        if any(i >= len(w.tensors) for i in g.weights.bindings.values()):
            raise BundleError(f"{g.path} binds an initializer to a tensor that {w.path} does not have")
    users = {gid: [] for gid in graphs}
    for st in m.stages:
        for a in st.artifacts:
            ref = a.shared_graph
            if ref is None:
                continue
            g = graphs.get(ref.id)
            if g is None or a.backend != "onnx" or a.precision != g.precision:
                raise BundleError(f"{a.path} names shared graph {ref.id!r}, which the manifest does not list "
                                  "for its backend and precision")
            tensors = files[g.weights.file].tensors
            if sorted(ref.inputs) != sorted(g.stage_inputs) or any(i >= len(tensors) for i in ref.inputs.values()):
                raise BundleError(f"{a.path}: its shared-graph inputs do not match {g.path}'s stage inputs")
            users[ref.id].append(st.id)
    for gid, stages in users.items():
        if sorted(stages) != sorted(graphs[gid].stages):
            raise BundleError(f"shared graph {gid!r} lists stages {list(graphs[gid].stages)}, but stages {stages} use it")


def stage_for(stages, t: int):
    """The stage entry whose [t_min, t_max] holds original timestep ``t`` (typed stages, or the
    JSON dicts of a manifest not yet loaded)."""
    for st in stages:
        typed = st if isinstance(st, Stage) else Stage.from_json(st)
        if typed.serves(t):
            return st
    raise BundleError(f"no stage serves timestep {t}")


@dataclass
class Bundle:
    """A bundle directory and its typed manifest (a dict given here is read with ``from_json``)."""

    root: Path
    manifest: Manifest

    def __post_init__(self):
        if not isinstance(self.manifest, Manifest):
            self.manifest = Manifest.from_json(self.manifest)

    @property
    def stages(self) -> tuple[Stage, ...]:
        return self.manifest.stages

    @property
    def model(self) -> Model:
        return self.manifest.model

    @property
    def diffusion(self) -> Diffusion:
        return self.manifest.diffusion

    @property
    def decoder(self) -> Decoder | None:
        return self.manifest.decoder

    def artifact(self, entry: Stage | Decoder, backend: str = "onnx", precision: str | None = None) -> Artifact:
        """The artifact of a stage (or the decoder) for a backend and precision
        (None: the first one listed for the backend)."""
        for a in entry.artifacts:
            if a.backend == backend and (precision is None or a.precision == precision):
                return a
        have = ", ".join(f"{a.backend}/{a.precision}" for a in entry.artifacts)
        want = backend + (f"/{precision}" if precision else "")
        what = f"stage {entry.id}" if isinstance(entry, Stage) else "this graph"
        hint = "" if backend != "onnx" else "; build it with flexdit-export convert --precision/--extra-precisions"
        if backend == "tensorrt":
            hint = "; build engines with flexdit-export engines BUNDLE"
        raise BundleError(f"bundle has no {want} artifact for {what} (it has: {have}){hint}")

    def path(self, artifact) -> Path:
        """The file of an artifact (or of any manifest entry with a ``path``), confined to the bundle."""
        try:
            return resolve_inside(self.root, artifact.path)
        except OutsideError as e:
            raise BundleError(f"{e}; refusing to read it") from None

    def stage_for(self, t: int) -> Stage:
        """The stage that serves original timestep ``t``."""
        return stage_for(self.stages, t)

    @property
    def sampling_defaults(self) -> SamplingDefaults:
        """The bundle's defaults with every one it leaves out taken from ``SAMPLING_DEFAULTS``."""
        own = self.diffusion.defaults
        return SamplingDefaults(**{k: v if own is None or getattr(own, k) is None else getattr(own, k)
                                   for k, v in SAMPLING_DEFAULTS.items()})

    @property
    def weight_files(self) -> dict[str, WeightFile]:
        """Shared weight files by id (format v2; empty for self-contained graphs)."""
        return {w.id: w for w in self.manifest.weights or ()}

    @property
    def shared_graphs(self) -> dict[str, SharedGraph]:
        """Graphs shared by several stages, by id (optional; see ``add_shared_graphs`` in the compiler)."""
        return {g.id: g for g in self.manifest.shared_graphs or ()}

    def all_files(self):
        """Every file entry the manifest checksums: shared weight files, shared graphs, graphs, external data."""
        yield from self.manifest.weights or ()
        yield from self.manifest.shared_graphs or ()
        for entry in self.manifest.graph_entries:
            for a in entry.artifacts:
                yield a
                if a.external_data is not None:
                    yield a.external_data


def _finite(text: str) -> float:
    f = float(text)
    if not math.isfinite(f):
        raise ValueError(f"the number {text[:40]} is out of range (a manifest holds finite numbers)")
    return f


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (a manifest holds finite numbers)")


def _integer(text: str):
    """A JSON integer as a 64-bit reader (the C++ runtime's) takes it: beyond the 64-bit range it
    is a float, so a 5000-digit literal is refused like 1e999 instead of reaching int()."""
    if len(text) <= 20:
        v = int(text)
        if -2**63 <= v < 2**64:
            return v
    return _finite(text)


def parse_manifest(text: str) -> dict:
    """JSON text -> manifest. Stricter than ``json.loads``: NaN, Infinity and numbers that
    overflow to infinity are refused (Python's json accepts them, other languages' do not), a
    byte-order mark is refused (JSON has none; every runtime says so alike), and a document
    nested too deeply for the parser is one error, not a RecursionError."""
    if text.startswith("\ufeff"):
        raise ValueError("it starts with a byte-order mark, which JSON does not allow (save it as UTF-8 without one)")
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite, parse_int=_integer)
    except RecursionError:
        raise ValueError("it is nested too deeply to be a manifest") from None


def load_bundle(path, verify_checksums: bool = True, defer_weights: bool = False) -> Bundle:
    """Read, validate and (by default) checksum a bundle. ``defer_weights``: check only the size
    of shared weight files here, because the caller hashes the bytes it reads from them
    (``flexdit_runtime.weights``: one read, one hash, no window between check and use)."""
    root = Path(path)
    mf = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"bundle directory not found: {root}")
    if not mf.is_file():
        raise BundleError(f"{root} is not a bundle: {MANIFEST} is missing")
    try:
        m = parse_manifest(mf.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise BundleError(f"cannot read {mf}: {e}") from None
    if not isinstance(m, dict) or m.get("format", {}).get("name") != FORMAT_NAME:
        raise BundleError(f"{mf} is not a {FORMAT_NAME} manifest")
    bundle = Bundle(root, validate_manifest(m))
    if verify_checksums:
        deferred = {id(w) for w in bundle.manifest.weights or ()} if defer_weights else set()
        for a in bundle.all_files():
            f = bundle.path(a)
            if not f.is_file():
                raise BundleError(f"bundle file missing: {a.path} (the bundle is incomplete; re-run flexdit-export convert)")
            if id(a) in deferred:
                if f.stat().st_size != a.bytes:
                    raise BundleError(f"checksum mismatch for {a.path}: the bundle was modified or truncated; "
                                      "re-run flexdit-export convert")
                continue
            if sha256_file(f) != a.sha256:
                raise BundleError(f"checksum mismatch for {a.path}: the bundle was modified or truncated; "
                                  "re-run flexdit-export convert")
    return bundle
