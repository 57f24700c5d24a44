"""Per-stage latency of one denoising step: ONNX Runtime fp32 / int8-dynamic vs OpenVINO fp32 /
bf16 / int8 (NNCF) on the same bundle's stage graphs, interleaved (``timing.interleaved_medians``),
medians and ratios to ONNX Runtime fp32. Candidates the bundle or the CPU lacks are left out
(int8-dynamic needs ``--extra-precisions int8``; OpenVINO int8 needs ``convert --backend openvino
--extra-precisions int8``; bf16 needs bf16 hardware). One process per thread count, because ONNX
Runtime's shared pool cannot be resized.

    python benchmarks/openvino_latency.py BUNDLE --threads 2 --rounds 10
"""

from __future__ import annotations

import argparse
import json

from flexdit_runtime import RuntimeSettings, load_bundle
from flexdit_runtime.engine_select import sample_inputs
from flexdit_runtime.engines import StageRunner
from flexdit_runtime.openvino_engine import has_bf16
from timing import interleaved_medians

CANDIDATES = (("onnx", "fp32"), ("onnx", "int8-dynamic"), ("openvino", "fp32"), ("openvino", "bf16"),
              ("openvino", "int8-static"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    b = load_bundle(args.bundle, defer_weights=True)
    settings = RuntimeSettings(threads=args.threads)
    runners = {}
    for kind, prec in CANDIDATES:
        if prec == "bf16" and not has_bf16():
            continue
        try:
            runners[f"{kind}/{prec}"] = StageRunner(b, settings, {"*": prec}, kind)
        except Exception as e:  # not in this bundle: left out, said so
            print(f"skip {kind}/{prec}: {str(e).splitlines()[0][:120]}")
    rows = {}
    for st in b.stages:
        x, t, y = sample_inputs(st)
        fns = {n: (lambda r=r, i=st["id"]: r.engines[i].run(x, t, y)) for n, r in runners.items()}
        rows[st["id"]] = interleaved_medians(fns, args.rounds, args.warmup)
    names = list(runners)
    print(f"| stage (tokens) | " + " | ".join(names) + f" |   ({args.threads} threads, ms, ratio to onnx/fp32)")
    print("|---|" + "---|" * len(names))
    for st in b.stages:
        med = rows[st["id"]]
        base = med["onnx/fp32"]
        print(f"| {st['id']} ({st['tokens']}) | " + " | ".join(f"{med[n]:.2f} ({base / med[n]:.2f}x)" for n in names)
              + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rounds": args.rounds, "ms": rows}, f, indent=1)


if __name__ == "__main__":
    main()
