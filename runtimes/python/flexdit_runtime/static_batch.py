"""Any number of rows -> calls of a graph with a static batch B.

Rows are cut into chunks of B and the last chunk is padded with copies of its first row; rows
are independent, so padding never changes a real row's result and is dropped afterwards.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def in_static_batches(run: Callable[..., np.ndarray], batch: int, *arrays: np.ndarray) -> np.ndarray:
    """``run(*chunks)`` on chunks of exactly ``batch`` rows of ``arrays`` (same leading length);
    -> the outputs of the real rows, concatenated."""
    rows = arrays[0].shape[0]
    outs = []
    for lo in range(0, rows, batch):
        chunk = [a[lo:lo + batch] for a in arrays]
        n = chunk[0].shape[0]
        if n < batch:
            chunk = [np.concatenate([c, np.repeat(c[:1], batch - n, 0)]) for c in chunk]
        outs.append(run(*chunk)[:n])
    return np.concatenate(outs)
