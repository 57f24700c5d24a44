"""Latency of one denoising step (one network call at batch 2 = one CFG pair), interleaved.

Candidates per body (DiT-S/2, DiT-B/2 at 256 px, latent 32): PyTorch eager dense DiT,
PyTorch eager FlexDiT (each paper4 stage's sparse grid), ONNX Runtime FlexDiT stage graphs,
at 1 and 2 threads. Every round times each candidate once in turn, so machine noise hits
all of them alike; we report medians and ratios. Not part of the test suite.

    python benchmarks/step_latency.py --bodies S B --rounds 30 --json benchmarks/results/step_latency.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flexdit_export.export import export_onnx
from flexdit_export.model import SIZES, ModelConfig, build_model
from flexdit_export.schedule import equal_stages, paper4_grids
from flexdit_export.stages import INPUT_NAMES, OUTPUT_NAMES, StageModule

# 12-block bodies: 1 Poolingformer, 2 SDTMs of [1,2,1,1], 1 top block.
FLEX_LAYOUT = dict(num_poolingformer=1, num_dumbbell=2, dumbbell_group=[1, 2, 1, 1], num_normal_block=1)


def random_weights(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def build(body: str, latent: int = 32):
    C, h, depth = SIZES[body]
    common = dict(hidden_size=C, num_heads=h, depth=depth, patch_size=2, input_size=latent, num_classes=1000)
    dit = random_weights(build_model(ModelConfig(family="dit", **common)), 0)
    flex = random_weights(build_model(ModelConfig(family="flexdit", **common, **FLEX_LAYOUT)), 1)
    return dit, flex


def ort_session(path, threads):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bodies", nargs="+", default=["S", "B"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", help="write raw medians here")
    args = ap.parse_args()
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="flexdit-bench-"))
    for body in args.bodies:
        dit, flex = build(body)
        cfg = flex.cfg
        stages = equal_stages(1000, paper4_grids(cfg.grid))
        x = torch.randn(2, 4, 32, 32)
        t = torch.tensor([500.0, 500.0])
        y = torch.tensor([3, 1000])
        paths = {}
        for st in stages:
            p = tmp / f"{body}_s{st.sparse_grid}.onnx"
            export_onnx(StageModule(flex, st).eval(), (x, t, y), p, INPUT_NAMES, OUTPUT_NAMES)
            paths[st.sparse_grid] = p
        feeds = {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()}
        for threads in args.threads:
            torch.set_num_threads(threads)
            cands = {"torch dense DiT": lambda: dit(x, t, y)}
            for s, p in paths.items():
                sess = ort_session(p, threads)
                cands[f"torch FlexDiT s={s}"] = (lambda s=s: flex(x, t, y, s))
                cands[f"ORT FlexDiT s={s}"] = (lambda sess=sess: sess.run(None, feeds))
            times = {k: [] for k in cands}
            with torch.no_grad():
                for r in range(args.warmup + args.rounds):
                    for name, fn in cands.items():
                        t0 = time.perf_counter()
                        fn()
                        if r >= args.warmup:
                            times[name].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            results.append({"body": f"DiT-{body}/2", "threads": threads, "median_ms": med})
            dense = med["torch dense DiT"]
            print(f"\n### DiT-{body}/2 body, latent 32, batch 2, {threads} thread(s), {args.rounds} interleaved rounds")
            print("| candidate | median ms | vs torch dense DiT | ORT speed-up vs torch FlexDiT (same s) |")
            print("|---|---|---|---|")
            for name, v in med.items():
                extra = ""
                if name.startswith("ORT"):
                    extra = f"{med[name.replace('ORT', 'torch')] / v:.2f}x"
                print(f"| {name} | {v:.1f} | {dense / v:.2f}x | {extra} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
