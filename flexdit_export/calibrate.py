"""The compiler's side of ``flexdit_export/calib/``: ``flexdit-export calibrate`` (capture a per-stage set on
its own; ``convert --calib DIR`` then uses it, ``flexdit-export inspect DIR`` shows it) and the
calibration set a conversion's plan asks for (given, reused or captured)."""

from __future__ import annotations

from flexdit_bundle.files import target_problem

from .checkpoints import load_checkpoint
from .errors import UserError
from .plan import default_cfg_channels, resolve_schedule, sampling_defaults
from .reference_sampler import reference_sample
from .schedule import check_explicit


def calibrate(ckpt, out, *, schedule=None, batch=2, num_heads=None, semantic_size=None, init_from_dit=None,
              num_timesteps=1000, cfg_channels=None, settings=None, force=False, log=print):
    from flexdit_export.calib import CalibError
    from flexdit_export.calib.capture import CaptureSettings, capture

    problem = target_problem(out, force, "calibration set directory")
    if problem:
        raise UserError(problem)
    check_explicit(schedule)
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
    from flexdit_export.calib import CalibError
    from flexdit_export.calib.capture import capture_or_reuse

    choice = plan.calibration
    if choice.existing is not None:
        cs = choice.existing
        log(f"calibration: using {cs.root} ({cs.sha256[:12]})")
    elif (found := find_matching_set(plan)) is not None:
        cs = found
        log(f"calibration: reusing {cs.root} (content {cs.sha256[:12]}): captured from the same weights and "
            "schedule with the same settings (pass --calib DIR to choose another)")
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


def find_matching_set(plan, limit: int = 64):
    """A calibration set already on disk that this conversion can use as it is: the plan's own
    target or a sibling of the bundle directory (``flexdit-export calibrate -o out/x.calib``
    beside ``-o out/bundle``), matched by content: the weights' hash, the schedule and the
    capture settings. When no graph needs static scales (only the held-out gate reads rows), any
    set of the same weights and schedule with enough rows will do. None when there is none."""
    from flexdit_export.calib import CalibError, CalibSet
    from flexdit_export.calib.capture import settings_record
    from flexdit_export.calib.store import INDEX

    choice = plan.calibration
    want = settings_record(plan.model, choice.settings, plan.num_timesteps, plan.cfg_channels)
    from .plan import needs_static_scales
    exact = needs_static_scales(plan)
    parent = choice.target.parent
    try:
        siblings = sorted(p for p in parent.iterdir() if p != choice.target and (p / INDEX).is_file())[:limit]
    except OSError:
        siblings = []
    for root in [choice.target, *siblings]:
        if not (root / INDEX).is_file():
            continue
        try:
            cs = CalibSet.open(root)
            cs.check_matches(want["model_sha256"], plan.stage_dicts, plan.num_timesteps)
        except CalibError:
            continue
        if exact and cs.settings != want:
            continue
        keys = ("cfg_channels", "sampler", "steps", "cfg_scale", "eta", "spacing", "clip_denoised", "batch")
        if not exact and any(cs.settings.get(k) != want[k] for k in keys):
            continue
        if all(cs.rows(st["id"], split) >= plan.batch for st in plan.stage_dicts for split in ("calib", "holdout")):
            return cs
    return None
