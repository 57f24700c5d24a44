"""checkpoint -> bundle: plan -> builders -> manifest, behind ``flexdit-export convert``.

``plan.resolve_plan`` checks and resolves every option (nothing is written before it has
passed); each component (every schedule stage, the VAE decoder) then runs the builders its
plan lists, through the one contract of ``builders.base``; ``manifest_builder`` assembles the
manifest; ``finalize`` shares weights and graphs and validates it, once; the quality-gate
plug-ins judge that finished bundle; the writer publishes it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flexdit_bundle.precision import describe as describe_policy
from flexdit_bundle.spec import Manifest

from .bundle import BundleWriter
from .builders import BuildContext, Component, builder_for
from .components import DECODER_BUILDS, decoder_component, decoder_entry, stage_component, stage_entry
from .errors import UserError
from .finalize import finalize
from .manifest_builder import assemble, with_quality
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
    with BundleWriter(out, plan.force) as w:
        ctx = BuildContext(plan=plan, writer=w, work=w.scratch(), calib=calib, log=log)
        stages, weight_files = [], {}
        for sid in range(len(plan.stages)):
            artifacts, parity, files = build_component(stage_component(plan, sid), plan.builds[sid], ctx)
            stages.append(stage_entry(plan, sid, artifacts, parity))
            weight_files.update(files)
        decoder = None
        if plan.decoder is not None:
            artifacts, parity, files = build_component(decoder_component(plan), DECODER_BUILDS, ctx)
            decoder = decoder_entry(plan, artifacts, parity)
            weight_files.update(files)
        manifest = finalize(w.tmp, assemble(plan, stages, decoder, calib, list(weight_files.values())), log)
        return w.commit(_run_gates(plan, w, manifest, log))


def build_component(comp: Component, keys, ctx: BuildContext) -> tuple[list, dict, dict]:
    """Run the builders ``keys`` ((backend, precision), in order) for one component; -> (its
    manifest artifacts, its parity map against PyTorch, {id: weight file} the builders wrote)."""
    artifacts, parity, weight_files = [], {}, {}
    for key in keys:
        ctx.log(f"{comp.what}: building {key[0]} {key[1]} ...")  # an export or a calibration can take minutes
        builder = builder_for(*key)()
        files = builder.build(comp, ctx)
        record = builder.check(comp, ctx, files)
        artifact = builder.describe(comp, ctx, files, record)
        comp.built[key] = (files, artifact)
        artifacts.append(artifact)
        weight_files.update((w["id"], w) for w in builder.weight_files(comp, ctx))
        if builder.measures_parity:
            parity["/".join(key)] = record
    return artifacts, parity, weight_files


def _log_plan(plan: ConvertPlan, log) -> None:
    cfg, ck = plan.cfg, plan.checkpoint
    log(f"model: {cfg.name} ({ck.source_format}), {sum(p.numel() for p in plan.model.parameters()) / 1e6:.1f}M params, "
        f"latent {cfg.in_channels}x{cfg.input_size}x{cfg.input_size}, {cfg.num_tokens} tokens")
    for note in ck.notes:
        log(f"note: {note}")
    log(f"schedule: {describe(list(plan.stages), cfg.grid)}")


def _run_gates(plan: ConvertPlan, w: BundleWriter, manifest: Manifest, log) -> Manifest:
    """-> the finalized ``manifest`` with the gates' record (as it is without gates)."""
    if not plan.gates:
        return manifest
    preview = w.preview(manifest)
    reports = {gate.name: gate.run(preview, seed=plan.seed, log=log) for gate in plan.gates}
    for report in reports.values():
        if not report["passed"]:
            raise UserError(f"the bundle fails the end-to-end quality gate: {report['verdict']}")
    return with_quality(manifest, reports)
