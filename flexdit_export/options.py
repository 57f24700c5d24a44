"""What a user asks ``convert`` for, as given (CLI flags or a script): nothing here is checked
or resolved; ``plan.resolve_plan`` turns it into a ``ConvertPlan`` or one ``UserError``.

Each field also declares, once, the command-line flag that sets it (``Flag`` in the field's
metadata): ``flexdit-export`` builds its click options and the ``ConvertOptions`` it passes to
``convert`` from these declarations, so an option is added in one place and the CLI cannot
forget to copy it. Click stays out of this module; the CLI turns a ``Flag`` into a click option.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable

from flexdit_runtime.samplers import SAMPLERS

from .errors import UserError

# export.MIN_OPSET and quantize.DEFAULT_OP_TYPES, spelled here because those modules need torch and
# onnx, and the CLI reads these declarations on every start (doctor and --help run without them);
# tests/cli/test_cli_conventions.py holds them equal
MIN_OPSET = 18
DEFAULT_OP_TYPES = ("MatMul", "Gemm")


@dataclass(frozen=True)
class Flag:
    """One command-line flag: how it is spelled and typed on the command line (``kind``: int,
    float, str, bool for a switch, or a tuple of choices), its default there, and ``parse``,
    which turns the value given into the field's value."""

    name: str  # "--batch"
    help: str | None = None
    kind: object = str
    default: object = None
    show_default: bool = False
    metavar: str | None = None
    parse: Callable | None = None
    param: str | None = None  # the click parameter name, when it is not the field's (one flag of a group)

    def value(self, given):
        return self.parse(given) if self.parse is not None and given is not None else given


def split(text) -> list:
    """'a, b,,c' -> ['a', 'b', 'c'] (the comma lists every list flag takes)."""
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def pairs(text, what: str) -> dict:
    """'k=v,k2=v2' -> {k: v, k2: v2}; a bare item is one UserError naming ``what``."""
    out = {}
    for item in split(text):
        k, eq, v = item.partition("=")
        if not eq:
            raise UserError(f"{what}: {item!r} is not KEY=VALUE")
        out[k.strip()] = v.strip()
    return out


def _opt(default, flag: Flag | None = None, **kw):
    """A field with its flag (None: the field has no flag, a script sets it)."""
    meta = {"flag": flag} if flag is not None else {}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def _group(default_factory, flags: dict):
    """A dict field filled from several flags, ``flags``: key in the dict -> Flag (unset flags
    leave their key out)."""
    return field(default_factory=default_factory, metadata={"group": flags})


PRECISION_HELP = ("per-stage precision policy, the runtime's default: fp32 | fp16 | int8 (int8-dynamic on ONNX Runtime, "
                  "int8-static on TensorRT) | int8-dynamic | int8-static | fp8, or per stage, e.g. "
                  "'int8:stages=0-2,fp16:stages=3' (default fp32)")
BACKEND_CHOICES = ("onnx", "tensorrt", "openvino", "aoti")
BACKEND_HELP = ("tensorrt: also build one TensorRT engine per stage (needs TensorRT and a GPU); openvino: also an OpenVINO "
                "int8 model per stage; aoti: also one AOTInductor package per stage for --device, in the --precision "
                "policy's precision (fp32|bf16|fp16)")


@dataclass
class ConvertOptions:
    # how to read the model (also calibrate's)
    schedule: str | None = _opt(None, Flag(  # None: the checkpoint's trained schedule, else "released"
        "--schedule", "released | paper4 | dense | 'lo:s,...' (e.g. 750:6,500:7,250:9,0:10) | FILE.json "
                      "(default: the schedule recorded in a project checkpoint, else released)"))
    batch: int = _opt(2, Flag("--batch", "graph batch dimension (cond+uncond rows for CFG)", int, 2, True))
    num_heads: int | None = _opt(None, Flag(
        "--num-heads", "attention heads (checkpoint shapes cannot tell; default from the size; refused when it "
                       "contradicts a project checkpoint's record)", int))
    semantic_size: int | None = _opt(None, Flag(
        "--semantic-size", "sparse grid of the 'released' schedule (default: checkpoint's or 8)", int))
    init_from_dit: str | None = _opt(None, Flag(
        "--init-from-dit", "build a FlexDiT from DiT weights with this layout: 256 | 512 | default | P/DxG0,G1,G2,G3/T",
        metavar="LAYOUT"))
    num_timesteps: int = _opt(1000, Flag("--num-timesteps", "diffusion training timesteps T", int, 1000, True))
    cfg_channels: str | None = _opt(None, Flag(
        "--cfg-channels", "guided channels: first3 (DiT reference) or eps (all eps channels); default first3 when "
                          "Cin >= 4", ("first3", "eps")))
    # what to write
    formats: tuple = _opt(("onnx",), Flag("--formats", "comma-separated: onnx[,torchscript]", str, "onnx", True,
                                          parse=lambda t: tuple(split(t))))
    opset: int = _opt(MIN_OPSET, Flag("--opset", "ONNX opset (>= 18)", int, MIN_OPSET, True))
    vae: str | None = _opt(None, Flag(
        "--vae", "local diffusers AutoencoderKL directory (config.json + diffusion_pytorch_model.safetensors)"))
    class_names: str | None = _opt(None, Flag("--class-names", "text file, one class name per line"))
    defaults: dict = _group(dict, {  # what the runtime samples with by default (the manifest's sampling defaults)
        "sampler": Flag("--default-sampler", "sampler the runtime uses by default (default ddpm; dpmpp-2m, unipc, "
                                             "euler: few-step solvers)", tuple(SAMPLERS)),
        "steps": Flag("--default-steps", "sampling steps the runtime uses by default (default 250)", int),
        "cfg_scale": Flag("--default-cfg-scale", "guidance scale the runtime uses by default (default 4)", float)})
    parity_tol: float = _opt(1e-3, Flag("--parity-tol", "max relative error of a graph vs PyTorch", float, 1e-3, True))
    parity_trials: int = _opt(2)
    seed: int = _opt(0, Flag("--seed", None, int, 0, True))
    # optimisation and precision (flexdit_export.optimize / .quantize, .calib)
    optimize: bool = _opt(False, Flag(
        "--optimize", "save each stage graph after ONNX Runtime offline optimisation (portable level)", bool))
    optimize_level: str = _opt("basic", Flag(
        "--optimize-level", "basic (standard ONNX ops, default) | extended (adds ONNX Runtime contrib ops: CPU/CUDA "
                            "providers only)", str, "basic"))
    onnxsim: bool = _opt(False, Flag("--onnxsim", "also run onnxsim after ONNX Runtime (optional package)", bool))
    precision: str | None = _opt(None, Flag("--precision", PRECISION_HELP))  # what the runtime loads by default
    extra_precisions: tuple = _opt((), Flag(  # also built for every stage (runtime --precision overrides)
        "--extra-precisions", "also build these for every stage (for flexdit-run --precision), e.g. fp16,int8-static",
        str, "", parse=lambda t: tuple(split(t))))
    fp32_islands: str | None = _opt(None, Flag(  # fp16 graphs; None: quantize.DEFAULT_ISLANDS
        "--fp32-islands", "what fp16 graphs keep in fp32: 'default' (layernorm,softmax,embedders,final_layer), "
                          "'none', or a list of those groups, op:TYPE and layer paths/globs"))
    quant_ops: tuple = _opt(DEFAULT_OP_TYPES, Flag("--quant-ops", "operator types to quantise", str,
                                                   ",".join(DEFAULT_OP_TYPES), True, parse=lambda t: tuple(split(t))))
    quant_include: tuple = _opt((), Flag("--quant-include", "quantise only these layers (module paths or globs)", str,
                                         "", parse=lambda t: tuple(split(t))))
    quant_exclude: tuple | None = _opt(None, Flag(  # None: quantize.DEFAULT_QUANT_EXCLUDE; ("none",): nothing
        "--quant-exclude", "never quantise these layers (module paths or globs): 'default' (*.merged_layer2: the "
                           "SDTM skip path), 'none', or a list, e.g. default,final_layer", str, "default",
        parse=lambda t: tuple(split(t)) or ("none",)))
    error_tol: dict = _opt({}, Flag(  # precision -> max relative RMS error vs fp32 (held out)
        "--error-tol", "per-precision gate on the relative RMS error vs the fp32 graph on held-out calibration rows, "
                       "e.g. int8-static=0.15,fp16=0.02", str, "", parse=lambda t: pairs(t, "--error-tol")))
    # engines beside the ONNX graphs
    backend: str = _opt("onnx", Flag("--backend", BACKEND_HELP, BACKEND_CHOICES, "onnx", True))
    device: str | None = _opt(None, Flag(  # aoti: None: cuda when torch sees a GPU, else cpu
        "--device", "--backend aoti: compile the AOTInductor packages for this device (default: cuda when torch sees "
                    "a GPU, else cpu)", ("cpu", "cuda")))
    engine_cache: str | None = _opt(None, Flag(
        "--engine-cache", "TensorRT engine cache directory (default ~/.cache/flexdit-export/tensorrt)"))
    timing_cache: str | None = _opt(None, Flag("--timing-cache", "TensorRT timing cache file (default: in the engine "
                                                                 "cache)"))
    # calibration (int8-static, fp8 scales; the held-out gates)
    calib: str | None = _opt(None, Flag(  # an existing calibration set (flexdit-export calibrate)
        "--calib", "an existing calibration set (flexdit-export calibrate); default: a matching set found beside -o, "
                   "else a capture into OUT.calib"))
    calib_method: str = _opt("minmax", Flag(
        "--calib-method", "int8-static activation ranges: minmax (default) | percentile | entropy (histograms, "
                          "calibrated in strides)", str, "minmax"))
    calib_settings: dict = _group(dict, {  # CaptureSettings overrides for a new capture
        "images": Flag("--calib-images", "calibration trajectories (images; default 32, 2 when only the held-out gate "
                                         "needs rows)", int),
        "holdout_images": Flag("--calib-holdout-images", "held-out trajectories (default 16, 8 gate-only)", int),
        "max_rows": Flag("--calib-max-rows", "calibration rows kept per stage (default 512)", int),
        "max_holdout_rows": Flag("--calib-holdout-rows", "held-out rows kept per stage (default 128)", int),
        "steps": Flag("--calib-steps", "sampling steps (default: the bundle's)", int),
        "sampler": Flag("--calib-sampler", "default: the bundle's", ("ddpm", "ddim")),
        "cfg_scale": Flag("--calib-cfg-scale", "default: the bundle's", float),
        "seed": Flag("--calib-seed", "default 0", int)})
    force: bool = _opt(False)  # replace an existing bundle (the CLI's --force belongs to its -o)

    @classmethod
    def flags(cls, *names: str) -> list[tuple[str, Flag]]:
        """[(click parameter name, Flag)] of these fields in the order given (a group field gives
        all its flags, in its order)."""
        by_name = {f.name: f for f in fields(cls)}
        out = []
        for name in names:
            meta = by_name[name].metadata
            if "group" in meta:
                out += [(param_name(flag), flag) for flag in meta["group"].values()]
            else:
                out.append((name, meta["flag"]))
        return out

    @classmethod
    def from_flags(cls, given: dict, **fixed) -> "ConvertOptions":
        """The options from click's parsed values (``given``: parameter name -> value as typed;
        fields whose flag was not given keep their defaults), plus ``fixed`` set directly."""
        values = dict(fixed)
        for f in fields(cls):
            if "group" in f.metadata:
                group = {key: given[param_name(flag)] for key, flag in f.metadata["group"].items()
                         if given.get(param_name(flag)) is not None}
                if group:
                    values[f.name] = group
            elif "flag" in f.metadata and f.name in given:
                values[f.name] = f.metadata["flag"].value(given[f.name])
        return cls(**values)


def param_name(flag: Flag) -> str:
    """The click parameter a flag fills: its ``param``, else the flag with dashes as underscores."""
    return flag.param or flag.name.lstrip("-").replace("-", "_")


def flag_names() -> dict:
    """ConvertOptions field -> its flag, for naming a refused option the way the user typed it."""
    out = {}
    for f in fields(ConvertOptions):
        if "flag" in f.metadata:
            out[f.name] = f.metadata["flag"].name
    return out
