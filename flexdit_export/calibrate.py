"""``flexdit-export calibrate``: capture a per-stage calibration set on its own (``convert
--calib DIR`` then uses it; ``flexdit-export inspect DIR`` shows what each stage holds)."""

from __future__ import annotations

from pathlib import Path

from .checkpoints import load_checkpoint
from .convert import default_cfg_channels, sampling_defaults
from .errors import UserError
from .schedule import parse_schedule


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
    cfg = ck.config
    stages = parse_schedule(schedule or ck.trained_schedule or "released", T=num_timesteps, grid=cfg.grid,
                            family=cfg.family, semantic_size=cfg.semantic_size)
    try:
        s = CaptureSettings.from_defaults(sampling_defaults(ck, {}), batch, settings or {})
    except ValueError as e:
        raise UserError(f"calibration settings: {e}") from None
    model = ck.build()
    channels = cfg_channels or default_cfg_channels(cfg)
    try:
        return capture(model, [{"id": i, **st.to_dict()} for i, st in enumerate(stages)], s, out,
                       num_timesteps=num_timesteps, cfg_channels=channels, replace=force, log=log)
    except CalibError as e:
        raise UserError(str(e)) from None
