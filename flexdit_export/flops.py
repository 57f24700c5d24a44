"""Multiply-accumulate counts per forward pass (one sample), attention included.

Two conventions differ only for Poolingformer blocks: ``reference`` counts them as the
authors' code runs them (v over all N tokens, an N x N uniform attention), which is how the
paper's GMAC figures were taken; ``executed`` counts what our O(N) form really computes.
"""

from __future__ import annotations

from .model import ModelConfig


def _linear(n, cin, cout):
    return n * cin * cout


def _attn(nq, nk, C):
    return 2 * nq * nk * C  # q k^T and attn @ v


def _mlp(n, C, r):
    return 2 * n * C * int(C * r)


def block_macs(kind: str, C: int, r: float, N: int, M: int, convention: str = "reference") -> int:
    ada = _linear(1, C, 6 * C)
    if kind == "dit":  # on n = N tokens (caller passes M for semantic blocks as N)
        return _linear(N, C, 3 * C) + _attn(N, N, C) + _linear(N, C, C) + _mlp(N, C, r) + ada
    if kind == "pool":
        if convention == "reference":
            attn = _linear(N, C, C) + N * N * C + _linear(N, C, C)
        else:
            attn = _linear(1, C, C) + _linear(1, C, C)
        return attn + _mlp(N, C, r) + ada
    if kind == "merge":  # M sparse queries over N dense tokens
        return _linear(M, C, C) + _linear(N, C, 2 * C) + _attn(M, N, C) + _linear(M, C, C) + _mlp(M, C, r) + ada
    if kind == "recover":  # N merged queries over M sparse tokens
        return (2 * _linear(N, C, C) + _linear(N, C, C) + _linear(M, C, 2 * C) + _attn(N, M, C)
                + _linear(N, C, C) + _mlp(N, C, r) + ada)
    raise ValueError(kind)


def forward_macs(cfg: ModelConfig, sparse_grid: int | None = None, convention: str = "reference") -> int:
    C, r, N, p = cfg.hidden_size, cfg.mlp_ratio, cfg.num_tokens, cfg.patch_size
    total = _linear(N, cfg.in_channels * p * p, C)  # patch embedding
    total += _linear(1, 256, C) + _linear(1, C, C)  # timestep MLP
    total += _linear(1, C, 2 * C) + _linear(N, C, p * p * cfg.out_channels)  # final layer
    if cfg.family == "dit":
        return total + cfg.depth * block_macs("dit", C, r, N, N)
    s = cfg.grid if sparse_grid is None else sparse_grid
    M = s * s
    g0, g1, g2, g3 = cfg.dumbbell_group
    total += cfg.num_poolingformer * block_macs("pool", C, r, N, N, convention)
    per_sdtm = g0 * block_macs("merge", C, r, N, M)
    per_sdtm += g1 * block_macs("dit", C, r, M, M)
    per_sdtm += block_macs("recover", C, r, N, M) + (g2 - 1) * block_macs("recover", C, r, N, N)
    per_sdtm += g3 * block_macs("dit", C, r, N, N)
    total += cfg.num_dumbbell * per_sdtm
    return total + cfg.num_normal_block * block_macs("dit", C, r, N, N)
