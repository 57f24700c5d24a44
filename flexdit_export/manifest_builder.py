"""The bundle manifest, assembled in one place from the plan and what the builders produced."""

from __future__ import annotations

import dataclasses
import platform

import torch

from flexdit_bundle.spec import Manifest

from . import __version__


def versions() -> dict:
    import onnx
    import onnxruntime

    return {"tool": f"flexdit-export {__version__}", "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def assemble(plan, stage_entries: list, decoder: dict | None, calib, weight_files: list) -> dict:
    """The manifest before ``finalize``; ``weight_files``: those the builders wrote themselves."""
    cfg, ck = plan.cfg, plan.checkpoint
    return {
        "created_by": versions(),
        "model": {"family": cfg.family, "name": cfg.name, "config": cfg.to_dict(), "num_classes": cfg.num_classes,
                  "null_class": cfg.num_classes, "class_names": plan.class_names,
                  "source": {"file": plan.ckpt_path.name, "format": ck.source_format, "notes": ck.notes}},
        "diffusion": {"num_timesteps": plan.num_timesteps, "beta_schedule": "linear", "beta_start": 1e-4,
                      "beta_end": 0.02, "variance_type": "learned_range" if cfg.learn_sigma else "fixed_large",
                      "prediction_type": "epsilon", "cfg_channels": plan.cfg_channels,
                      "defaults": dict(plan.sampling_defaults)},
        "stages": stage_entries,
        "decoder": decoder,
        "output": {"space": "decoded" if decoder else ("pixel" if cfg.in_channels in (1, 3) else "latent"),
                   "value_range": [-1.0, 1.0]},
        "calibration": None if calib is None else calibration_record(calib, stage_entries, plan.quant.calib_method),
        "weights": sorted(weight_files, key=lambda w: w["id"]),
    }


def calibration_record(calib, stage_entries: list, method: str) -> dict:
    stages = []
    for st, entry in zip(calib.stages, stage_entries):
        errors = {a["precision"]: a["error"]["rel_rms"] for a in entry["artifacts"] if "error" in a}
        stages.append({"id": st["id"], "t_values": st["calib"]["t_values"], "calib_rows": st["calib"]["rows"],
                       "holdout_rows": st["holdout"]["rows"], "rel_rms_error": errors})
    return {"sha256": calib.sha256, "path": calib.root.name, "method": method, "settings": calib.settings,
            "stages": stages}


def with_quality(manifest: Manifest, reports: dict) -> Manifest:
    """The finalized manifest with the gates' record: one gate's report as it is, several as
    {gate name: report}; written before ``shared_graphs``, where manifests have always had it."""
    order = [k for k in manifest.to_json() if k != "quality"]
    order.insert(order.index("shared_graphs") if "shared_graphs" in order else len(order), "quality")
    record = next(iter(reports.values())) if len(reports) == 1 else reports
    return dataclasses.replace(manifest, quality=record, key_order=tuple(order))
