#!/usr/bin/env python
"""Quality report of the shipped Fashion-MNIST FlexDiT, end to end.

1. convert the checkpoint twice: with its trained FlexDiT schedule and with ``dense``
   (the same weights at the full token grid at every step);
2. sample N images per class through the fp32 FlexDiT bundle with the checkpoint's default
   sampler settings, and the same model in PyTorch from the same noise;
3. sample the dense bundle from the same noise, and time both bundles interleaved;
4. print and save class accuracy and classifier-feature FD (not Inception FID) of each,
   with the real-vs-real baseline at the same sample size.

    python examples/fashion/evaluate_fashion.py --per-class 50 --json out/fashion-eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flexdit_export.convert import ConvertOptions, convert
from flexdit_fashion.evaluate import compare_latency, evaluate_bundle


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default="models/fashion-flexdit")
    ap.add_argument("--bundle", default="/tmp/fashion-bundle")
    ap.add_argument("--dense-bundle", default="/tmp/fashion-bundle-dense")
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--batch", type=int, default=2, help="graph batch of both bundles (convert's default is 2)")
    ap.add_argument("--latency-batch", type=int, default=16,
                    help="also time both schedules with graphs of this batch (B/2 images per call with CFG), where "
                         "compute rather than per-call overhead dominates; 0: skip")
    ap.add_argument("--no-convert", action="store_true", help="reuse existing bundles")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    schedule = json.loads((Path(a.ckpt) / "config.json").read_text())["schedule"]
    pairs = [(a.bundle, a.dense_bundle, a.batch)]
    if a.latency_batch:
        pairs.append((f"{a.bundle}-b{a.latency_batch}", f"{a.dense_bundle}-b{a.latency_batch}", a.latency_batch))
    if not a.no_convert:
        for flex, dense_dir, batch in pairs:
            convert(a.ckpt, flex, ConvertOptions(schedule=schedule, batch=batch, force=True))
            convert(a.ckpt, dense_dir, ConvertOptions(schedule="dense", batch=batch, force=True))
    kw = dict(per_class=a.per_class, seed=a.seed, threads=a.threads, log=print)
    report = evaluate_bundle(a.bundle, reference_ckpt=a.ckpt, **kw)
    dense = evaluate_bundle(a.dense_bundle, **kw)
    latency = [compare_latency(flex, dense_dir, n_images=16, steps=report["steps"], cfg_scale=report["cfg_scale"],
                               threads=a.threads, seed=a.seed) | {"graph_batch": batch}
               for flex, dense_dir, batch in pairs]
    summary = {
        "settings": {k: report[k] for k in ("sampler", "steps", "cfg_scale", "n_images", "seed", "schedule")},
        "class_accuracy": {"bundle": report["class_accuracy"], "pytorch": report["reference_class_accuracy"],
                           "dense_bundle": dense["class_accuracy"], "real_train_subset": report["real_class_accuracy"]},
        "fd": {"bundle": report["fd"], "pytorch": report["reference_fd"], "dense_bundle": dense["fd"],
               "real_train_subset": report["real_fd"]},
        "fd_ratio_bundle_over_pytorch": report["fd_ratio"],
        "latency_dense_over_flexdit": {f"graph batch {r['graph_batch']}": r["ratio_b_over_a"] for r in latency},
        "latency": latency,
        "note": report["fd_note"],
    }
    print(json.dumps(summary, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": summary, "flexdit": report, "dense": dense}, indent=2) + "\n")
    ok = summary["class_accuracy"]["bundle"] >= 0.80 and report["fd_ratio"] <= 1.10
    print(f"quality bars (accuracy >= 0.80, FD ratio <= 1.10): {'met' if ok else 'NOT met'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
