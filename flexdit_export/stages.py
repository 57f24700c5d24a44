"""One specialised module per schedule stage: the sparse grid and its tables are frozen in,
so every export (ONNX, TorchScript) sees only static shapes."""

from __future__ import annotations

from torch import nn

from .model.layers import GridResampler
from .schedule import Stage


class StageModule(nn.Module):
    """forward(x, t, y) -> out, the tensors ``component_io.stage_io`` declares."""

    def __init__(self, model, stage: Stage):
        super().__init__()
        self.model = model
        self.stage = stage
        cfg = model.cfg
        self.rs = None if cfg.family == "dit" else GridResampler(cfg.grid, stage.sparse_grid or cfg.grid)

    def forward(self, x, t, y):
        return self.model.run(x, t, y, self.rs)

