"""The components of a bundle: one per schedule stage, and the VAE decoder when there is one.
Each says what module its builders export, the inputs its parity checks draw (seeded per
component, so a component's numbers do not depend on what else is built), where its files go,
and the manifest entry its artifacts end up in."""

from __future__ import annotations

import torch

from .builders import Component
from .flops import forward_macs
from .stages import INPUT_NAMES, OUTPUT_NAMES, StageModule, sample_inputs

VAE_LATENT_SCALE = 0.18215  # SD's latent scale: parity draws latents of the size the sampler produces


def tensor(name, shape, dtype="float32") -> dict:
    return {"name": name, "shape": [int(s) for s in shape], "dtype": dtype}


def stage_component(plan, sid: int) -> Component:
    cfg, st = plan.cfg, plan.stages[sid]
    gen = torch.Generator().manual_seed(plan.seed * 1000 + sid)

    def make_inputs(i):
        return sample_inputs(cfg, plan.batch, gen, (st.t_min, st.t_max))

    tag = f"stage{sid}_" + ("dense" if st.sparse_grid is None else f"s{st.sparse_grid}")
    return Component(what=f"stage {sid}", stem=f"stages/{tag}", module=StageModule(plan.model, st).eval(),
                     make_inputs=make_inputs, input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                     summary=f"stage {sid}: t {st.t_max}..{st.t_min}, {st.tokens(cfg.grid)} "
                             f"{'sparse' if st.sparse_grid else 'dense'} tokens",
                     optimize=plan.optimize, stage_id=sid)


def stage_entry(plan, sid: int, artifacts: list, parity: dict) -> dict:
    cfg, st, B = plan.cfg, plan.stages[sid], plan.batch
    size = (cfg.input_size, cfg.input_size)
    return {
        "id": sid, "t_min": st.t_min, "t_max": st.t_max, "sparse_grid": st.sparse_grid,
        "tokens": st.tokens(cfg.grid) if cfg.family == "flexdit" else cfg.num_tokens, "batch": B,
        "inputs": [tensor("x", (B, cfg.in_channels, *size)), tensor("t", (B,)), tensor("y", (B,), "int64")],
        "outputs": [tensor("out", (B, cfg.out_channels, *size))], "artifacts": artifacts, "parity": parity,
        "macs": forward_macs(cfg, st.sparse_grid), "default_precision": plan.policy[sid],
    }


def _latent_shape(plan) -> tuple:
    cfg = plan.cfg
    return 1, cfg.in_channels, cfg.input_size, cfg.input_size


def decoder_component(plan) -> Component:
    vae = plan.decoder
    gen = torch.Generator().manual_seed(plan.seed + 77)
    shape = _latent_shape(plan)

    def make_inputs(i):
        return (torch.randn(shape, generator=gen) * VAE_LATENT_SCALE / vae.scale_factor * 4,)

    img = plan.cfg.input_size * vae.upscale
    return Component(what="VAE decoder", stem="decoder/vae_decoder", module=vae, make_inputs=make_inputs,
                     input_names=("latent",), output_names=("image",), summary=f"decoder: SD-VAE -> {img}x{img}")


DECODER_BUILDS = (("onnx", "fp32"),)


def decoder_entry(plan, artifacts: list, parity: dict) -> dict:
    img = plan.cfg.input_size * plan.decoder.upscale
    return {"kind": "sd-vae", "scale_factor": plan.decoder.scale_factor,
            "inputs": [tensor("latent", _latent_shape(plan))], "outputs": [tensor("image", (1, 3, img, img))],
            "artifacts": artifacts, "parity": parity}
