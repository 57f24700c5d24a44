"""C++ runtime vs Python runtime: time per image on the same bundle, same ONNX Runtime library
(the onnxruntime wheel's libonnxruntime, which the C++ runtime links), same thread count (one
shared intra-op pool of THREADS threads in both), same workload. Not part of the test suite.

Models: the shipped Fashion-MNIST FlexDiT (models/fashion-flexdit, converted here) and a
random-weight DiT-S/2-sized FlexDiT (paper4 schedule, 256x256 images: latent 4x32x32, 1000
classes; as benchmarks/bundle_footprint.py makes it). Each round starts one fresh process per
candidate, in alternating order (interleaved): load, one untimed 2-step warm-up, then REPEATS
timed requests of N images (DDPM with guidance, every stage visited); a process reports the
median per-image time of its requests. Candidates:
  python   - flexdit_runtime.Pipeline with the flexdit-run settings (shared pool, pre-packing off)
  cpp      - the C++ runtime (shared pool, ONNX Runtime pre-packed weights shared by the stages)
  cpp-nopp - the C++ runtime with pre-packing off, i.e. the Python runtime's session settings
Also the C++ runtime's share of time outside ONNX Runtime Run calls (sampler, guidance, copies).

    python3 benchmarks/cpp_vs_python.py --cpp-build runtimes/cpp/build --rounds 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PY_PROBE = r"""
import json, statistics, sys, time
from flexdit_runtime import Pipeline
from flexdit_runtime.settings import RuntimeSettings
bundle, n, steps, sampler, cfg, threads, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
t0 = time.perf_counter()
pipe = Pipeline.from_bundle(bundle, settings=RuntimeSettings(threads=threads, shared_thread_pool=True))
load = time.perf_counter() - t0
ncls = pipe.bundle.model.num_classes
ids = [i % ncls for i in range(n)]
pipe(ids, steps=2, sampler=sampler, cfg_scale=cfg)
per, cpu = [], []
for _ in range(repeats):
    c0 = time.process_time()
    res = pipe(ids, steps=steps, sampler=sampler, cfg_scale=cfg)
    cpu.append((time.process_time() - c0) / n)
    per.append(res.seconds / n)
print(json.dumps({"per_image_s": statistics.median(per), "cpu_per_image_s": statistics.median(cpu), "load_s": load}))
"""


def _run(cmd, env=None) -> dict:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _convert(*args):
    cmd = [sys.executable, "-m", "flexdit_export.cli", "convert", *map(str, args), "--force"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")


def _dit_s_bundle(work: Path) -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bundle_footprint import _random_checkpoint

    ckpt, extra = _random_checkpoint("S", work / "flex-S.pt")
    out = work / "flex-S"
    _convert(ckpt, "-o", out, "--schedule", "paper4", *extra)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpp-build", default=str(ROOT / "runtimes" / "cpp" / "build"),
                    help="C++ build directory holding flexdit-bench-cpp")
    ap.add_argument("--models", nargs="+", default=["fashion", "S"], choices=["fashion", "S"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", help="directory for the converted bundles (default: a temporary one)")
    ap.add_argument("--json", help="also write the raw numbers here")
    args = ap.parse_args()
    bench = Path(args.cpp_build) / "flexdit-bench-cpp"
    if not bench.exists():
        raise SystemExit(f"{bench} not found: build runtimes/cpp first (cmake --build {args.cpp_build})")
    work = Path(args.work or tempfile.mkdtemp(prefix="cpp-vs-py-"))
    work.mkdir(parents=True, exist_ok=True)
    # model -> (bundle, images, steps, repeats)
    workloads = {"fashion": (4, 50, 2), "S": (2, 20, 1)}
    results = {}
    for model in args.models:
        if model == "fashion":
            bundle = work / "fashion"
            if not (bundle / "manifest.json").exists():
                _convert(ROOT / "models" / "fashion-flexdit", "-o", bundle)
        else:
            bundle = work / "flex-S"
            if not (bundle / "manifest.json").exists():
                bundle = _dit_s_bundle(work)
        n, steps, repeats = workloads[model]
        common = [str(bundle), str(n), str(steps), "ddpm", "4.0", str(args.threads), str(repeats)]
        cands = {
            "python": lambda: _run([sys.executable, "-c", PY_PROBE, *common],
                                   env={**os.environ, "PYTHONWARNINGS": "ignore"}),
            "cpp": lambda: _run([str(bench), *common]),
            "cpp-nopp": lambda: _run([str(bench), *common, "--no-prepack"]),
        }
        rows = {k: [] for k in cands}
        for r in range(args.rounds):
            order = list(cands) if r % 2 == 0 else list(reversed(cands))
            for name in order:
                rows[name].append(cands[name]())
            print(f"{model} round {r + 1}: " + ", ".join(f"{k} {v[-1]['per_image_s'] * 1e3:.1f} ms" for k, v in rows.items()),
                  flush=True)
        med = {k: statistics.median(x["per_image_s"] for x in v) for k, v in rows.items()}
        cpu = {k: statistics.median(x["cpu_per_image_s"] for x in v) for k, v in rows.items()}
        # paired: Python / candidate within each round (both ran back to back), then the median
        paired = {k: statistics.median(p["per_image_s"] / c["per_image_s"] for p, c in zip(rows["python"], v))
                  for k, v in rows.items()}
        outside = statistics.median(x["outside_ort_share"] for x in rows["cpp"])
        results[model] = {"images": n, "steps": steps, "median_per_image_s": med, "median_cpu_per_image_s": cpu,
                          "median_paired_ratio": paired, "cpp_outside_ort_share": outside, "raw": rows}
    print()
    print(f"{args.threads} thread(s), {args.rounds} interleaved rounds. Wall: median ms per image (median of the "
          f"per-round ratios Python/C++). CPU: median process CPU ms per image (ratio of medians).")
    print()
    print("| model | workload | Python wall | C++ wall | C++ no-prepack wall | Python CPU | C++ CPU | C++ no-prepack CPU "
          "| C++ outside ORT Run |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model, r in results.items():
        m, c, pr = r["median_per_image_s"], r["median_cpu_per_image_s"], r["median_paired_ratio"]
        name = "Fashion-MNIST FlexDiT (shipped)" if model == "fashion" else "DiT-S/2-sized FlexDiT (random, paper4)"
        print(f"| {name} | {r['images']} images x {r['steps']} DDPM steps, CFG 4 | {m['python'] * 1e3:.1f} | "
              f"{m['cpp'] * 1e3:.1f} ({pr['cpp']:.2f}x) | {m['cpp-nopp'] * 1e3:.1f} ({pr['cpp-nopp']:.2f}x) | "
              f"{c['python'] * 1e3:.1f} | {c['cpp'] * 1e3:.1f} ({c['python'] / c['cpp']:.2f}x) | "
              f"{c['cpp-nopp'] * 1e3:.1f} ({c['python'] / c['cpp-nopp']:.2f}x) | {r['cpp_outside_ort_share']:.2%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "rounds": args.rounds, "results": results},
                                              indent=1))


if __name__ == "__main__":
    main()
