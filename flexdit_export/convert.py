"""checkpoint -> bundle: plan -> builders -> manifest, behind ``flexdit-export convert``.

``plan.resolve_plan`` checks and resolves every option (nothing is written before it has
passed); each component (every schedule stage, the VAE decoder) then runs the builders its
plan lists, through the one contract of ``builders.base``; ``manifest_builder`` assembles the
manifest; the quality-gate plug-ins judge the finished bundle before it is published.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flexdit_bundle.precision import describe as describe_policy

from .bundle import BundleWriter
from .builders import BuildContext, Component, builder_for
from .components import DECODER_BUILDS, decoder_component, decoder_entry, stage_component, stage_entry
from .errors import UserError
from .manifest_builder import assemble, quality_record
from .options import ConvertOptions
from .plan import ConvertPlan, resolve_plan
from .schedule import describe

__all__ = ["ConvertOptions", "convert"]


def convert(ckpt_path, out, opts: ConvertOptions, log=print, gates=()) -> Path:
    """``gates``: ``quality_gates.QualityGate`` plug-ins run on the finished bundle; a failed
    gate publishes nothing."""
    plan = resolve_plan(ckpt_path, out, opts, gates)
    torch.manual_seed(plan.seed)
    _log_plan(plan, log)
    calib = None
    if plan.calibration is not None:
        from .calibrate import stage_calibration

        log(f"precision policy: {describe_policy(dict(plan.policy))}")
        calib = stage_calibration(plan, log)
    with BundleWriter(out, plan.force, log) as w:
        ctx = BuildContext(plan=plan, writer=w, work=w.scratch(), calib=calib, log=log)
        stages = []
        for sid in range(len(plan.stages)):
            artifacts, parity = build_component(stage_component(plan, sid), plan.builds[sid], ctx)
            stages.append(stage_entry(plan, sid, artifacts, parity))
        decoder = None
        if plan.decoder is not None:
            decoder = decoder_entry(plan, *build_component(decoder_component(plan), DECODER_BUILDS, ctx))
        manifest = assemble(plan, stages, decoder, calib)
        _run_gates(plan, w, manifest, log)
        return w.commit(manifest)


def build_component(comp: Component, keys, ctx: BuildContext) -> tuple[list, dict]:
    """Run the builders ``keys`` ((backend, precision), in order) for one component; -> (its
    manifest artifacts, its parity map against PyTorch)."""
    artifacts, parity = [], {}
    for key in keys:
        ctx.log(f"{comp.what}: building {key[0]} {key[1]} ...")  # an export or a calibration can take minutes
        builder = builder_for(*key)()
        files = builder.build(comp, ctx)
        record = builder.check(comp, ctx, files)
        artifact = builder.describe(comp, ctx, files, record)
        comp.built[key] = (files, artifact)
        artifacts.append(artifact)
        if builder.measures_parity:
            parity["/".join(key)] = record
    return artifacts, parity


def _log_plan(plan: ConvertPlan, log) -> None:
    cfg, ck = plan.cfg, plan.checkpoint
    log(f"model: {cfg.name} ({ck.source_format}), {sum(p.numel() for p in plan.model.parameters()) / 1e6:.1f}M params, "
        f"latent {cfg.in_channels}x{cfg.input_size}x{cfg.input_size}, {cfg.num_tokens} tokens")
    for note in ck.notes:
        log(f"note: {note}")
    log(f"schedule: {describe(list(plan.stages), cfg.grid)}")


def _run_gates(plan: ConvertPlan, w: BundleWriter, manifest: dict, log) -> None:
    if not plan.gates:
        return
    preview = w.preview(manifest)
    reports = {gate.name: gate.run(preview, seed=plan.seed, log=log) for gate in plan.gates}
    manifest["quality"] = quality_record(reports)
    for report in reports.values():
        if not report["passed"]:
            raise UserError(f"the bundle fails the end-to-end quality gate: {report['verdict']}")
