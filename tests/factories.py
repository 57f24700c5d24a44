"""Random-weight checkpoints in every format the toolchain reads, small enough for CI."""

import argparse

import torch

from flexdit_export.model import ModelConfig, build_model

TINY_FLEX = dict(family="flexdit", hidden_size=64, num_heads=4, patch_size=2, input_size=16, in_channels=4,
                 num_classes=10, depth=1 + 2 * 4 + 1, num_poolingformer=1, num_dumbbell=2,
                 dumbbell_group=[1, 1, 1, 1], num_normal_block=1, semantic_size=3)
TINY_DIT = dict(family="dit", hidden_size=64, num_heads=4, patch_size=2, input_size=16, in_channels=4,
                num_classes=10, depth=4)


def random_model(cfg: dict | ModelConfig, seed=0, scale=0.08):
    """A model whose every weight is random (adaLN-Zero init would make outputs trivially 0)."""
    cfg = cfg if isinstance(cfg, ModelConfig) else ModelConfig(**cfg)
    torch.manual_seed(seed)
    m = build_model(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name != "pos_embed":
                p.normal_(0, scale)
    return m.eval()


def save_reference_training(model, path, model_name="DiT-custom"):
    """The authors' train.py layout: {model, ema, opt, args} with an argparse.Namespace."""
    c = model.cfg
    args = argparse.Namespace(model=model_name, image_size=c.input_size * 8, num_classes=c.num_classes,
                              num_poolingformer=c.num_poolingformer, num_dumbbell=c.num_dumbbell,
                              dumbbell_group=list(c.dumbbell_group), num_normal_block=c.num_normal_block,
                              semantic_size=c.semantic_size, global_seed=0, results_dir="results")
    sd = model.state_dict()
    noisy = {k: v + 1.0 for k, v in sd.items()}  # "model" differs from "ema": loaders must take ema
    torch.save({"model": noisy, "ema": sd, "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "args": args}, path)
    return path


def save_state_dict(model, path):
    torch.save(model.state_dict(), path)
    return path
