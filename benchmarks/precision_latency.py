"""Latency of one denoising step per precision: PyTorch eager FlexDiT vs the bundle's stage
graphs in ONNX Runtime (fp32, int8-dynamic, int8-static QDQ, fp16), interleaved.

A random-weight FlexDiT of the given body (default DiT-B/2 width and depth, 256 px: latent
32x32, 256 dense tokens, the paper4 schedule) is saved as a project checkpoint and compiled by
the real toolchain (``convert --optimize --precision int8 --extra-precisions ...``, calibration
captured from short trajectories). Then every round times each candidate once, in turn, for
every stage, so machine noise hits all of them alike. Reported: medians and ratios. One step =
one network call at batch 2 (a CFG pair). Not part of the test suite.

    python benchmarks/precision_latency.py --body B --threads 1 2 --rounds 20 --json benchmarks/results/precision_latency.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flexdit_export.checkpoints import save_checkpoint
from flexdit_export.convert import ConvertOptions, convert
from flexdit_export.model import SIZES, ModelConfig, build_model
from flexdit_runtime import load_bundle
from flexdit_runtime.engines import make_session
from timing import FLEX_LAYOUT, interleaved_medians, random_weights

PRECISIONS = ("fp32", "int8-dynamic", "int8-static", "fp16")


def random_flexdit(body: str, latent: int, seed: int = 1):
    C, h, depth = SIZES[body]
    cfg = ModelConfig(family="flexdit", hidden_size=C, num_heads=h, depth=depth, patch_size=2, input_size=latent,
                      num_classes=1000, **FLEX_LAYOUT)
    return random_weights(build_model(cfg), seed)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--body", default="B")
    ap.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px with the SD VAE)")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--settle-ms", type=float, default=50.0, help="pause before each timed call (see timing.py)")
    ap.add_argument("--bundle", help="reuse a bundle made by an earlier run of this script")
    ap.add_argument("--json", help="write medians here")
    args = ap.parse_args()
    model = random_flexdit(args.body, args.latent)
    tmp = Path(tempfile.mkdtemp(prefix="flexdit-prec-bench-"))
    bundle_dir = Path(args.bundle) if args.bundle else tmp / "bundle"
    if not (bundle_dir / "manifest.json").exists():
        ckpt = save_checkpoint(model, tmp / "ckpt")
        t0 = time.perf_counter()
        convert(ckpt, bundle_dir, ConvertOptions(
            schedule="paper4", optimize=True, precision="int8", extra_precisions=("int8-static", "fp16"),
            calib_settings={"steps": 8, "images": 2, "holdout_images": 2, "sampler": "ddim"},
            error_tol={"int8-dynamic": 1.0, "int8-static": 1.0, "fp16": 1.0}),  # random weights: speed only
            log=lambda m: print(m, flush=True))
        print(f"conversion: {time.perf_counter() - t0:.0f} s")
    bundle = load_bundle(bundle_dir)
    x = np.random.default_rng(0).standard_normal((2, 4, args.latent, args.latent), dtype=np.float32)
    feeds = {"x": x, "t": np.array([500.0, 500.0], np.float32), "y": np.array([3, 1000], np.int64)}
    xt, tt, yt = (torch.from_numpy(feeds[k]) for k in ("x", "t", "y"))
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        cands = {}
        for st in bundle.stages:
            s = st.sparse_grid
            cands[(s, "torch eager")] = (lambda s=s: model(xt, tt, yt, s))
            for prec in PRECISIONS:
                sess = make_session(bundle.path(bundle.artifact(st, "onnx", prec)), ["CPUExecutionProvider"], threads)
                cands[(s, f"ORT {prec}")] = (lambda sess=sess: sess.run(None, feeds))
        med = interleaved_medians(cands, args.rounds, args.warmup, args.settle_ms)
        print(f"\n### FlexDiT-{args.body}/2 body, latent {args.latent} ({args.latent * 8} px), batch 2, {threads} thread(s), "
              f"{args.rounds} interleaved rounds: median ms per step (speed-up vs ORT fp32 | vs PyTorch eager)")
        print("| stage (s) | PyTorch eager | " + " | ".join(f"ORT {p}" for p in PRECISIONS) + " |")
        print("|---|---|" + "---|" * len(PRECISIONS))
        for st in bundle.stages:
            s = st.sparse_grid
            eager, fp32 = med[(s, "torch eager")], med[(s, "ORT fp32")]
            cells = [f"{med[(s, f'ORT {p}')]:.1f} ({fp32 / med[(s, f'ORT {p}')]:.2f}x \\| "
                     f"{eager / med[(s, f'ORT {p}')]:.2f}x)" for p in PRECISIONS]
            print(f"| {st.id} (s={s}) | {eager:.1f} | " + " | ".join(cells) + " |")
            results.append({"threads": threads, "stage": st.id, "sparse_grid": s, "median_ms": {
                "torch eager": eager, **{p: med[(s, f"ORT {p}")] for p in PRECISIONS}}})
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"body": args.body, "latent": args.latent, "rounds": args.rounds,
                                               "results": results}, indent=2) + "\n")
    print(f"\nbundle: {bundle_dir}")


if __name__ == "__main__":
    main()
