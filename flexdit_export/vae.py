"""The Stable Diffusion VAE decoder (diffusers ``AutoencoderKL`` layout), rebuilt in plain
PyTorch so the compiler needs no diffusers at run time. Reads ``config.json`` +
``diffusion_pytorch_model.safetensors`` (or ``.bin``) from a local directory, with either the
current (to_q/to_k/to_v/to_out.0) or the legacy (query/key/value/proj_attn) attention names.
The exported graph takes the sampler's latent and divides by the scale factor itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups, eps=1e-6):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention of the VAE's mid block."""

    def __init__(self, c, groups, eps=1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x):
        b, c, h, w = x.shape
        z = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)
        a = F.scaled_dot_product_attention(self.to_q(z)[:, None], self.to_k(z)[:, None], self.to_v(z)[:, None])[:, 0]
        return x + self.to_out[0](a).transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, c, groups, attention=True):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])
        self.attentions = nn.ModuleList([AttentionBlock(c, groups)] if attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for a in self.attentions:
            x = a(x)
        return self.resnets[1](x)


class Upsampler(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpBlock(nn.Module):
    def __init__(self, cin, cout, layers, groups, upsample):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(layers))
        self.upsamplers = nn.ModuleList([Upsampler(cout)] if upsample else [])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        for u in self.upsamplers:
            x = u(x)
        return x


class Decoder(nn.Module):
    def __init__(self, latent, out_ch, chans, layers, groups, mid_attention=True):
        super().__init__()
        rev = list(reversed(chans))
        self.conv_in = nn.Conv2d(latent, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups, mid_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(rev[max(0, i - 1)], rev[i], layers + 1, groups, i < len(rev) - 1) for i in range(len(rev)))
        self.conv_norm_out = nn.GroupNorm(groups, chans[0], 1e-6)
        self.conv_out = nn.Conv2d(chans[0], out_ch, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for up in self.up_blocks:
            x = up(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAEDecoder(nn.Module):
    """latent (as the sampler leaves it) -> image in [-1, 1]."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.scale_factor = float(config.get("scaling_factor", 0.18215))
        lat = int(config.get("latent_channels", 4))
        self.post_quant_conv = nn.Conv2d(lat, lat, 1) if config.get("use_post_quant_conv", True) else None
        self.decoder = Decoder(lat, int(config.get("out_channels", 3)), list(config.get("block_out_channels", [128, 256, 512, 512])),
                               int(config.get("layers_per_block", 2)), int(config.get("norm_num_groups", 32)),
                               bool(config.get("mid_block_add_attention", True)))

    @property
    def latent_channels(self) -> int:
        return int(self.config.get("latent_channels", 4))

    @property
    def upscale(self) -> int:
        return 2 ** (len(self.config.get("block_out_channels", [128, 256, 512, 512])) - 1)

    def forward(self, latent):
        z = latent / self.scale_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def _normalise_keys(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if not k.startswith(("decoder.", "post_quant_conv.")):
            continue  # encoder weights are not needed
        parts = k.split(".")
        if "attentions" in parts and parts[-2] in LEGACY_ATTN:
            k = ".".join(parts[:-2] + [LEGACY_ATTN[parts[-2]], parts[-1]])
        if ".attentions." in k and v.ndim == 4 and k.endswith("weight"):
            v = v[:, :, 0, 0]  # 1x1 conv weights of very old checkpoints
        out[k] = v
    return out


def load_vae_decoder(path) -> VAEDecoder:
    root = Path(path)
    if root.is_file():
        root = root.parent
    cfg_file = root / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"VAE directory {root} has no config.json (expected the diffusers AutoencoderKL layout)")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read VAE config {cfg_file}: {e}") from None
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise UserError(f"VAE config is for {config.get('_class_name')}, not AutoencoderKL")
    weights = next((root / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                    if (root / n).is_file()), None)
    if weights is None:
        raise UserError(f"VAE directory {root} has no diffusion_pytorch_model.safetensors")
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(weights))
        else:
            sd = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read VAE weights {weights}: {str(e).splitlines()[0][:200]}") from None
    model = VAEDecoder(config)
    missing, unexpected = model.load_state_dict(_normalise_keys(sd), strict=False)
    if missing or unexpected:
        bad = (missing or unexpected)[0]
        raise UserError(f"VAE weights do not fit its config.json: {len(missing)} missing, {len(unexpected)} unexpected keys (e.g. {bad})")
    return model.eval()
