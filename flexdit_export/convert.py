"""checkpoint -> bundle: the whole compile path behind ``flexdit-export convert``."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .bundle import BundleWriter
from .checkpoints import load_checkpoint
from .classnames import choose_class_names
from .errors import UserError
from .export import MIN_OPSET, check_opset, export_onnx, export_torchscript, parity_onnx, parity_torchscript
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
    ck = load_checkpoint(ckpt_path, opts.num_heads, opts.semantic_size, opts.init_from_dit)
    cfg = ck.config
    names = choose_class_names(cfg.num_classes, opts.class_names, ck.class_names)
    stages = parse_schedule(opts.schedule or ck.trained_schedule or "released", T=opts.num_timesteps, grid=cfg.grid, family=cfg.family,
                            semantic_size=cfg.semantic_size)
    vae = None
    if opts.vae:
        from .vae import load_vae_decoder
        vae = load_vae_decoder(opts.vae)
        if vae.latent_channels != cfg.in_channels:
            raise UserError(f"VAE has {vae.latent_channels} latent channels but the model has {cfg.in_channels}")
    model = ck.build()
    torch.manual_seed(opts.seed)
    log(f"model: {cfg.name} ({ck.source_format}), {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"latent {cfg.in_channels}x{cfg.input_size}x{cfg.input_size}, {cfg.num_tokens} tokens")
    for note in ck.notes:
        log(f"note: {note}")
    log(f"schedule: {describe(stages, cfg.grid)}")
    B = opts.batch
    x_shape = (B, cfg.in_channels, cfg.input_size, cfg.input_size)
    out_shape = (B, cfg.out_channels, cfg.input_size, cfg.input_size)
    with BundleWriter(out, opts.force) as w:
        stage_entries = []
        for sid, st in enumerate(stages):
            tag = f"stage{sid}_" + ("dense" if st.sparse_grid is None else f"s{st.sparse_grid}")
            module = StageModule(model, st).eval()
            gen = torch.Generator().manual_seed(opts.seed * 1000 + sid)

            def make_inputs(i, st=st, gen=gen):
                return sample_inputs(cfg, B, gen, (st.t_min, st.t_max))

            artifacts, parity = [], {}
            files = export_onnx(module, make_inputs(-1), w.path(f"stages/{tag}.onnx"), INPUT_NAMES, OUTPUT_NAMES, opts.opset)
            parity["onnx/fp32"] = parity_onnx(files[0], module, make_inputs, INPUT_NAMES, opts.parity_trials)
            _check_parity(f"stage {sid} ONNX graph", parity["onnx/fp32"], opts.parity_tol)
            artifacts.append(w.artifact(files, "onnx", "fp32", opset=opts.opset))
            if "torchscript" in opts.formats:
                ts = export_torchscript(module, make_inputs(-1), w.path(f"stages/{tag}.torchscript.pt"))
                parity["torchscript/fp32"] = parity_torchscript(ts[0], module, make_inputs, opts.parity_trials)
                _check_parity(f"stage {sid} TorchScript module", parity["torchscript/fp32"], opts.parity_tol)
                artifacts.append(w.artifact(ts, "torchscript", "fp32"))
            p = parity["onnx/fp32"]
            log(f"stage {sid}: t {st.t_max}..{st.t_min}, {st.tokens(cfg.grid)} sparse tokens, "
                f"ONNX parity max abs {p['max_abs']:.2e} rel {p['max_rel']:.2e}")
            stage_entries.append({
                "id": sid, "t_min": st.t_min, "t_max": st.t_max, "sparse_grid": st.sparse_grid,
                "tokens": st.tokens(cfg.grid) if cfg.family == "flexdit" else cfg.num_tokens, "batch": B,
                "inputs": [_tensor("x", x_shape), _tensor("t", (B,)), _tensor("y", (B,), "int64")],
                "outputs": [_tensor("out", out_shape)], "artifacts": artifacts, "parity": parity,
                "macs": forward_macs(cfg, st.sparse_grid),
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
        cfg_channels = opts.cfg_channels or ("first3" if cfg.in_channels >= 4 else "eps")
        manifest = {
            "created_by": _versions(),
            "model": {"family": cfg.family, "name": cfg.name, "config": cfg.to_dict(), "num_classes": cfg.num_classes,
                      "null_class": cfg.num_classes, "class_names": names,
                      "source": {"file": Path(ckpt_path).name, "format": ck.source_format, "notes": ck.notes}},
            "diffusion": {"num_timesteps": opts.num_timesteps, "beta_schedule": "linear", "beta_start": 1e-4,
                          "beta_end": 0.02, "variance_type": "learned_range" if cfg.learn_sigma else "fixed_large",
                          "prediction_type": "epsilon", "cfg_channels": cfg_channels,
                          "defaults": {"sampler": "ddpm", "steps": 250, "cfg_scale": 4.0, "eta": 0.0,
                                       **ck.sampling_defaults, **opts.defaults}},
            "stages": stage_entries,
            "decoder": decoder,
            "output": {"space": "decoded" if decoder else ("pixel" if cfg.in_channels in (1, 3) else "latent"),
                       "value_range": [-1.0, 1.0]},
            "calibration": None,
        }
        return w.commit(manifest)
