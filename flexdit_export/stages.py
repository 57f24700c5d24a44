"""One specialised module per schedule stage: the sparse grid and its tables are frozen in,
so every export (ONNX, TorchScript) sees only static shapes."""

from __future__ import annotations

import torch
from torch import nn

from .model.layers import GridResampler
from .schedule import Stage

INPUT_NAMES = ("x", "t", "y")
OUTPUT_NAMES = ("out",)


class StageModule(nn.Module):
    """forward(x float32 (B,Cin,H,W), t float32 (B,) original indices, y int64 (B,)) -> out."""

    def __init__(self, model, stage: Stage):
        super().__init__()
        self.model = model
        self.stage = stage
        cfg = model.cfg
        self.rs = None if cfg.family == "dit" else GridResampler(cfg.grid, stage.sparse_grid or cfg.grid)

    def forward(self, x, t, y):
        return self.model.run(x, t, y, self.rs)


def sample_inputs(cfg, batch: int, generator: torch.Generator, t_range=(0, 999)):
    """Fresh random inputs of a stage: x ~ N(0,1), t uniform in the stage's range, y any label
    including the null class."""
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=generator)
    t = torch.randint(t_range[0], t_range[1] + 1, (batch,), generator=generator).float()
    y = torch.randint(0, cfg.num_classes + 1, (batch,), generator=generator)
    return x, t, y
