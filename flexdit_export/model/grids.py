"""Fixed token-grid resampling as constant tables, exact for every sparse size s in 1..S.

The reference pools with ``nn.AdaptiveAvgPool2d(s)`` and upsamples with
``F.interpolate(mode="nearest")``. Both are linear maps fixed by (S, s), so a stage graph can
carry them as small constant matrices / index tables: no data-dependent shapes, no
exporter support for adaptive pooling needed, and the same tables serve PyTorch and ONNX.
"""

from __future__ import annotations

import numpy as np


def adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) averaging matrix with PyTorch's adaptive-pool bins.

    Bin i covers [floor(i*In/Out), ceil((i+1)*In/Out)); bins overlap when Out does not divide In.
    """
    m = np.zeros((size_out, size_in), dtype=np.float64)
    for i in range(size_out):
        lo = (i * size_in) // size_out
        hi = -((-(i + 1) * size_in) // size_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m.astype(np.float32)


def nearest_source_index(size_in: int, size_out: int) -> np.ndarray:
    """Source index per output index of PyTorch's legacy 'nearest' (float32 scale, floor)."""
    j = np.arange(size_out)
    if size_out == size_in:
        return j
    if size_out == 2 * size_in:
        return j >> 1
    scale = np.float32(size_in) / np.float32(size_out)
    src = np.floor((j.astype(np.float32) * scale).astype(np.float32)).astype(np.int64)
    return np.minimum(src, size_in - 1)


def upsample_token_index(s: int, S: int) -> np.ndarray:
    """For each of the S*S dense tokens (row-major), the index of its source among s*s tokens."""
    src = nearest_source_index(s, S)
    return (src[:, None] * s + src[None, :]).reshape(-1)
