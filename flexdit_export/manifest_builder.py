"""The bundle manifest, assembled in one place from the plan and what the builders produced."""

from __future__ import annotations

import platform

import torch

from . import __version__


def versions() -> dict:
    import onnx
    import onnxruntime

    return {"tool": f"flexdit-export {__version__}", "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def assemble(plan, stage_entries: list, decoder: dict | None, calib) -> dict:
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
        "weights": builder_weight_files(stage_entries),
    }


def builder_weight_files(stage_entries: list) -> list:
    """Weight files a builder wrote itself (AOTI: one per precision for every stage package),
    handed over on its artifacts as ``_weight_file``; ``share_weights`` adds the ONNX ones."""
    files = {}
    for st in stage_entries:
        for a in st["artifacts"]:
            w = a.pop("_weight_file", None)
            if w is not None:
                files[w["id"]] = w
    return [files[k] for k in sorted(files)]


def calibration_record(calib, stage_entries: list, method: str) -> dict:
    stages = []
    for st, entry in zip(calib.stages, stage_entries):
        errors = {a["precision"]: a["error"]["rel_rms"] for a in entry["artifacts"] if "error" in a}
        stages.append({"id": st["id"], "t_values": st["calib"]["t_values"], "calib_rows": st["calib"]["rows"],
                       "holdout_rows": st["holdout"]["rows"], "rel_rms_error": errors})
    return {"sha256": calib.sha256, "path": calib.root.name, "method": method, "settings": calib.settings,
            "stages": stages}


def quality_record(reports: dict) -> dict:
    """One gate: its report as it is; several: {gate name: report}."""
    return next(iter(reports.values())) if len(reports) == 1 else reports
