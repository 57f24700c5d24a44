"""An independent, deliberately naive formulation of the reference forward pass.

Written functionally from the spec (uniform N x N softmax for Poolingformer attention,
nn.AdaptiveAvgPool2d for pooling, F.interpolate(mode="nearest") for recovery, explicit
q k^T * scale softmax attention) and driven by a raw state_dict, so that it shares no code
with ``flexdit_export.model``. Tests compare the real model and the exported graphs to it.
"""

import math

import torch
import torch.nn.functional as F


def _lin(sd, name, x):
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def _mod(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _attend(q, k, v, heads):
    B, N, C = q.shape
    M = k.shape[1]
    hd = C // heads
    q = q.reshape(B, N, heads, hd).permute(0, 2, 1, 3) * hd ** -0.5
    k = k.reshape(B, M, heads, hd).permute(0, 2, 1, 3)
    v = v.reshape(B, M, heads, hd).permute(0, 2, 1, 3)
    a = (q @ k.transpose(-2, -1)).softmax(-1)
    return (a @ v).transpose(1, 2).reshape(B, N, C)


def _ada(sd, p, c, n=6):
    return _lin(sd, p + ".adaLN_modulation.1", F.silu(c)).chunk(n, dim=1)


def _mlp(sd, p, x):
    return _lin(sd, p + ".mlp.fc2", F.gelu(_lin(sd, p + ".mlp.fc1", x), approximate="tanh"))


def dit_block(sd, p, x, c, heads):
    sa, ca, ga, sm, cm, gm = _ada(sd, p, c)
    h = _mod(_ln(x), sa, ca)
    qkv = _lin(sd, p + ".attn.qkv", h)
    C = x.shape[-1]
    a = _attend(qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:], heads)
    x = x + ga.unsqueeze(1) * _lin(sd, p + ".attn.proj", a)
    return x + gm.unsqueeze(1) * _mlp(sd, p, _mod(_ln(x), sm, cm))


def pooling_block(sd, p, x, c, heads):
    sa, ca, ga, sm, cm, gm = _ada(sd, p, c)
    h = _mod(_ln(x), sa, ca)
    B, N, C = h.shape
    v = _lin(sd, p + ".attn.v", h).reshape(B, N, heads, C // heads).permute(0, 2, 1, 3)
    attn = torch.ones(B, heads, N, N).softmax(-1)
    a = (attn @ v).transpose(1, 2).reshape(B, N, C)
    x = x + ga.unsqueeze(1) * _lin(sd, p + ".attn.proj", a)
    return x + gm.unsqueeze(1) * _mlp(sd, p, _mod(_ln(x), sm, cm))


def cross_block(sd, p, x, ctx, c, heads):
    sa, ca, ga, sm, cm, gm = _ada(sd, p, c)
    q = _lin(sd, p + ".attn.q", _mod(_ln(x), sa, ca))
    kv = _lin(sd, p + ".attn.kv", _mod(_ln(ctx), sa, ca))
    C = x.shape[-1]
    a = _attend(q, kv[..., :C], kv[..., C:], heads)
    x = x + ga.unsqueeze(1) * _lin(sd, p + ".attn.proj", a)
    return x + gm.unsqueeze(1) * _mlp(sd, p, _mod(_ln(x), sm, cm))


def recover_block(sd, p, x, dense, c, heads, S):
    B, M, C = x.shape
    g = int(math.sqrt(M))
    up = F.interpolate(x.reshape(B, g, g, C).permute(0, 3, 1, 2), size=(S, S), mode="nearest")
    up = up.permute(0, 2, 3, 1).reshape(B, S * S, C)
    merged = _lin(sd, p + ".merged_layer1", up) + _lin(sd, p + ".merged_layer2", dense)
    return cross_block(sd, p, merged, x, c, heads)  # merged tokens query the current ones


def timestep_embedding(t, dim=256):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def forward(sd, cfg, x, t, y, s=None):
    """cfg: dict with family, num_heads, patch_size, out_channels and the FlexDiT layout."""
    heads, p = cfg["num_heads"], cfg["patch_size"]
    B = x.shape[0]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    S = h.shape[-1]
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    temb = _lin(sd, "t_embedder.mlp.2", F.silu(_lin(sd, "t_embedder.mlp.0", timestep_embedding(t))))
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    if cfg["family"] == "dit":
        for k in range(cfg["depth"]):
            h = dit_block(sd, f"blocks.{k}", h, c, heads)
    else:
        s = cfg["semantic_size"] if s is None else s
        for i in range(cfg["num_poolingformer"]):
            h = pooling_block(sd, f"poolingformer_blocks.{i}", h, c, heads)
        g0, g1, g2, g3 = cfg["dumbbell_group"]
        for d in range(cfg["num_dumbbell"]):
            dense = h
            C = h.shape[-1]
            z = F.adaptive_avg_pool2d(h.reshape(B, S, S, C).permute(0, 3, 1, 2), s).permute(0, 2, 3, 1).reshape(B, -1, C)
            pre = f"dumbbell_blocks.{d}"
            for j in range(g0):
                z = cross_block(sd, f"{pre}.token_merge_blocks.{j}", z, dense, c, heads)
            for j in range(g1):
                z = dit_block(sd, f"{pre}.semantic_blocks.{j}", z, c, heads)
            for j in range(g2):
                z = recover_block(sd, f"{pre}.token_recover_blocks.{j}", z, dense, c, heads, S)
            for j in range(g3):
                z = dit_block(sd, f"{pre}.normal_blocks.{j}", z, c, heads)
            h = z
        for i in range(cfg["num_normal_block"]):
            h = dit_block(sd, f"normal_blocks.{i}", h, c, heads)
    sh, sc = _ada(sd, "final_layer", c, 2)
    out = _lin(sd, "final_layer.linear", _mod(_ln(h), sh, sc))
    co = cfg["out_channels"]
    out = out.reshape(B, S, S, p, p, co)
    out = torch.einsum("nhwpqc->nchpwq", out)
    return out.reshape(B, co, S * p, S * p)
