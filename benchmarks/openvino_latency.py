"""Per-stage latency of one denoising step: ONNX Runtime fp32 / int8-dynamic vs OpenVINO fp32 /
bf16 / int8-dynamic (int8 weights at load) / int8 (NNCF) on the same bundle's stage graphs (and, for the random-weight bodies, PyTorch
eager), interleaved (``timing.interleaved_medians``), medians and ratios to ONNX Runtime fp32.
Every engine is opened as the runtime opens it (``StageRunner``: ONNX Runtime at the runtime's
graph optimisation level, per-session pools; OpenVINO with the stages of one structure sharing
one compiled model). Candidates the bundle or the CPU lacks are left out (int8-dynamic needs
``--extra-precisions int8-dynamic``; OpenVINO int8 needs ``convert --backend openvino
--extra-precisions int8-static``; bf16 needs bf16 hardware).

    # a bundle you have (the shipped Fashion model, converted with the OpenVINO int8 models)
    python benchmarks/openvino_latency.py --bundle BUNDLE --threads 1 2 --rounds 10
    # DiT-S/2- or DiT-B/2-sized random-weight FlexDiT (paper4, latent 32, batch 2), converted here
    # (fp32 + ORT int8-dynamic + NNCF int8), with PyTorch eager rows; --keep reuses the bundle
    python benchmarks/openvino_latency.py --body B --threads 1 2 --rounds 10 --keep /tmp/ovB
    # also time OpenVINO fp32 with one static compiled model per stage (no sharing)
    python benchmarks/openvino_latency.py --body S --static
    # per image: flexdit-run processes with --backend onnx / openvino / auto (and precisions),
    # interleaved, the run's own sampling time (load excluded), medians
    python benchmarks/openvino_latency.py --bundle BUNDLE --per-image --images 8 --steps 50 --rounds 3
    # peak RSS (VmHWM of fresh processes) after load + an 8-step DDIM trajectory through every
    # stage, against the same model's dense (one-stage) bundle: ONNX Runtime and OpenVINO
    python benchmarks/openvino_latency.py --bundle BUNDLE --rss DENSE_BUNDLE --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from flexdit_runtime import RuntimeSettings, load_bundle
from flexdit_runtime.engine_select import sample_inputs
from flexdit_runtime.engines import StageRunner
from flexdit_runtime.openvino_engine import ENV_SHARE, has_bf16
from timing import interleaved_medians

CANDIDATES = (("onnx", "fp32"), ("onnx", "int8-dynamic"), ("openvino", "fp32"), ("openvino", "bf16"),
              ("openvino", "int8-dynamic"), ("openvino", "int8-static"))


def body_bundle(body: str, latent: int, keep: str | None):
    """(random-weight FlexDiT of that body, its bundle: fp32 + int8-dynamic + NNCF int8)."""
    from flexdit_export.checkpoints import save_checkpoint
    from flexdit_export.convert import ConvertOptions, convert
    from precision_latency import random_flexdit

    model = random_flexdit(body, latent)
    root = Path(keep) if keep else Path(__import__("tempfile").mkdtemp(prefix="flexdit-ov-bench-"))
    bundle_dir = root / "bundle"
    if not (bundle_dir / "manifest.json").exists():
        ckpt = save_checkpoint(model, root / "ckpt")
        t0 = time.perf_counter()
        convert(ckpt, bundle_dir, ConvertOptions(
            schedule="paper4", precision="fp32", extra_precisions=("int8-dynamic", "int8-static"), backend="openvino",
            calib_settings={"steps": 8, "images": 4, "holdout_images": 2, "sampler": "ddim"},
            error_tol={"int8-dynamic": 1.0, "int8-static": 1.0}),  # random weights: speed only
            log=lambda m: print(m, flush=True))
        print(f"conversion: {time.perf_counter() - t0:.0f} s")
    return model, bundle_dir


def open_runners(b, threads: int, static: bool) -> dict:
    settings = RuntimeSettings(threads=threads, shared_thread_pool=False)
    runners = {}
    for kind, prec in CANDIDATES:
        if prec == "bf16" and not has_bf16():
            continue
        try:
            runners[f"{kind}/{prec}"] = StageRunner(b, settings, {"*": prec}, kind)
        except Exception as e:  # not in this bundle: left out, said so
            print(f"skip {kind}/{prec}: {str(e).splitlines()[0][:120]}")
    if static:
        os.environ[ENV_SHARE] = "0"
        try:
            runners["openvino/fp32 static"] = StageRunner(b, settings, {"*": "fp32"}, "openvino")
        finally:
            del os.environ[ENV_SHARE]
    return runners


PER_IMAGE = (("onnx", None), ("openvino", None), ("auto", None), ("onnx", "int8"), ("openvino", "bf16"),
             ("openvino", "int8-dynamic"), ("openvino", "int8"), ("auto", "int8"))


def per_image(bundle_dir, threads: int, images: int, steps: int, rounds: int) -> dict:
    """{"backend[/precision]": median seconds per image}: one flexdit-run process per run, the
    configurations interleaved; ``--backend auto`` decides at its first start (timed out of the
    run's sampling time, then a recorded profile)."""
    work = Path(tempfile.mkdtemp(prefix="flexdit-ov-per-image-"))
    prompts = work / "prompts.txt"
    prompts.write_text("".join(f"{i % 10}\n" for i in range(images)))
    env = {**os.environ, "FLEXDIT_OPENVINO_CACHE": str(work / "ov-cache")}
    times, picked = {}, {}
    for r in range(rounds + 1):  # round 0 warms the caches (compiled models, auto's profile) and is not counted
        for backend, prec in PER_IMAGE:
            name = backend + (f"/{prec}" if prec else "")
            cmd = ["flexdit-run", str(prompts), "--bundle", str(bundle_dir), "-o", str(work / "out"), "--force",
                   "--steps", str(steps), "--seed", "0", "--threads", str(threads), "--backend", backend, "--json", "-q"]
            if prec:
                cmd += ["--precision", prec]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode != 0:
                print(f"skip {name}: {p.stderr.strip().splitlines()[-1][:160] if p.stderr.strip() else p.returncode}")
                continue
            d = json.loads(p.stdout)
            if r:
                times.setdefault(name, []).append(d["seconds"] / images)
            picked[name] = [f"{e['kind']}/{e['precision']}" for e in d["engines"]]
    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"\n### per image: {bundle_dir}, {images} images x {steps} steps, {threads} threads, {rounds} interleaved "
          "rounds of fresh flexdit-run processes: median ms per image (speed-up vs onnx)")
    print("| flexdit-run | ms per image | vs --backend onnx | engines per stage |")
    print("|---|---|---|---|")
    for n, v in med.items():
        print(f"| --backend {n.replace('/', ' --precision ')} | {v * 1e3:.1f} | {med['onnx'] / v:.2f}x | "
              f"{', '.join(picked[n])} |")
    return {"median_s_per_image": med, "engines": picked, "images": images, "steps": steps, "threads": threads}


RSS_CHILD = r"""
import json, sys, time
from flexdit_runtime import Pipeline, RuntimeSettings
bundle, backend, prec = sys.argv[1], sys.argv[2], (sys.argv[3] or None)
if backend == "openvino":
    import openvino  # noqa: F401  (imported before the clock, as the onnx case imports onnxruntime)
t0 = time.perf_counter()
p = Pipeline.from_bundle(bundle, settings=RuntimeSettings(threads=2, shared_thread_pool=True), precision=prec,
                         backend=backend)
load = time.perf_counter() - t0
p([0], steps=8, sampler="ddim", cfg_scale=4.0, seed=0)
st = {k: int(v.split()[0]) / 1024 for k, _, v in (l.partition(":") for l in open("/proc/self/status"))
      if k in ("VmHWM", "RssAnon", "RssFile")}
print(json.dumps({**st, "load_s": load}))
"""

RSS_CASES = (("onnx dense", "dense", "onnx", "", {}), ("onnx stages", "stages", "onnx", "", {}),
             ("openvino dense", "dense", "openvino", "fp32", {}),
             ("openvino stages (shared model)", "stages", "openvino", "fp32", {}),
             ("openvino stages (static per stage)", "stages", "openvino", "fp32", {ENV_SHARE: "0"}),
             ("openvino dense bf16", "dense", "openvino", "bf16", {}),
             ("openvino stages bf16", "stages", "openvino", "bf16", {}),
             ("openvino stages int8-dynamic", "stages", "openvino", "int8-dynamic", {}),
             ("openvino stages int8", "stages", "openvino", "int8", {}))


def rss(bundle_dir, dense_dir, rounds: int) -> dict:
    """Median VmHWM (MB) per case, fresh processes, cases interleaved; compiled-model cache warm
    (a first round fills it and is not counted)."""
    import sys

    env = {**os.environ, "FLEXDIT_OPENVINO_CACHE": tempfile.mkdtemp(prefix="flexdit-ov-rss-")}
    got = {}
    for r in range(rounds + 1):
        for name, which, backend, prec, extra in RSS_CASES:
            if prec == "bf16" and not has_bf16():
                continue
            b = dense_dir if which == "dense" else bundle_dir
            p = subprocess.run([sys.executable, "-c", RSS_CHILD, str(b), backend, prec], capture_output=True, text=True,
                               env={**env, **extra})
            if p.returncode != 0:
                print(f"skip {name}: {(p.stderr.strip().splitlines() or ['?'])[-1][:160]}")
                continue
            if r:
                got.setdefault(name, []).append(json.loads(p.stdout.strip().splitlines()[-1]))
    med = {n: {k: statistics.median(x[k] for x in v) for k in v[0]} for n, v in got.items()}
    ort, ovd = med["onnx dense"]["VmHWM"], med["openvino dense"]["VmHWM"]
    print(f"\n### peak RSS: {bundle_dir} vs dense {dense_dir}, {rounds} rounds of fresh processes, medians")
    print("| case | VmHWM MB | vs onnx dense | vs openvino dense (fp32) | RssAnon / RssFile MB at exit | load s |")
    print("|---|---|---|---|---|---|")
    for n, v in med.items():
        print(f"| {n} | {v['VmHWM']:.0f} | {v['VmHWM'] / ort:.2f}x | {v['VmHWM'] / ovd:.2f}x | "
              f"{v['RssAnon']:.0f} / {v['RssFile']:.0f} | {v['load_s']:.2f} |")
    return med


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", help="time this bundle's stages")
    ap.add_argument("--body", choices=("S", "B", "L", "XL"), help="or a random-weight FlexDiT body of this size")
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--keep", help="--body: build (or reuse) the bundle in this directory")
    ap.add_argument("--threads", nargs="+", type=int, default=[2])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--static", action="store_true", help="also OpenVINO fp32 with one static model per stage")
    ap.add_argument("--per-image", action="store_true", help="--bundle: time whole flexdit-run processes instead")
    ap.add_argument("--rss", metavar="DENSE_BUNDLE", help="--bundle: peak RSS against this dense bundle instead")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--json")
    args = ap.parse_args()
    if bool(args.bundle) == bool(args.body):
        ap.error("give --bundle or --body")
    if args.rss:
        med = rss(args.bundle, args.rss, args.rounds)
        if args.json:
            Path(args.json).write_text(json.dumps(med, indent=1) + "\n")
        return
    if args.per_image:
        res = [per_image(args.bundle, t, args.images, args.steps, args.rounds) for t in args.threads]
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
        return
    model = None
    bundle_dir = args.bundle
    if args.body:
        model, bundle_dir = body_bundle(args.body, args.latent, args.keep)
    b = load_bundle(bundle_dir, defer_weights=True)
    results = []
    for threads in args.threads:
        runners = open_runners(b, threads, args.static)
        names = list(runners) + (["torch eager"] if model is not None else [])
        rows = {}
        for st in b.stages:
            x, t, y = sample_inputs(st)
            fns = {n: (lambda r=r, i=st.id: r.engines[i].run(x, t, y)) for n, r in runners.items()}
            if model is not None:
                import torch

                torch.set_num_threads(threads)
                xt, tt, yt = (torch.from_numpy(a) for a in (x, t, y))
                fns["torch eager"] = lambda s=st.sparse_grid: model(xt, tt, yt, s)
            rows[st.id] = interleaved_medians(fns, args.rounds, args.warmup)
        what = f"FlexDiT-{args.body}/2 body, latent {args.latent}" if args.body else str(bundle_dir)
        print(f"\n### {what}, batch {b.stages[0].batch}, {threads} thread(s), {args.rounds} interleaved rounds: "
              "median ms per call (speed-up vs onnx/fp32)")
        print("| stage (tokens) | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for st in b.stages:
            med = rows[st.id]
            base = med["onnx/fp32"]
            print(f"| {st.id} ({st.tokens}) | " + " | ".join(f"{med[n]:.2f} ({base / med[n]:.2f}x)" for n in names)
                  + " |")
        total = {n: sum(rows[st.id][n] for st in b.stages) for n in names}
        print("| all stages, sum | " + " | ".join(f"{total[n]:.2f} ({total['onnx/fp32'] / total[n]:.2f}x)"
                                                 for n in names) + " |")
        # accuracy of each candidate against onnx/fp32 on the same inputs (max relative error)
        errs = {}
        for n, r in runners.items():
            e = []
            for st in b.stages:
                x, t, y = sample_inputs(st)
                ref = runners["onnx/fp32"].engines[st.id].run(x, t, y)
                got = r.engines[st.id].run(x, t, y)
                e.append(float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12)))
            errs[n] = max(e)
        print("max |diff| / max |ref| vs onnx/fp32: " + ", ".join(f"{n} {v:.1e}" for n, v in errs.items()))
        results.append({"threads": threads, "ms": rows, "max_rel_err": errs})
        del runners
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"bundle": str(bundle_dir), "body": args.body, "rounds": args.rounds,
                                               "results": results}, indent=1) + "\n")
    print(f"\nbundle: {bundle_dir}")


if __name__ == "__main__":
    main()
