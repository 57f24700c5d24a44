"""``flexdit-export verify``: can this bundle be trusted, and does it still compute what the
checkpoint computes? Checks checksums and schema; with a checkpoint, checks every stage's
tensors against what the checkpoint's graphs take (``component_io``), re-runs every stage
graph against PyTorch on inputs drawn from that declaration, and one short trajectory of the
runtime against the reference sampler."""

from __future__ import annotations

import numpy as np

from flexdit_runtime import Pipeline, load_bundle
from flexdit_runtime.weights import SharedWeights

from . import component_io
from .checkpoints import load_checkpoint
from .errors import UserError
from .export import parity_onnx
from .reference_sampler import reference_sample
from .shared_graph import check_published
from .schedule import Stage
from .stages import StageModule

STAGE_TOL = 1e-3
PSNR_MIN_DB = 40.0


def psnr(a: np.ndarray, b: np.ndarray, value_range=(-1.0, 1.0)) -> float:
    lo, hi = value_range
    a = np.clip((a - lo) / (hi - lo), 0, 1)
    b = np.clip((b - lo) / (hi - lo), 0, 1)
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return 300.0 if mse < 1e-30 else min(300.0, 10 * np.log10(1.0 / mse))  # capped: JSON has no inf


def _check_shared_weights(bundle) -> dict:
    """Every graph's weight bindings against the graph itself (raises BundleError on a mismatch)."""
    sw = SharedWeights(bundle)
    graphs = bindings = 0
    for entry in bundle.stages:
        for a in entry.artifacts:
            if a.weights:
                sw.check_bindings(a)
                graphs += 1
                bindings += len(a.weights.bindings)
    for g in bundle.shared_graphs.values():
        sw.check_bindings(g)
        graphs += 1
        bindings += len(g.weights.bindings)
    files = bundle.manifest.weights or ()
    return {"files": len(files), "bytes": sum(w.bytes for w in files), "graphs": graphs, "bindings": bindings}


def verify(bundle_path, ckpt=None, steps: int = 8, num_images: int = 2, sampler: str = "ddim", seed: int = 0,
           num_heads=None, init_from_dit=None, log=print) -> dict:
    bundle = load_bundle(bundle_path)  # schema + checksums, raises BundleError
    report = {"bundle": str(bundle_path), "checksums": "ok", "schema": "ok", "stages": [], "ok": True}
    log(f"checksums: ok ({sum(1 for _ in bundle.all_files())} files); schema: ok")
    report["shared_weights"] = _check_shared_weights(bundle)
    if report["shared_weights"]["files"]:
        sw = report["shared_weights"]
        log(f"shared weights: ok ({sw['files']} file(s), {sw['bytes'] / 1e6:.1f} MB stored once; {sw['bindings']} bindings "
            f"of {sw['graphs']} graphs match what the graphs reference)")
    report["shared_graphs"] = check_published(bundle.root, bundle.manifest)
    for g in report["shared_graphs"]:
        report["ok"] &= g["ok"]
        log(f"shared graph {g['path']}: " + (f"bit-identical to the graphs of stages {g['stages']}" if g["ok"]
                                             else f"FAIL: {g['why']}"))
    if ckpt is None:
        return report
    m = bundle.manifest
    # the checkpoint as it records itself; the bundle's values only fill what it does not record
    recorded = m.model.config.to_json()
    ck = load_checkpoint(ckpt, num_heads, None, init_from_dit,
                         fallback={"num_heads": m.model.config.num_heads,
                                   "semantic_size": m.model.config.extra.get("semantic_size")})
    if ck.config.to_dict() != recorded:
        diff = ", ".join(f"{k} {recorded.get(k)!r} in the bundle, {v!r} in the checkpoint"
                         for k, v in ck.config.to_dict().items() if recorded.get(k) != v)
        raise UserError(f"checkpoint {ckpt} does not match the bundle's model configuration: {diff}")
    model = ck.build()
    cfg = ck.config
    for st in bundle.stages:
        stage = Stage(st.t_min, st.t_max, st.sparse_grid)
        io = component_io.stage_io(cfg, stage, st.batch)
        why = io.mismatch(st)
        if why is not None:  # the graph would be fed tensors it does not take
            report["ok"] = False
            report["stages"].append({"id": st.id, "ok": False, "why": why})
            log(f"stage {st.id}: FAIL: {why}")
            continue
        module = StageModule(model, stage).eval()
        stats = parity_onnx(bundle.path(bundle.artifact(st, "onnx", "fp32")), module, io.sampler(seed + 1000 + st.id),
                            io.input_names)
        ok = bool(stats["finite"] and stats["max_rel"] <= STAGE_TOL)
        report["ok"] &= ok
        report["stages"].append({"id": st.id, **stats, "ok": ok})
        log(f"stage {st.id}: max abs {stats['max_abs']:.2e} rel {stats['max_rel']:.2e} {'ok' if ok else 'FAIL'}")
    # One short trajectory, same initial noise, DDIM eta 0 unless asked otherwise.
    d = m.diffusion
    defaults = bundle.sampling_defaults
    cfg_scale, clip = float(defaults.cfg_scale), bool(defaults.clip_denoised)
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((num_images, cfg.in_channels, cfg.input_size, cfg.input_size), dtype=np.float32)
    y = np.arange(num_images, dtype=np.int64) % cfg.num_classes
    noises = {}

    def noise(k, shape=z.shape):
        if k not in noises:
            noises[k] = np.random.default_rng([seed, 7, k]).standard_normal(shape, dtype=np.float32)
        return noises[k]

    pipe = Pipeline(bundle, providers=["cpu"])
    res = pipe([int(v) for v in y], steps=steps, sampler=sampler, cfg_scale=cfg_scale, init_noise=z,
               batch=num_images, noise_fn=lambda k, idx: noise(k)[idx], clip_denoised=clip)
    stages = [(s.t_min, s.t_max, s.sparse_grid) for s in bundle.stages]
    ref = reference_sample(model, stages, z, y, steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                           cfg_channels=d.cfg_channels, num_timesteps=d.num_timesteps, noise_fn=noise, clip_denoised=clip)
    err = float(np.abs(res.samples - ref).max())
    rel = err / (float(np.abs(ref).max()) or 1.0)
    if pipe.decoder is not None:
        img_run, img_ref = pipe.decoder(res.samples), pipe.decoder(ref)
    else:
        img_run, img_ref = res.samples, ref
    vr = m.output.value_range
    p = psnr(img_run, img_ref, vr)
    ok = bool(p >= PSNR_MIN_DB)
    report["ok"] &= ok
    report["trajectory"] = {"sampler": sampler, "steps": steps, "cfg_scale": cfg_scale, "images": num_images,
                            "final_max_abs": err, "final_max_rel": rel, "psnr_db": p, "ok": ok}
    log(f"trajectory ({sampler}, {steps} steps, cfg {cfg_scale}): final max abs {err:.2e} (rel {rel:.1e}), PSNR {p:.1f} dB "
        f"{'ok' if ok else 'FAIL'}")
    return report
