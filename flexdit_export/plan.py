"""Options -> plan: every choice of a conversion resolved and checked once, before anything is
exported or captured. A bad option ends here, as one ``UserError`` line, with nothing written;
the builders then only read the plan."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

import torch

from flexdit_bundle.manifest import SAMPLING_DEFAULTS
from flexdit_bundle.precision import PRECISIONS, PrecisionError, canonical, parse_policy

from .builders import builder_for
from .bundle import check_target
from .checkpoints import Checkpoint, check_model_overrides, load_checkpoint
from .classnames import choose_class_names
from .errors import OptionError, UserError
from .export import check_opset
from .optimize import LEVELS
from .options import ConvertOptions
from .quantize import (CALIB_METHODS, DEFAULT_ERROR_TOL, check_layer_patterns, island_layer_patterns, layer_matches,
                       parse_islands, resolve_exclude)
from .schedule import Stage, check_explicit, parse_schedule, untrained_grids

FORMATS = ("onnx", "torchscript")
BACKENDS = ("onnx", "tensorrt", "openvino", "aoti")
AOTI_DEVICES = ("cpu", "cuda")
OPENVINO_MADE = ("int8-static",)  # with --backend openvino, NNCF makes these from the fp32 graph (not ONNX Runtime)


@dataclass(frozen=True)
class QuantSelection:
    """Which layers the lower-precision graphs touch, resolved against the model."""
    op_types: tuple
    include: tuple
    exclude: tuple  # default patterns (where the model has such layers) + the user's own
    islands: tuple  # what fp16 graphs keep in fp32
    calib_method: str


@dataclass(frozen=True)
class CalibrationChoice:
    """Where the stage calibration rows come from: an existing set (opened and matched to this
    model and schedule), or a capture with these settings into ``target`` (reused when a set
    made with exactly the same settings is there)."""
    existing: object | None  # calib.CalibSet
    settings: object | None  # calib.capture.CaptureSettings
    target: Path


@dataclass(frozen=True)
class ConvertPlan:
    ckpt_path: Path
    out: Path
    force: bool
    checkpoint: Checkpoint
    model: torch.nn.Module
    class_names: list | None
    stages: tuple  # schedule.Stage, in stage-id order
    batch: int
    opset: int
    seed: int
    parity_tol: float
    parity_trials: int
    num_timesteps: int
    cfg_channels: str
    sampling_defaults: MappingProxyType
    policy: MappingProxyType  # stage id -> precision the runtime loads by default
    builds: MappingProxyType  # stage id -> ((backend, precision), ...) in build order
    optimize: bool
    optimize_level: str
    onnxsim: bool
    quant: QuantSelection
    error_tols: MappingProxyType  # precision -> max relative RMS error vs the fp32 graph (held out)
    calibration: CalibrationChoice | None  # None: every stage is fp32 only
    decoder: torch.nn.Module | None  # the VAE decoder, or None (pixel space / latents out)
    backend: str
    tensorrt_env: MappingProxyType | None
    engine_cache: str | None
    timing_cache: str | None
    gates: tuple  # quality_gates.QualityGate
    device: str | None = None  # --backend aoti: the device the packages are compiled for

    @property
    def cfg(self):
        return self.checkpoint.config

    @property
    def stage_dicts(self) -> list[dict]:
        return [{"id": sid, **st.to_dict()} for sid, st in enumerate(self.stages)]


def default_cfg_channels(cfg) -> str:
    """Guidance on the first 3 channels for latent models (the DiT reference), else on all eps channels."""
    return "first3" if cfg.in_channels >= 4 else "eps"


def sampling_defaults(ck, overrides: dict) -> dict:
    """The sampler settings a bundle records (and calibration trajectories use by default)."""
    return {**SAMPLING_DEFAULTS, **ck.sampling_defaults, **overrides}


def resolve_schedule(ck, spec: str | None, num_timesteps: int) -> list[Stage]:
    check_explicit(spec)
    cfg = ck.config
    return parse_schedule(spec or ck.trained_schedule or "released", T=num_timesteps, grid=cfg.grid, family=cfg.family,
                          semantic_size=cfg.semantic_size)


def schedule_warnings(ck, stages: list[Stage], num_timesteps: int) -> list[str]:
    """A note when the schedule uses sparse grids the checkpoint was not trained with."""
    if not ck.trained_schedule:
        return []
    cfg = ck.config
    try:
        trained = parse_schedule(ck.trained_schedule, T=num_timesteps, grid=cfg.grid, family=cfg.family,
                                 semantic_size=cfg.semantic_size)
    except UserError:
        return []
    new = untrained_grids(stages, trained)
    if not new:
        return []
    known = sorted({st.sparse_grid for st in trained if st.sparse_grid is not None})
    return [f"the schedule uses sparse grid(s) s={','.join(map(str, new))}, but the checkpoint was trained "
            f"with s={','.join(map(str, known))} ({ck.trained_schedule}); expect lower quality (leave --schedule out "
            "for the trained one)"]


def check_sampling_defaults(defaults: dict, num_timesteps: int) -> None:
    """--default-steps / --default-cfg-scale become manifest values: finite and in range (a
    NaN would be written as a bare NaN token, which is not JSON)."""
    steps = defaults.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_timesteps):
        raise UserError(f"--default-steps must be in 1..{num_timesteps}, got {steps}")
    cfg = defaults.get("cfg_scale")
    if cfg is not None:
        if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg):
            raise UserError(f"--default-cfg-scale must be a finite number, got {cfg}")
        if cfg < 0:
            raise UserError(f"--default-cfg-scale must be at least 0, got {cfg:g}")


def check_recorded_sampling(ckpt_path, defaults: dict, num_timesteps: int) -> None:
    """The checkpoint's recorded sampling settings become manifest values too: checked against the
    manifest schema here, naming the checkpoint, instead of failing as an invalid manifest after
    the whole export."""
    from flexdit_bundle.manifest import schema as manifest_schema
    from flexdit_bundle.schema_check import SchemaError, validate

    schema = manifest_schema()
    try:
        validate(dict(defaults), schema["properties"]["diffusion"]["properties"]["defaults"], schema)
    except SchemaError as e:
        where = "/".join(map(str, e.path)) or "sampling"
        raise UserError(f"the sampling settings recorded in {ckpt_path}: {where}: {e.message}") from None
    odd = [k for k, v in defaults.items() if isinstance(v, float) and not math.isfinite(v)]
    if odd:
        raise UserError(f"the sampling settings recorded in {ckpt_path}: {odd[0]} must be a finite number, "
                        f"got {defaults[odd[0]]}")
    if defaults["steps"] > num_timesteps:
        raise UserError(f"the sampling steps recorded in {ckpt_path} ({defaults['steps']}) exceed the "
                        f"{num_timesteps} diffusion timesteps")


def resolve_plan(ckpt_path, out, opts: ConvertOptions, gates=()) -> ConvertPlan:
    if opts.batch < 1 or opts.batch > 4096:
        raise OptionError("batch", f"must be between 1 and 4096, got {opts.batch}")
    bad = [f for f in opts.formats if f not in FORMATS]
    if bad or not opts.formats:
        raise UserError(f"unknown format(s) {', '.join(bad) or '(none)'}; choose from {', '.join(FORMATS)}")
    if "onnx" not in opts.formats:
        raise UserError("the bundle needs the onnx format (the runtimes execute it); add it to --formats")
    check_opset(opts.opset)
    check_tolerance(opts.parity_tol, "--parity-tol")
    _check_not_inside(ckpt_path, out)
    check_target(out, opts.force)
    if opts.num_timesteps < 2:
        raise OptionError("num_timesteps", f"must be at least 2, got {opts.num_timesteps}")
    check_explicit(opts.schedule)
    check_sampling_defaults(opts.defaults, opts.num_timesteps)
    check_model_overrides(opts.num_heads, opts.semantic_size)
    if opts.backend not in BACKENDS:
        raise UserError(f"unknown backend {opts.backend!r} (choose from {', '.join(BACKENDS)})")
    trt_env = None
    if opts.backend == "tensorrt":
        from .tensorrt_build import require_tensorrt
        trt_env = MappingProxyType(dict(require_tensorrt()))
    device = _aoti_device(opts)
    if opts.onnxsim and not opts.optimize:
        raise OptionError("onnxsim", "is part of --optimize; add --optimize")
    tols = _error_tols(opts)
    ck = load_checkpoint(ckpt_path, opts.num_heads, opts.semantic_size, opts.init_from_dit)
    cfg = ck.config
    names = choose_class_names(cfg.num_classes, opts.class_names, ck.class_names)
    stages = resolve_schedule(ck, opts.schedule, opts.num_timesteps)
    ck.notes.extend(w for w in schedule_warnings(ck, stages, opts.num_timesteps) if w not in ck.notes)
    policy, precisions = _precisions(opts, len(stages))
    for gate in gates:
        gate.check_model(cfg)
    vae = _decoder(opts.vae, cfg)
    model = ck.build()
    quant = _quant_selection(opts, model)
    defaults = sampling_defaults(ck, opts.defaults)
    check_recorded_sampling(ckpt_path, defaults, opts.num_timesteps)
    cfg_channels = opts.cfg_channels or default_cfg_channels(cfg)
    builds = {sid: _build_list(opts, precisions[sid], policy[sid]) for sid in policy}
    plan = ConvertPlan(
        ckpt_path=Path(ckpt_path), out=Path(out), force=opts.force, checkpoint=ck, model=model, class_names=names,
        stages=tuple(stages), batch=opts.batch, opset=opts.opset, seed=opts.seed, parity_tol=opts.parity_tol,
        parity_trials=opts.parity_trials, num_timesteps=opts.num_timesteps, cfg_channels=cfg_channels,
        sampling_defaults=MappingProxyType(defaults), policy=MappingProxyType(policy),
        builds=MappingProxyType(builds), optimize=opts.optimize, optimize_level=opts.optimize_level,
        onnxsim=opts.onnxsim, quant=quant, error_tols=MappingProxyType(tols), calibration=None, decoder=vae,
        backend=opts.backend, tensorrt_env=trt_env, engine_cache=opts.engine_cache, timing_cache=opts.timing_cache,
        gates=tuple(gates), device=device)
    if any(len(p) > 1 for p in precisions.values()):
        plan = replace(plan, calibration=_calibration_choice(plan, opts))
    return plan


def _check_not_inside(ckpt_path, out) -> None:
    """--force must never delete the checkpoint it is converting."""
    import os

    o, c = Path(os.path.abspath(out)), Path(os.path.abspath(ckpt_path))
    if c == o or o in c.parents:
        raise UserError(f"the checkpoint {ckpt_path} is inside the bundle directory {out}; choose another -o")


def _aoti_device(opts: ConvertOptions) -> str | None:
    """--device: where AOTInductor packages will run (they are native code for one device)."""
    if opts.backend != "aoti":
        if opts.device is not None:
            raise OptionError("device", "applies to --backend aoti (AOTInductor packages are compiled for one device)")
        return None
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in AOTI_DEVICES:
        raise UserError(f"unknown --device {device!r} (choose from {', '.join(AOTI_DEVICES)})")
    if device == "cuda" and not torch.cuda.is_available():
        raise OptionError("device", f"cuda: this torch ({torch.__version__}) sees no CUDA GPU; convert on the kind "
                                    "of GPU the bundle will run on, or use --device cpu")
    return device


def check_tolerance(value, what: str) -> float:
    """A gate's tolerance: a finite number >= 0 (NaN would pass every comparison, i.e. turn the
    gate off; a negative one would fail it only after the whole export)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UserError(f"{what} must be a finite number >= 0, got {value}")
    return float(value)


def _error_tols(opts: ConvertOptions) -> dict:
    tols = dict(DEFAULT_ERROR_TOL)
    for k, v in opts.error_tol.items():
        try:
            prec, tol = canonical(k, "aoti" if opts.backend == "aoti" else "onnx"), float(v)
        except (PrecisionError, ValueError):
            raise OptionError("error_tol", f": {k}={v} is not PRECISION=NUMBER") from None
        tols[prec] = check_tolerance(tol, f"--error-tol {k}")
    return tols


def _precisions(opts: ConvertOptions, n_stages: int) -> tuple[dict, dict]:
    """-> (policy {stage id: precision the runtime loads}, {stage id: ONNX precisions to build,
    fp32 first})."""
    try:
        policy = parse_policy(opts.precision, n_stages, opts.backend)
        extras = {canonical(p, opts.backend) for p in opts.extra_precisions}
    except PrecisionError as e:
        raise UserError(str(e)) from None
    aoti = opts.backend == "aoti"  # the policy's precision is the packages'; ONNX graphs: fp32 + extras
    if "bf16" in (extras if aoti else set(policy.values()) | extras):
        raise UserError("bf16 needs no artifact: it is OpenVINO's inference precision over the fp32 graph; choose it "
                        "when running (flexdit-run --backend openvino --precision bf16)")
    build = {sid: ["fp32"] + sorted(((set() if aoti else {policy[sid]}) | extras) - {"fp32"}, key=PRECISIONS.index)
             for sid in policy}
    if opts.backend == "tensorrt" and any("int8-dynamic" in b for b in build.values()):
        raise UserError("int8-dynamic graphs use ONNX Runtime-only operators; TensorRT needs int8-static (QDQ): "
                        "use int8 or int8-static with --backend tensorrt")
    return policy, build


def _build_list(opts: ConvertOptions, onnx_precisions: list, policy_precision: str) -> tuple:
    """The artifacts of one stage, in build order: the fp32 exports (each later one derives from
    or is checked against them), the lower-precision graphs, then the engines."""
    keys = [("onnx", "fp32")] + [(f, "fp32") for f in FORMATS[1:] if f in opts.formats]
    ov_made = OPENVINO_MADE if opts.backend == "openvino" else ()
    keys += [("onnx", p) for p in onnx_precisions[1:] if p not in ov_made]
    if opts.backend == "openvino":
        keys += [("openvino", p) for p in onnx_precisions[1:] if p in ov_made]
    elif opts.backend != "onnx":
        keys.append((opts.backend, policy_precision))
    for key in keys:
        builder_for(*key)  # an unknown (backend, precision) is refused here, before any export
    return tuple(keys)


def _decoder(path, cfg):
    if not path:
        return None
    from .vae import load_vae_decoder
    vae = load_vae_decoder(path)
    if vae.latent_channels != cfg.in_channels:
        raise UserError(f"VAE has {vae.latent_channels} latent channels but the model has {cfg.in_channels}")
    return vae


def _quant_selection(opts: ConvertOptions, model) -> QuantSelection:
    """User errors in the precision options, found before anything is exported."""
    islands = parse_islands(opts.fp32_islands)
    if opts.calib_method not in CALIB_METHODS:
        raise UserError(f"unknown calibration method {opts.calib_method!r} (choose from {', '.join(CALIB_METHODS)})")
    if not opts.quant_ops:
        raise OptionError("quant_ops", "names no operator type")
    from .quantize import QUANTISABLE_OP_TYPES as known

    unknown = [op for op in opts.quant_ops if op not in known]
    if unknown:
        raise OptionError("quant_ops", f": {', '.join(map(repr, unknown))} is not an operator type ONNX Runtime "
                                       f"quantises (choose from {', '.join(sorted(known))})")
    if opts.optimize_level not in LEVELS:
        raise UserError(f"unknown optimisation level {opts.optimize_level!r} (choose from {', '.join(LEVELS)})")
    modules = [n for n, _ in model.named_modules()]
    check_layer_patterns(opts.quant_include, modules, "--quant-include")
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for p in opts.quant_include:
        if not any(layer_matches(n, p) for n in linears):
            raise OptionError("quant_include", f": {p!r} holds no linear layer "
                                               "(nothing there is a MatMul/Gemm to quantise)")
    exclude, mine = resolve_exclude(opts.quant_exclude, modules)
    check_layer_patterns(mine, modules, "--quant-exclude")
    if "op:" in islands:
        raise OptionError("fp32_islands", ": 'op:' needs an operator type, e.g. op:Softmax")
    check_layer_patterns(island_layer_patterns(islands), modules, "--fp32-islands")
    return QuantSelection(op_types=tuple(opts.quant_ops), include=tuple(opts.quant_include), exclude=tuple(exclude),
                          islands=tuple(islands), calib_method=opts.calib_method)


STATIC_PRECISIONS = ("int8-static", "fp8")
GATE_ONLY_CAPTURE = {"images": 2, "holdout_images": 8}


def needs_static_scales(plan: ConvertPlan) -> bool:
    """Whether some graph takes activation scales from calibration rows (int8-static, fp8);
    fp16 and int8-dynamic use them only for the held-out error gate."""
    return any(p in STATIC_PRECISIONS for keys in plan.builds.values() for _, p in keys)


def _calibration_choice(plan: ConvertPlan, opts: ConvertOptions) -> CalibrationChoice:
    """``--calib DIR`` must exist and fit this model and schedule; else the capture settings
    (bundle defaults + overrides) must be valid."""
    from flexdit_export.calib import CalibError, CalibSet
    from flexdit_export.calib.capture import CaptureSettings, model_sha256

    target = Path(str(plan.out).rstrip("/") + ".calib")
    if opts.calib:
        try:
            cs = CalibSet.open(opts.calib)
            cs.check_matches(model_sha256(plan.model), plan.stage_dicts, plan.num_timesteps)
        except CalibError as e:
            raise UserError(str(e)) from None
        return CalibrationChoice(existing=cs, settings=None, target=target)
    overrides = dict(opts.calib_settings)
    if not needs_static_scales(plan):  # only the held-out gate reads rows: 10 trajectories, not 48
        overrides = {**GATE_ONLY_CAPTURE, **overrides}
    try:
        settings = CaptureSettings.from_defaults(dict(plan.sampling_defaults), plan.batch, overrides)
    except ValueError as e:
        raise UserError(f"calibration settings: {e}") from None
    return CalibrationChoice(existing=None, settings=settings, target=target)
