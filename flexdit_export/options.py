"""What a user asks ``convert`` for, as given (CLI flags or a script): nothing here is checked
or resolved; ``plan.resolve_plan`` turns it into a ``ConvertPlan`` or one ``UserError``."""

from __future__ import annotations

from dataclasses import dataclass, field

from .export import MIN_OPSET
from .quantize import DEFAULT_OP_TYPES


@dataclass
class ConvertOptions:
    schedule: str | None = None  # None: the checkpoint's trained schedule, else "released"
    batch: int = 2
    formats: tuple = ("onnx",)
    opset: int = MIN_OPSET
    vae: str | None = None
    class_names: str | None = None
    num_heads: int | None = None
    semantic_size: int | None = None
    init_from_dit: str | None = None
    num_timesteps: int = 1000
    cfg_channels: str | None = None
    parity_tol: float = 1e-3
    parity_trials: int = 2
    seed: int = 0
    force: bool = False
    defaults: dict = field(default_factory=dict)
    # optimisation and precision (flexdit_export.optimize / .quantize, .calib)
    optimize: bool = False
    optimize_level: str = "basic"
    onnxsim: bool = False
    precision: str | None = None  # per-stage policy: what the runtime loads by default
    extra_precisions: tuple = ()  # also built for every stage (runtime --precision overrides)
    fp32_islands: str | None = None  # fp16 graphs; None: quantize.DEFAULT_ISLANDS
    quant_ops: tuple = DEFAULT_OP_TYPES
    quant_include: tuple = ()
    quant_exclude: tuple | None = None  # None: quantize.DEFAULT_QUANT_EXCLUDE; ("none",): nothing
    calib: str | None = None  # an existing calibration set (flexdit-export calibrate)
    calib_settings: dict = field(default_factory=dict)  # CaptureSettings overrides for a new capture
    calib_method: str = "minmax"
    error_tol: dict = field(default_factory=dict)  # precision -> max relative RMS error vs fp32 (held out)
    backend: str = "onnx"  # onnx | tensorrt (also build TensorRT engines) | aoti (AOTInductor packages)
    device: str | None = None  # aoti: cpu | cuda (None: cuda when torch sees a GPU, else cpu)
    engine_cache: str | None = None
    timing_cache: str | None = None
