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
import tempfile
from pathlib import Path

import torch

from flexdit_export.component_io import stage_io
from flexdit_export.export import export_onnx
from flexdit_export.model import SIZES, ModelConfig, build_model
from flexdit_export.schedule import equal_stages, paper4_grids
from flexdit_export.stages import StageModule
from flexdit_runtime.engines import make_session
from timing import FLEX_LAYOUT, interleaved_medians, random_weights


def build(body: str, latent: int = 32):
    C, h, depth = SIZES[body]
    common = dict(hidden_size=C, num_heads=h, depth=depth, patch_size=2, input_size=latent, num_classes=1000)
    dit = random_weights(build_model(ModelConfig(family="dit", **common)), 0)
    flex = random_weights(build_model(ModelConfig(family="flexdit", **common, **FLEX_LAYOUT)), 1)
    return dit, flex


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bodies", nargs="+", default=["S", "B"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--settle-ms", type=float, default=50.0, help="pause before each timed call (see timing.py)")
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
            io = stage_io(cfg, st, 2)
            export_onnx(StageModule(flex, st).eval(), (x, t, y), p, io.input_names, io.output_names)
            paths[st.sparse_grid] = p
        feeds = {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()}
        for threads in args.threads:
            torch.set_num_threads(threads)
            cands = {"torch dense DiT": lambda: dit(x, t, y)}
            for s, p in paths.items():
                sess = make_session(p, ["CPUExecutionProvider"], threads)
                cands[f"torch FlexDiT s={s}"] = (lambda s=s: flex(x, t, y, s))
                cands[f"ORT FlexDiT s={s}"] = (lambda sess=sess: sess.run(None, feeds))
            med = interleaved_medians(cands, args.rounds, args.warmup, args.settle_ms)
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
