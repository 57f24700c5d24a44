"""The model's architecture as plain data (no torch), so it can live in a manifest."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Named DiT bodies from the DiT paper: (hidden size, heads, depth).
SIZES = {"XL": (1152, 16, 28), "L": (1024, 16, 24), "B": (768, 12, 12), "S": (384, 6, 12)}


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model."""


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network; read from checkpoint keys or given by flags.

    ``family`` is ``"flexdit"`` (Poolingformer -> SDTMs -> top blocks) or ``"dit"``
    (``depth`` plain blocks). ``semantic_size`` is the sparse grid the checkpoint was trained
    with; the schedule may run other grids since no weight depends on it.
    """

    family: str = "flexdit"
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: int = 2
    input_size: int = 32  # latent (or pixel) height = width
    in_channels: int = 4
    learn_sigma: bool = True
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    depth: int = 28
    num_poolingformer: int = 0
    num_dumbbell: int = 0
    dumbbell_group: list = field(default_factory=lambda: [0, 0, 0, 0])
    num_normal_block: int = 0
    semantic_size: int = 8

    def __post_init__(self):
        self.dumbbell_group = [int(g) for g in self.dumbbell_group]
        if self.family == "dit":
            self.num_poolingformer, self.num_dumbbell = 0, 0
            self.dumbbell_group = [0, 0, 0, 0]
            self.num_normal_block = self.depth
        self.validate()

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def grid(self) -> int:
        """Dense token grid side S = input_size / patch_size."""
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def validate(self) -> None:
        if self.family not in ("flexdit", "dit"):
            raise ConfigError(f"unknown model family {self.family!r} (expected flexdit or dit)")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if self.input_size % self.patch_size:
            raise ConfigError(f"input size {self.input_size} is not divisible by patch size {self.patch_size}")
        if len(self.dumbbell_group) != 4:
            raise ConfigError(f"dumbbell_group must have 4 entries, got {self.dumbbell_group}")
        if self.family == "flexdit":
            n = self.num_poolingformer + self.num_dumbbell * sum(self.dumbbell_group) + self.num_normal_block
            if n != self.depth:
                raise ConfigError(f"layout has {n} blocks but depth is {self.depth}")
            if self.num_dumbbell and self.dumbbell_group[2] < 1:
                raise ConfigError("each SDTM needs at least one token-recover block to return to the dense grid")
            if self.num_dumbbell and not 1 <= self.semantic_size <= self.grid:
                raise ConfigError(f"semantic size {self.semantic_size} is outside 1..{self.grid}")

    @property
    def name(self) -> str:
        size = next((k for k, v in SIZES.items() if v == (self.hidden_size, self.num_heads, self.depth)), None)
        body = f"{size}/{self.patch_size}" if size else f"C{self.hidden_size}h{self.num_heads}d{self.depth}/{self.patch_size}"
        return ("FlexDiT-" if self.family == "flexdit" else "DiT-") + body

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    def block_order(self) -> list[str]:
        """State-dict prefixes of the blocks in execution order (bottom to top)."""
        if self.family == "dit":
            return [f"blocks.{k}" for k in range(self.depth)]
        names = [f"poolingformer_blocks.{i}" for i in range(self.num_poolingformer)]
        kinds = ("token_merge_blocks", "semantic_blocks", "token_recover_blocks", "normal_blocks")
        for d in range(self.num_dumbbell):
            for kind, count in zip(kinds, self.dumbbell_group):
                names += [f"dumbbell_blocks.{d}.{kind}.{j}" for j in range(count)]
        names += [f"normal_blocks.{i}" for i in range(self.num_normal_block)]
        return names
