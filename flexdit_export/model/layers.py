"""Building blocks of DiT and FlexDiT with the reference numerics (spec sections 1-2).

Parameter names match the reference checkpoints exactly, so ``load_state_dict`` is strict.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .grids import adaptive_pool_matrix, upsample_token_index


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
    """MAE 2-D sin-cos table (grid*grid, dim): first half encodes the column, second the row."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], axis=1)


class PatchEmbed(nn.Module):
    def __init__(self, patch, in_ch, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def timestep_frequencies(freq_dim: int) -> torch.Tensor:
    """The reference's sinusoid frequencies, computed on the CPU in float32 exactly as it does."""
    half = freq_dim // 2
    return torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)


class TimestepEmbedder(nn.Module):
    """256-d sinusoid of the (original-index) timestep, cos half first, then an MLP.

    The frequency table is a non-persistent buffer (not a weight: the state dict is unchanged),
    made once on the CPU with the reference's arithmetic and moved with the module, so the
    forward creates no host tensor and copies nothing between host and device: a stage can be
    captured as one CUDA graph. Its values are the ones the reference recomputes every call."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.register_buffer("freqs", timestep_frequencies(freq_dim), persistent=False)

    def _apply(self, fn, recurse=True):
        # A dtype cast of the module (model.to(torch.bfloat16)) must not round the table: the
        # sinusoid is always taken in float32, as in the reference; only the device follows.
        super()._apply(fn, recurse)
        if self.freqs.dtype != torch.float32:
            self.freqs = timestep_frequencies(self.freq_dim).to(self.freqs.device)
        return self

    def forward(self, t):
        args = t[:, None].float() * self.freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class table with one extra row, the null class used for classifier-free guidance."""

    def __init__(self, num_classes, dim, dropout_prob=0.1):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _heads(x, h):
    b, n, c = x.shape
    return x.reshape(b, n, h, c // h).transpose(1, 2)


def _merge_heads(x):
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = self.heads
        return self.proj(_merge_heads(F.scaled_dot_product_attention(_heads(q, h), _heads(k, h), _heads(v, h))))


class CrossAttention(nn.Module):
    """Queries from one token set, keys/values (kv rows: k then v) from another."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, ctx):
        k, v = self.kv(ctx).chunk(2, dim=-1)
        h = self.heads
        return self.proj(_merge_heads(F.scaled_dot_product_attention(_heads(self.q(x), h), _heads(k, h), _heads(v, h))))


class PoolingAttention(nn.Module):
    """Uniform attention in O(N): softmax of a constant row is 1/N, so every token receives
    proj(v(mean of the tokens)). Same function as the reference's all-ones N x N softmax."""

    def __init__(self, dim):
        super().__init__()
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        pooled = self.proj(self.v(x.mean(dim=1, keepdim=True)))
        return pooled.expand(-1, x.shape[1], -1)


class _AdaLNBlock(nn.Module):
    """Shared skeleton: LayerNorms without affine, adaLN-Zero modulation, GELU-tanh MLP."""

    def __init__(self, dim, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def _mlp_branch(self, x, shift, scale, gate):
        return x + gate.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift, scale))


class DiTBlock(_AdaLNBlock):
    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__(dim, mlp_ratio)
        self.attn = Attention(dim, heads)

    def forward(self, x, c):
        sa, ca, ga, sm, cm, gm = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + ga.unsqueeze(1) * self.attn(modulate(self.norm1(x), sa, ca))
        return self._mlp_branch(x, sm, cm, gm)


class PoolingformerBlock(_AdaLNBlock):
    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__(dim, mlp_ratio)
        self.attn = PoolingAttention(dim)

    def forward(self, x, c):
        sa, ca, ga, sm, cm, gm = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + ga.unsqueeze(1) * self.attn(modulate(self.norm1(x), sa, ca))
        return self._mlp_branch(x, sm, cm, gm)


class TokenMergeBlock(_AdaLNBlock):
    """Sparse tokens query the dense tokens (same norm1 and attention modulation on both)."""

    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__(dim, mlp_ratio)
        self.attn = CrossAttention(dim, heads)

    def forward(self, sparse, dense, c):
        sa, ca, ga, sm, cm, gm = self.adaLN_modulation(c).chunk(6, dim=1)
        attn = self.attn(modulate(self.norm1(sparse), sa, ca), modulate(self.norm1(dense), sa, ca))
        return self._mlp_branch(sparse + ga.unsqueeze(1) * attn, sm, cm, gm)


class TokenRecoverBlock(_AdaLNBlock):
    """Upsample the current tokens to the dense grid, mix with the saved dense tokens, then
    let the mixture query the current tokens. ``up_index`` is the legacy-nearest table."""

    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__(dim, mlp_ratio)
        self.attn = CrossAttention(dim, heads)
        self.merged_layer1 = nn.Linear(dim, dim)
        self.merged_layer2 = nn.Linear(dim, dim)

    def forward(self, x, dense, c, up_index):
        up = x if up_index is None else x.index_select(1, up_index)
        merged = self.merged_layer1(up) + self.merged_layer2(dense)
        sa, ca, ga, sm, cm, gm = self.adaLN_modulation(c).chunk(6, dim=1)
        attn = self.attn(modulate(self.norm1(merged), sa, ca), modulate(self.norm1(x), sa, ca))
        return self._mlp_branch(merged + ga.unsqueeze(1) * attn, sm, cm, gm)


class FinalLayer(nn.Module):
    def __init__(self, dim, patch, out_ch):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_ch)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class GridResampler(nn.Module):
    """Constant tables for one (S, s): separable adaptive-average pooling and the nearest
    upsampling index. Buffers are not persistent: they are derived, not weights."""

    def __init__(self, S: int, s: int):
        super().__init__()
        self.S, self.s = S, s
        self.register_buffer("pool", torch.from_numpy(adaptive_pool_matrix(S, s)), persistent=False)
        self.register_buffer("up_index", torch.from_numpy(upsample_token_index(s, S)), persistent=False)

    def downsample(self, x):
        b, n, c = x.shape
        g = x.reshape(b, self.S, self.S, c)
        g = torch.einsum("ih,bhwc->biwc", self.pool, g)
        g = torch.einsum("jw,biwc->bijc", self.pool, g)
        return g.reshape(b, self.s * self.s, c)
