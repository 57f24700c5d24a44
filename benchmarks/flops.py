"""Multiply-accumulates per forward pass (attention included) against the paper's counts
(spec section 6). Usage: python benchmarks/flops.py"""

from flexdit_export.checkpoints import LAYOUT_PRESETS
from flexdit_export.flops import forward_macs
from flexdit_export.model import ModelConfig
from flexdit_export.schedule import paper4_grids

XL = dict(hidden_size=1152, num_heads=16, depth=28, patch_size=2)


def flex(latent, layout):
    npf, nd, g, top = LAYOUT_PRESETS[layout]
    return ModelConfig(family="flexdit", input_size=latent, num_poolingformer=npf, num_dumbbell=nd, dumbbell_group=g,
                       num_normal_block=top, **XL)


def main():
    rows = [("DiT-XL/2 256px", ModelConfig(family="dit", input_size=32, **XL), None, "118.6"),
            ("DiT-XL/2 512px", ModelConfig(family="dit", input_size=64, **XL), None, "525 (524.5 with attention)"),
            ("FlexDiT-XL/2 256px layout, s=8", flex(32, "256"), 8, "~69 (68.1 reported)"),
            ("FlexDiT-XL/2 512px layout, s=8", flex(64, "512"), 8, "~236")]
    for lat, layout in ((32, "256"), (64, "512")):
        for s in paper4_grids(lat // 2):
            rows.append((f"FlexDiT-XL/2 {lat * 8}px paper4 stage s={s}", flex(lat, layout), s, ""))
    print("| model | GMAC (reference convention) | GMAC (as executed, O(N) Poolingformer) | spec |")
    print("|---|---|---|---|")
    for name, cfg, s, spec in rows:
        print(f"| {name} | {forward_macs(cfg, s) / 1e9:.1f} | {forward_macs(cfg, s, 'executed') / 1e9:.1f} | {spec} |")


if __name__ == "__main__":
    main()
