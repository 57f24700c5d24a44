"""PyTorch DiT / FlexDiT with the reference numerics and export-friendly ops."""

from .config import SIZES, ConfigError, ModelConfig
from .networks import DiffusionTransformer, build_model

__all__ = ["SIZES", "ConfigError", "ModelConfig", "DiffusionTransformer", "build_model"]
