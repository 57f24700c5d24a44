"""What every latency benchmark here shares: the random-weight bodies and the interleaved timer.

Interleaving: each round times every candidate once, in turn, so slow drifts of a shared
machine hit all candidates alike. Settling: PyTorch's OpenMP workers and ONNX Runtime's
intra-op pool both spin for a while after a call; without a pause the next candidate shares
the cores with the previous one's spinning threads (measured on DiT-B/2 at 2 threads: int8
dynamic 87.6 ms back-to-back vs 64.0 ms after a 50 ms pause, PyTorch 342 vs 319 ms). A short
sleep before each timed call lets those threads park, so each candidate is timed alone.
"""

from __future__ import annotations

import statistics
import time

import torch

# 12-block FlexDiT bodies: 1 Poolingformer, 2 SDTMs of [1,2,1,1], 1 top block.
FLEX_LAYOUT = dict(num_poolingformer=1, num_dumbbell=2, dumbbell_group=[1, 2, 1, 1], num_normal_block=1)


def random_weights(model, seed: int):
    """N(0, 0.02) everywhere but the fixed positional table: random but non-degenerate numerics
    (zero-initialised adaLN would make every block an identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def interleaved_medians(candidates: dict, rounds: int, warmup: int = 3, settle_ms: float = 50.0) -> dict:
    """{name: fn} -> {name: median milliseconds}; ``warmup`` rounds are discarded."""
    times = {k: [] for k in candidates}
    with torch.no_grad():
        for r in range(warmup + rounds):
            for name, fn in candidates.items():
                if settle_ms:
                    time.sleep(settle_ms / 1e3)
                t0 = time.perf_counter()
                fn()
                if r >= warmup:
                    times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}
