"""checkpoint -> bundle: the whole compile path behind ``flexdit-export convert``."""

from __future__ import annotations

import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from flexdit_bundle.precision import describe as describe_policy

from .bundle import BundleWriter
from .checkpoints import load_checkpoint
from .classnames import choose_class_names
from .errors import UserError
from .export import MIN_OPSET, check_opset, export_onnx, export_torchscript, parity_onnx, parity_torchscript
from .optimize import LEVELS, optimize_graph
from .quantize import (CALIB_METHODS, DEFAULT_ERROR_TOL, DEFAULT_OP_TYPES, all_finite, check_layer_patterns,
                       compare_to_fp32, fp8_static, int8_dynamic, int8_static, island_layer_patterns, parse_islands,
                       layer_matches, resolve_exclude, to_fp16, try_session)
from .flops import forward_macs
from .schedule import describe, parse_schedule
from .stages import INPUT_NAMES, OUTPUT_NAMES, StageModule, sample_inputs

FORMATS = ("onnx", "torchscript")


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
    # optimisation and precision (flexdit_export.optimize / .quantize, calib/)
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
    quality_gate: int = 0  # images per class for the end-to-end gate (Fashion-MNIST model); 0: off
    backend: str = "onnx"  # onnx | tensorrt (also build TensorRT engines)
    engine_cache: str | None = None
    timing_cache: str | None = None


def _tensor(name, shape, dtype="float32"):
    return {"name": name, "shape": [int(s) for s in shape], "dtype": dtype}


def _check_parity(what: str, stats: dict, tol: float) -> None:
    if not stats["finite"] or stats["max_rel"] > tol:
        raise UserError(f"{what} fails parity: max relative error {stats['max_rel']:.2e} > {tol:.0e}"
                        + ("" if stats["finite"] else " (non-finite output)"))


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"tool": f"flexdit-export {__version__}", "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def _plan_precisions(opts: ConvertOptions, n_stages: int) -> tuple[dict, dict]:
    """-> (policy {stage id: precision the runtime loads}, build {stage id: precisions to build,
    fp32 first})."""
    from flexdit_bundle.precision import PRECISIONS, PrecisionError, canonical, parse_policy

    try:
        policy = parse_policy(opts.precision, n_stages, opts.backend)
        extras = {canonical(p, opts.backend) for p in opts.extra_precisions}
    except PrecisionError as e:
        raise UserError(str(e)) from None
    build = {sid: ["fp32"] + sorted(({policy[sid]} | extras) - {"fp32"}, key=PRECISIONS.index) for sid in policy}
    if opts.backend == "tensorrt" and any("int8-dynamic" in b for b in build.values()):
        raise UserError("int8-dynamic graphs use ONNX Runtime-only operators; TensorRT needs int8-static (QDQ): "
                        "use int8 or int8-static with --backend tensorrt")
    return policy, build


def _error_tols(opts: ConvertOptions) -> dict:
    from flexdit_bundle.precision import PrecisionError, canonical

    tols = dict(DEFAULT_ERROR_TOL)
    for k, v in opts.error_tol.items():
        try:
            tols[canonical(k)] = float(v)
        except (PrecisionError, ValueError):
            raise UserError(f"--error-tol: {k}={v} is not PRECISION=NUMBER") from None
    return tols


def _check_quant_options(opts: ConvertOptions, model, islands: list[str]) -> list[str]:
    """User errors in the precision options, found before anything is exported; -> the layer
    patterns kept out of quantisation."""
    if opts.calib_method not in CALIB_METHODS:
        raise UserError(f"unknown calibration method {opts.calib_method!r} (choose from {', '.join(CALIB_METHODS)})")
    if not opts.quant_ops:
        raise UserError("--quant-ops names no operator type")
    if opts.optimize_level not in LEVELS:
        raise UserError(f"unknown optimisation level {opts.optimize_level!r} (choose from {', '.join(LEVELS)})")
    modules = [n for n, _ in model.named_modules()]
    check_layer_patterns(opts.quant_include, modules, "--quant-include")
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for p in opts.quant_include:
        if not any(layer_matches(n, p) for n in linears):
            raise UserError(f"--quant-include: {p!r} holds no linear layer (nothing there is a MatMul/Gemm to quantise)")
    exclude, mine = resolve_exclude(opts.quant_exclude, modules)
    check_layer_patterns(mine, modules, "--quant-exclude")
    if "op:" in islands:
        raise UserError("--fp32-islands: 'op:' needs an operator type, e.g. op:Softmax")
    check_layer_patterns(island_layer_patterns(islands), modules, "--fp32-islands")
    return exclude


def _calibration(model, stage_dicts, opts: ConvertOptions, out, defaults: dict, cfg_channels: str, B: int, log):
    """The stage calibration set: ``--calib DIR`` (must exist and fit this model and schedule),
    else captured into ``OUT.calib`` (reused when it was made with exactly these settings)."""
    from calib import CalibError, CalibSet
    from calib.capture import CaptureSettings, capture_or_reuse, model_sha256

    try:
        if opts.calib:
            cs = CalibSet.open(opts.calib)
            cs.check_matches(model_sha256(model), stage_dicts, opts.num_timesteps)
            log(f"calibration: using {opts.calib} ({cs.sha256[:12]})")
        else:
            try:
                settings = CaptureSettings.from_defaults(defaults, B, opts.calib_settings)
            except ValueError as e:
                raise UserError(f"calibration settings: {e}") from None
            cs = capture_or_reuse(model, stage_dicts, settings, Path(str(out).rstrip("/") + ".calib"),
                                  num_timesteps=opts.num_timesteps, cfg_channels=cfg_channels, log=log)
    except CalibError as e:
        raise UserError(str(e)) from None
    for st in stage_dicts:
        for split in ("calib", "holdout"):
            if cs.rows(st["id"], split) < B:
                raise UserError(f"calibration set {cs.root} has {cs.rows(st['id'], split)} {split} rows for stage "
                                f"{st['id']}, fewer than the graph batch {B}; capture more images")
    return cs


def default_cfg_channels(cfg) -> str:
    """Guidance on the first 3 channels for latent models (the DiT reference), else on all eps channels."""
    return "first3" if cfg.in_channels >= 4 else "eps"


def sampling_defaults(ck, overrides: dict) -> dict:
    """The sampler settings a bundle records (and calibration trajectories use by default)."""
    return {"sampler": "ddpm", "steps": 250, "cfg_scale": 4.0, "eta": 0.0, **ck.sampling_defaults, **overrides}


def _variant(w, tag, sid, prec, fp32_files, fp32_art, calib, opts: ConvertOptions, islands, exclude, tols, B,
             log) -> dict:
    """Build, check and gate one lower-precision graph of a stage; -> its artifact."""
    import onnx

    from calib.readers import OrtCalibrationReader, StageBatches

    src = fp32_files[0]
    dst = w.path(f"stages/{tag}.{prec}.onnx")
    hold = list(StageBatches(calib, sid, B, "holdout"))
    sel = dict(op_types=tuple(opts.quant_ops), include=tuple(opts.quant_include), exclude=tuple(exclude))
    extra = {}
    if prec == "fp16":
        extra["fp32_islands"] = to_fp16(src, dst, islands)
        if not all_finite(dst, list(StageBatches(calib, sid, B, "calib")) + hold):
            raise UserError(f"stage {sid} fp16 graph produces NaN/Inf on real trajectory inputs; keep more of it in "
                            "fp32 with --fp32-islands")
    elif prec == "int8-dynamic":
        extra["quantization"] = int8_dynamic(src, dst, **sel)
    elif prec == "int8-static":
        extra["quantization"] = {**int8_static(src, dst, OrtCalibrationReader(calib, sid, B), method=opts.calib_method,
                                               **sel), "calibration_sha256": calib.sha256}
    elif prec == "fp8":
        extra["quantization"] = {**fp8_static(src, dst, OrtCalibrationReader(calib, sid, B), **sel),
                                 "calibration_sha256": calib.sha256}
    else:
        raise UserError(f"no builder for precision {prec}")
    reason = try_session(dst)
    if reason is None:
        err = compare_to_fp32(dst, src, hold)
        if not err["finite"] or err["rel_rms"] > tols[prec]:
            raise UserError(f"stage {sid} {prec} graph fails its quality gate: relative RMS error {err['rel_rms']:.3g} "
                            f"against the fp32 graph on {err['samples']} held-out trajectory rows"
                            + ("" if err["finite"] else " (non-finite output)")
                            + f" > {tols[prec]} (accept with --error-tol {prec}=X, or keep sensitive layers out with "
                            "--quant-exclude / --fp32-islands)")
        extra["error"] = err
        by = "onnxruntime CPUExecutionProvider" + (" (float8 Q/DQ emulated in fp32)" if prec == "fp8" else "")
        extra["check"] = {"status": "passed", "by": by}
        log(f"stage {sid}: {prec} error vs fp32 on {err['samples']} held-out rows: rel RMS {err['rel_rms']:.2e}, "
            f"max rel {err['max_rel']:.2e}")
    elif prec == "fp8":
        extra["check"] = {"status": "built-not-run", "reason": f"ONNX Runtime cannot execute it here: {reason}"}
        log(f"stage {sid}: fp8 graph built but NOT run ({reason}); check it on TensorRT")
    else:
        raise UserError(f"stage {sid} {prec} graph cannot be loaded by ONNX Runtime: {reason}")
    opset = next(o.version for o in onnx.load(str(dst), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))
    return w.artifact([dst], "onnx", prec, opset=opset, source_sha256=fp32_art["sha256"], **extra)


def convert(ckpt_path, out, opts: ConvertOptions, log=print) -> Path:
    if opts.batch < 1 or opts.batch > 4096:
        raise UserError(f"--batch must be between 1 and 4096, got {opts.batch}")
    bad = [f for f in opts.formats if f not in FORMATS]
    if bad or not opts.formats:
        raise UserError(f"unknown format(s) {', '.join(bad) or '(none)'}; choose from {', '.join(FORMATS)}")
    if "onnx" not in opts.formats:
        raise UserError("the bundle needs the onnx format (the runtimes execute it); add it to --formats")
    check_opset(opts.opset)
    if Path(out).exists() and not opts.force:
        raise UserError(f"{out} already exists (use --force to replace it)")
    if opts.num_timesteps < 2:
        raise UserError(f"--num-timesteps must be at least 2, got {opts.num_timesteps}")
    if opts.backend not in ("onnx", "tensorrt"):
        raise UserError(f"unknown backend {opts.backend!r} (choose from onnx, tensorrt)")
    if opts.backend == "tensorrt":
        from .tensorrt_build import require_tensorrt
        trt_env = require_tensorrt()
    if opts.onnxsim and not opts.optimize:
        raise UserError("--onnxsim is part of --optimize; add --optimize")
    tols = _error_tols(opts)
    ck = load_checkpoint(ckpt_path, opts.num_heads, opts.semantic_size, opts.init_from_dit)
    cfg = ck.config
    names = choose_class_names(cfg.num_classes, opts.class_names, ck.class_names)
    stages = parse_schedule(opts.schedule or ck.trained_schedule or "released", T=opts.num_timesteps, grid=cfg.grid, family=cfg.family,
                            semantic_size=cfg.semantic_size)
    policy, build = _plan_precisions(opts, len(stages))
    if opts.quality_gate:
        from .quality import check_gate_model
        if opts.quality_gate < 1:
            raise UserError(f"--quality-gate needs at least 1 image per class, got {opts.quality_gate}")
        check_gate_model(cfg.num_classes, cfg.in_channels, cfg.input_size)
    vae = None
    if opts.vae:
        from .vae import load_vae_decoder
        vae = load_vae_decoder(opts.vae)
        if vae.latent_channels != cfg.in_channels:
            raise UserError(f"VAE has {vae.latent_channels} latent channels but the model has {cfg.in_channels}")
    model = ck.build()
    islands = parse_islands(opts.fp32_islands)
    exclude = _check_quant_options(opts, model, islands)
    torch.manual_seed(opts.seed)
    log(f"model: {cfg.name} ({ck.source_format}), {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"latent {cfg.in_channels}x{cfg.input_size}x{cfg.input_size}, {cfg.num_tokens} tokens")
    for note in ck.notes:
        log(f"note: {note}")
    log(f"schedule: {describe(stages, cfg.grid)}")
    B = opts.batch
    x_shape = (B, cfg.in_channels, cfg.input_size, cfg.input_size)
    out_shape = (B, cfg.out_channels, cfg.input_size, cfg.input_size)
    defaults = sampling_defaults(ck, opts.defaults)
    cfg_channels = opts.cfg_channels or default_cfg_channels(cfg)
    stage_dicts = [{"id": sid, **st.to_dict()} for sid, st in enumerate(stages)]
    calib = None
    if any(len(b) > 1 for b in build.values()):
        log(f"precision policy: {describe_policy(policy)}")
        calib = _calibration(model, stage_dicts, opts, out, defaults, cfg_channels, B, log)
    with BundleWriter(out, opts.force) as w, tempfile.TemporaryDirectory(prefix="flexdit-export-") as work:
        stage_entries = []
        for sid, st in enumerate(stages):
            tag = f"stage{sid}_" + ("dense" if st.sparse_grid is None else f"s{st.sparse_grid}")
            module = StageModule(model, st).eval()
            gen = torch.Generator().manual_seed(opts.seed * 1000 + sid)

            def make_inputs(i, st=st, gen=gen):
                return sample_inputs(cfg, B, gen, (st.t_min, st.t_max))

            artifacts, parity, extra = [], {}, {}
            if opts.optimize:
                raw = export_onnx(module, make_inputs(-1), Path(work) / f"{tag}.onnx", INPUT_NAMES, OUTPUT_NAMES, opts.opset)
                files, extra["optimization"] = optimize_graph(raw[0], w.path(f"stages/{tag}.onnx"), opts.optimize_level,
                                                              opts.onnxsim)
            else:
                files = export_onnx(module, make_inputs(-1), w.path(f"stages/{tag}.onnx"), INPUT_NAMES, OUTPUT_NAMES, opts.opset)
            parity["onnx/fp32"] = parity_onnx(files[0], module, make_inputs, INPUT_NAMES, opts.parity_trials)
            _check_parity(f"stage {sid} ONNX graph", parity["onnx/fp32"], opts.parity_tol)
            fp32_art = w.artifact(files, "onnx", "fp32", opset=opts.opset, **extra)
            artifacts.append(fp32_art)
            if "torchscript" in opts.formats:
                ts = export_torchscript(module, make_inputs(-1), w.path(f"stages/{tag}.torchscript.pt"))
                parity["torchscript/fp32"] = parity_torchscript(ts[0], module, make_inputs, opts.parity_trials)
                _check_parity(f"stage {sid} TorchScript module", parity["torchscript/fp32"], opts.parity_tol)
                artifacts.append(w.artifact(ts, "torchscript", "fp32"))
            p = parity["onnx/fp32"]
            opt = extra.get("optimization")
            log(f"stage {sid}: t {st.t_max}..{st.t_min}, {st.tokens(cfg.grid)} {'sparse' if st.sparse_grid else 'dense'} tokens, "
                f"ONNX parity max abs {p['max_abs']:.2e} rel {p['max_rel']:.2e}"
                + (f", optimised ({opt['level']}{' + onnxsim' if opt['onnxsim'] else ''}): "
                   f"{opt['nodes_before']} -> {opt['nodes_after']} nodes" if opt else ""))
            for prec in build[sid][1:]:
                artifacts.append(_variant(w, tag, sid, prec, files, fp32_art, calib, opts, islands, exclude, tols, B, log))
            stage_entries.append({
                "id": sid, "t_min": st.t_min, "t_max": st.t_max, "sparse_grid": st.sparse_grid,
                "tokens": st.tokens(cfg.grid) if cfg.family == "flexdit" else cfg.num_tokens, "batch": B,
                "inputs": [_tensor("x", x_shape), _tensor("t", (B,)), _tensor("y", (B,), "int64")],
                "outputs": [_tensor("out", out_shape)], "artifacts": artifacts, "parity": parity,
                "macs": forward_macs(cfg, st.sparse_grid), "default_precision": policy[sid],
            })
        decoder = None
        if vae is not None:
            lat_shape = (1, cfg.in_channels, cfg.input_size, cfg.input_size)
            img = cfg.input_size * vae.upscale
            gen = torch.Generator().manual_seed(opts.seed + 77)

            def vae_inputs(i):
                return (torch.randn(lat_shape, generator=gen) * 0.18215 / vae.scale_factor * 4,)

            files = export_onnx(vae, vae_inputs(-1), w.path("decoder/vae_decoder.onnx"), ["latent"], ["image"], opts.opset)
            par = parity_onnx(files[0], vae, vae_inputs, ["latent"], opts.parity_trials)
            _check_parity("VAE decoder graph", par, opts.parity_tol)
            log(f"decoder: SD-VAE -> {img}x{img}, ONNX parity max abs {par['max_abs']:.2e} rel {par['max_rel']:.2e}")
            decoder = {"kind": "sd-vae", "scale_factor": vae.scale_factor,
                       "inputs": [_tensor("latent", lat_shape)], "outputs": [_tensor("image", (1, 3, img, img))],
                       "artifacts": [w.artifact(files, "onnx", "fp32", opset=opts.opset)], "parity": {"onnx/fp32": par}}
        manifest = {
            "created_by": _versions(),
            "model": {"family": cfg.family, "name": cfg.name, "config": cfg.to_dict(), "num_classes": cfg.num_classes,
                      "null_class": cfg.num_classes, "class_names": names,
                      "source": {"file": Path(ckpt_path).name, "format": ck.source_format, "notes": ck.notes}},
            "diffusion": {"num_timesteps": opts.num_timesteps, "beta_schedule": "linear", "beta_start": 1e-4,
                          "beta_end": 0.02, "variance_type": "learned_range" if cfg.learn_sigma else "fixed_large",
                          "prediction_type": "epsilon", "cfg_channels": cfg_channels, "defaults": defaults},
            "stages": stage_entries,
            "decoder": decoder,
            "output": {"space": "decoded" if decoder else ("pixel" if cfg.in_channels in (1, 3) else "latent"),
                       "value_range": [-1.0, 1.0]},
            "calibration": None if calib is None else _calibration_record(calib, stage_entries, opts),
        }
        if opts.backend == "tensorrt":
            from .tensorrt_build import add_engines
            add_engines(w, manifest, policy, trt_env, opts.engine_cache, opts.timing_cache, log)
        if opts.quality_gate:
            from .quality import end_to_end
            manifest["quality"] = end_to_end(w.preview(manifest), opts.quality_gate, seed=opts.seed, log=log)
            if not manifest["quality"]["passed"]:
                raise UserError(f"the bundle fails the end-to-end quality gate: {manifest['quality']['verdict']}")
        return w.commit(manifest)


def _calibration_record(calib, stage_entries, opts: ConvertOptions) -> dict:
    stages = []
    for st, entry in zip(calib.stages, stage_entries):
        errors = {a["precision"]: a["error"]["rel_rms"] for a in entry["artifacts"] if "error" in a}
        stages.append({"id": st["id"], "t_values": st["calib"]["t_values"], "calib_rows": st["calib"]["rows"],
                       "holdout_rows": st["holdout"]["rows"], "rel_rms_error": errors})
    return {"sha256": calib.sha256, "path": calib.root.name, "method": opts.calib_method, "settings": calib.settings,
            "stages": stages}
