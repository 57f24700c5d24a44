"""The compiler's side of ``calib/``: ``flexdit-export calibrate`` (capture a per-stage set on
its own; ``convert --calib DIR`` then uses it, ``flexdit-export inspect DIR`` shows it) and the
calibration set a conversion's plan asks for (given, reused or captured)."""

from __future__ import annotations

from pathlib import Path

from .checkpoints import load_checkpoint
from .errors import UserError
from .plan import default_cfg_channels, resolve_schedule, sampling_defaults
from .reference_sampler import reference_sample


def calibrate(ckpt, out, *, schedule=None, batch=2, num_heads=None, semantic_size=None, init_from_dit=None,
              num_timesteps=1000, cfg_channels=None, settings=None, force=False, log=print):
    from calib import CalibError
    from calib.capture import CaptureSettings, capture

    if Path(out).exists() and not force:
        raise UserError(f"{out} already exists (use --force to replace it)")
    if not 1 <= batch <= 4096:
        raise UserError(f"--batch must be between 1 and 4096, got {batch}")
    if num_timesteps < 2:
        raise UserError(f"--num-timesteps must be at least 2, got {num_timesteps}")
    ck = load_checkpoint(ckpt, num_heads, semantic_size, init_from_dit)
    stages = resolve_schedule(ck, schedule, num_timesteps)
    try:
        s = CaptureSettings.from_defaults(sampling_defaults(ck, {}), batch, settings or {})
    except ValueError as e:
        raise UserError(f"calibration settings: {e}") from None
    model = ck.build()
    channels = cfg_channels or default_cfg_channels(ck.config)
    try:
        return capture(model, [{"id": i, **st.to_dict()} for i, st in enumerate(stages)], s, out,
                       sample=reference_sample, num_timesteps=num_timesteps, cfg_channels=channels, replace=force,
                       log=log)
    except CalibError as e:
        raise UserError(str(e)) from None


def stage_calibration(plan, log):
    """The plan's calibration set, ready for the builders: the given one, or the capture into
    ``OUT.calib`` (reused when it was made with exactly these settings). Every stage needs at
    least one graph batch of calibration and of held-out rows."""
    from calib import CalibError
    from calib.capture import capture_or_reuse

    choice = plan.calibration
    if choice.existing is not None:
        cs = choice.existing
        log(f"calibration: using {cs.root} ({cs.sha256[:12]})")
    else:
        try:
            cs = capture_or_reuse(plan.model, plan.stage_dicts, choice.settings, choice.target,
                                  sample=reference_sample, num_timesteps=plan.num_timesteps,
                                  cfg_channels=plan.cfg_channels, log=log)
        except CalibError as e:
            raise UserError(str(e)) from None
    for st in plan.stage_dicts:
        for split in ("calib", "holdout"):
            if cs.rows(st["id"], split) < plan.batch:
                raise UserError(f"calibration set {cs.root} has {cs.rows(st['id'], split)} {split} rows for stage "
                                f"{st['id']}, fewer than the graph batch {plan.batch}; capture more images")
    return cs
