"""The PyTorch model against an independent naive formulation of the reference forward."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference_forward as rf
from factories import TINY_DIT, random_model
from flexdit_export.flops import forward_macs
from flexdit_export.model import ModelConfig, build_model
from flexdit_export.model.grids import adaptive_pool_matrix, upsample_token_index
from flexdit_export.model.layers import GridResampler, PoolingAttention


@pytest.mark.parametrize("S", [5, 7, 8, 10, 16])
def test_pooling_and_upsampling_exact_for_every_s(S):
    torch.manual_seed(0)
    x = torch.randn(2, S * S, 6)
    grid = x.reshape(2, S, S, 6).permute(0, 3, 1, 2)
    for s in range(1, S + 1):
        rs = GridResampler(S, s)
        ref = F.adaptive_avg_pool2d(grid, s).permute(0, 2, 3, 1).reshape(2, s * s, 6)
        torch.testing.assert_close(rs.downsample(x), ref, rtol=0, atol=1e-6)
        small = torch.randn(2, s * s, 6)
        up_ref = F.interpolate(small.reshape(2, s, s, 6).permute(0, 3, 1, 2), size=(S, S), mode="nearest")
        up_ref = up_ref.permute(0, 2, 3, 1).reshape(2, S * S, 6)
        assert torch.equal(small.index_select(1, rs.up_index), up_ref), (S, s)


def test_pool_matrix_rows_are_averages():
    for S in (7, 16, 32):
        for s in range(1, S + 1):
            m = adaptive_pool_matrix(S, s)
            np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-6)
            assert upsample_token_index(s, S).max() == s * s - 1


def test_poolingformer_O_N_equals_uniform_NxN_attention():
    torch.manual_seed(0)
    attn = PoolingAttention(32)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(3, 50, 32)
    B, N, C, h = 3, 50, 32, 4
    v = attn.v(x).reshape(B, N, h, C // h).permute(0, 2, 1, 3)
    uniform = torch.ones(B, h, N, N).softmax(-1)
    ref = attn.proj((uniform @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-6)


LAYOUTS = [
    # (poolingformer, SDTMs, group, top, input, patch, s values)
    (1, 2, [1, 1, 1, 1], 1, 16, 2, range(1, 9)),
    (2, 1, [2, 2, 1, 1], 2, 20, 2, [1, 3, 4, 7, 10]),   # S = 10: grids that do not divide S
    (1, 1, [1, 3, 2, 0], 1, 16, 4, [1, 2, 3, 4]),       # two recover blocks, patch 4
    (0, 2, [0, 1, 1, 0], 0, 32, 8, [1, 2, 3, 4]),       # patch 8, no merge blocks
]


@pytest.mark.parametrize("npf,nd,group,ntop,size,patch,grids", LAYOUTS)
def test_flexdit_matches_reference_formulation(npf, nd, group, ntop, size, patch, grids):
    cfg = ModelConfig(family="flexdit", hidden_size=48, num_heads=3, patch_size=patch, input_size=size, in_channels=4,
                      num_classes=7, depth=npf + nd * sum(group) + ntop, num_poolingformer=npf, num_dumbbell=nd,
                      dumbbell_group=group, num_normal_block=ntop, semantic_size=max(grids))
    m = random_model(cfg, seed=3, scale=0.1)
    sd = m.state_dict()
    d = dict(cfg.to_dict(), out_channels=cfg.out_channels)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size, size, generator=g)
    t = torch.tensor([3.0, 871.0])
    y = torch.tensor([1, 7])  # 7 = null class
    for s in grids:
        with torch.no_grad():
            got, ref = m(x, t, y, s), rf.forward(sd, d, x, t, y, s)
        rel = (got - ref).abs().max() / ref.abs().max()
        assert rel < 1e-5, (s, float(rel))


def test_dit_matches_reference_formulation():
    m = random_model(TINY_DIT, seed=4, scale=0.1)
    d = dict(m.cfg.to_dict(), out_channels=m.cfg.out_channels)
    x = torch.randn(3, 4, 16, 16)
    t = torch.tensor([0.0, 500.0, 999.0])
    y = torch.tensor([0, 5, 10])
    with torch.no_grad():
        got, ref = m(x, t, y), rf.forward(m.state_dict(), d, x, t, y)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5


def test_reference_initialisation_gives_zero_output_and_identity_merge():
    m = build_model(ModelConfig(**{**TINY_DIT, "family": "flexdit", "depth": 6, "num_poolingformer": 1, "num_dumbbell": 1,
                                   "dumbbell_group": [1, 1, 1, 1], "num_normal_block": 1, "semantic_size": 4}))
    with torch.no_grad():
        out = m(torch.randn(2, 4, 16, 16), torch.tensor([1.0, 2.0]), torch.tensor([0, 1]), 4)
    assert torch.count_nonzero(out) == 0  # adaLN-Zero + zeroed final layer
    blk = m.dumbbell_blocks[0].token_recover_blocks[0]
    assert torch.equal(blk.merged_layer2.weight, torch.eye(64)) and torch.count_nonzero(blk.merged_layer1.weight) == 0


@pytest.mark.parametrize("size,params_m", [("XL", 675.1), ("L", 458.1), ("B", 130.5), ("S", 33.0)])
def test_all_dit_sizes_build_with_the_papers_parameter_counts(size, params_m):
    from flexdit_export.model import SIZES
    C, h, depth = SIZES[size]
    with torch.device("meta"):
        m = build_model(ModelConfig(family="dit", hidden_size=C, num_heads=h, depth=depth, patch_size=2, input_size=32))
    n = sum(p.numel() for p in m.parameters()) / 1e6  # the DiT paper counts pos_embed too
    assert abs(n - params_m) < 0.2, n


def test_macs_reproduce_the_papers_counts():
    xl256 = ModelConfig(family="dit", hidden_size=1152, num_heads=16, depth=28, patch_size=2, input_size=32)
    xl512 = ModelConfig(family="dit", hidden_size=1152, num_heads=16, depth=28, patch_size=2, input_size=64)
    assert round(forward_macs(xl256) / 1e9, 1) == 118.6
    assert round(forward_macs(xl512) / 1e9, 1) == 524.5 or abs(forward_macs(xl512) / 1e9 - 524.5) < 0.5
    flex = dict(family="flexdit", hidden_size=1152, num_heads=16, depth=28, patch_size=2)
    f512 = ModelConfig(**flex, input_size=64, num_poolingformer=2, num_dumbbell=4, dumbbell_group=[1, 3, 1, 1],
                       num_normal_block=2)
    f256 = ModelConfig(**flex, input_size=32, num_poolingformer=1, num_dumbbell=4, dumbbell_group=[1, 3, 1, 1],
                       num_normal_block=3)
    assert abs(forward_macs(f512, 8) / 1e9 - 236) < 1.0
    assert abs(forward_macs(f256, 8) / 1e9 - 69) < 0.5
    # the O(N) Poolingformer really computes less than the reference's N x N form
    assert forward_macs(f512, 8, "executed") < forward_macs(f512, 8)
