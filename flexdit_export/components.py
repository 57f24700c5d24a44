"""The components of a bundle: one per schedule stage, and the VAE decoder when there is one.
Each says what module its builders export, where its files go, and the manifest entry its
artifacts end up in; its graph inputs and outputs, and the inputs its parity checks draw
(seeded per component, so a component's numbers do not depend on what else is built), come
from its declaration in ``component_io``."""

from __future__ import annotations

from . import component_io
from .builders import Component
from .flops import forward_macs
from .stages import StageModule


def _component(io, seed: int, **fields) -> Component:
    return Component(make_inputs=io.sampler(seed), input_names=io.input_names, output_names=io.output_names, **fields)


def stage_component(plan, sid: int) -> Component:
    cfg, st = plan.cfg, plan.stages[sid]
    io = component_io.stage_io(cfg, st, plan.batch)
    tag = f"stage{sid}_" + ("dense" if st.sparse_grid is None else f"s{st.sparse_grid}")
    return _component(io, plan.seed * 1000 + sid, what=f"stage {sid}", stem=f"stages/{tag}",
                      module=StageModule(plan.model, st).eval(),
                      summary=f"stage {sid}: t {st.t_max}..{st.t_min}, {st.tokens(cfg.grid)} "
                              f"{'sparse' if st.sparse_grid else 'dense'} tokens",
                      optimize=plan.optimize, stage_id=sid)


def stage_entry(plan, sid: int, artifacts: list, parity: dict) -> dict:
    cfg, st, B = plan.cfg, plan.stages[sid], plan.batch
    return {
        "id": sid, "t_min": st.t_min, "t_max": st.t_max, "sparse_grid": st.sparse_grid,
        "tokens": st.tokens(cfg.grid) if cfg.family == "flexdit" else cfg.num_tokens, "batch": B,
        **component_io.stage_io(cfg, st, B).manifest_entries(), "artifacts": artifacts, "parity": parity,
        "macs": forward_macs(cfg, st.sparse_grid), "default_precision": plan.policy[sid],
    }


def decoder_component(plan) -> Component:
    vae = plan.decoder
    img = plan.cfg.input_size * vae.upscale
    return _component(component_io.decoder_io(plan.cfg, vae), plan.seed + 77, what="VAE decoder",
                      stem="decoder/vae_decoder", module=vae, summary=f"decoder: SD-VAE -> {img}x{img}")


DECODER_BUILDS = (("onnx", "fp32"),)


def decoder_entry(plan, artifacts: list, parity: dict) -> dict:
    return {"kind": "sd-vae", "scale_factor": plan.decoder.scale_factor,
            **component_io.decoder_io(plan.cfg, plan.decoder).manifest_entries(),
            "artifacts": artifacts, "parity": parity}
