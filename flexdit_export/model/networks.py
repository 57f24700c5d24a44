"""DiT and FlexDiT networks. ``forward(x, t, y, sparse_grid)`` matches the reference
forward pass; ``run(..., resampler)`` is the same pass with the grid tables supplied, which is
what a stage graph freezes."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import (DiTBlock, FinalLayer, GridResampler, LabelEmbedder, PatchEmbed, PoolingformerBlock,
                     TimestepEmbedder, TokenMergeBlock, TokenRecoverBlock, sincos_pos_embed)


class SDTM(nn.Module):
    """Sparse-Dense Token Module; attribute names are the reference's ``dumbbell_blocks.{d}``."""

    def __init__(self, dim, heads, group, mlp_ratio):
        super().__init__()
        self.token_merge_blocks = nn.ModuleList(TokenMergeBlock(dim, heads, mlp_ratio) for _ in range(group[0]))
        self.semantic_blocks = nn.ModuleList(DiTBlock(dim, heads, mlp_ratio) for _ in range(group[1]))
        self.token_recover_blocks = nn.ModuleList(TokenRecoverBlock(dim, heads, mlp_ratio) for _ in range(group[2]))
        self.normal_blocks = nn.ModuleList(DiTBlock(dim, heads, mlp_ratio) for _ in range(group[3]))

    def forward(self, dense, c, rs: GridResampler):
        x = rs.downsample(dense)
        for blk in self.token_merge_blocks:
            x = blk(x, dense, c)
        for blk in self.semantic_blocks:
            x = blk(x, c)
        for blk in self.token_recover_blocks:
            # Only the first recover block sees sparse tokens; later ones are already dense
            # (the reference's interpolate S -> S is the identity there).
            x = blk(x, dense, c, rs.up_index if x.shape[1] != dense.shape[1] else None)
        for blk in self.normal_blocks:
            x = blk(x, c)
        return x


class DiffusionTransformer(nn.Module):
    """One class for both families; the config decides which segments exist, and the
    parameter names follow the family's reference checkpoints."""

    def __init__(self, cfg: ModelConfig, class_dropout_prob: float = 0.1):
        super().__init__()
        self.cfg = cfg
        C, h, r = cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, C)
        self.t_embedder = TimestepEmbedder(C)
        self.y_embedder = LabelEmbedder(cfg.num_classes, C, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, C), requires_grad=False)
        if cfg.family == "dit":
            self.blocks = nn.ModuleList(DiTBlock(C, h, r) for _ in range(cfg.depth))
        else:
            self.poolingformer_blocks = nn.ModuleList(PoolingformerBlock(C, h, r) for _ in range(cfg.num_poolingformer))
            self.dumbbell_blocks = nn.ModuleList(SDTM(C, h, cfg.dumbbell_group, r) for _ in range(cfg.num_dumbbell))
            self.normal_blocks = nn.ModuleList(DiTBlock(C, h, r) for _ in range(cfg.num_normal_block))
        self.final_layer = FinalLayer(C, cfg.patch_size, cfg.out_channels)
        self._resamplers: dict[int, GridResampler] = {}
        self.initialize_weights()

    # -- the reference initialisation (adaLN-Zero, zero output, merged layers 0 / identity)
    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, gain=0.5)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if hasattr(m, "adaLN_modulation"):
                nn.init.zeros_(m.adaLN_modulation[-1].weight)
                nn.init.zeros_(m.adaLN_modulation[-1].bias)
            if isinstance(m, TokenRecoverBlock):
                nn.init.zeros_(m.merged_layer1.weight)
                nn.init.zeros_(m.merged_layer1.bias)
                nn.init.eye_(m.merged_layer2.weight)
                nn.init.zeros_(m.merged_layer2.bias)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed(self.cfg.hidden_size, self.cfg.grid)).float()[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def resampler(self, sparse_grid: int | None) -> GridResampler | None:
        if self.cfg.family == "dit":
            return None
        s = self.cfg.grid if sparse_grid is None else int(sparse_grid)
        if not 1 <= s <= self.cfg.grid:
            raise ValueError(f"sparse grid {s} is outside 1..{self.cfg.grid}")
        if s not in self._resamplers:
            self._resamplers[s] = GridResampler(self.cfg.grid, s).to(self.pos_embed.device)
        return self._resamplers[s]

    def forward(self, x, t, y, sparse_grid: int | None = None):
        """``sparse_grid`` None runs a FlexDiT dense (s = S)."""
        return self.run(x, t, y, self.resampler(sparse_grid))

    def run(self, x, t, y, rs: GridResampler | None):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        if self.cfg.family == "dit":
            for blk in self.blocks:
                x = blk(x, c)
        else:
            for blk in self.poolingformer_blocks:
                x = blk(x, c)
            for sdtm in self.dumbbell_blocks:
                x = sdtm(x, c, rs)
            for blk in self.normal_blocks:
                x = blk(x, c)
        return self.unpatchify(self.final_layer(x, c))

    def unpatchify(self, x):
        b, p, c, S = x.shape[0], self.cfg.patch_size, self.cfg.out_channels, self.cfg.grid
        x = x.reshape(b, S, S, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, S * p, S * p)


def build_model(cfg: ModelConfig, class_dropout_prob: float = 0.1) -> DiffusionTransformer:
    return DiffusionTransformer(cfg, class_dropout_prob)
