"""Bundle v2 footprint: bytes on disk, peak RSS and load time of a multi-stage bundle against
the one-stage (dense) bundle of the same model. Not part of the test suite.

For each model (the shipped Fashion-MNIST FlexDiT with its trained 4-stage schedule, and
random-weight DiT-S/2- and DiT-B/2-sized FlexDiTs with ``paper4``) this converts a multi-stage
and a dense bundle with the real CLI, then:
- size: all bytes of the bundle directory / the fp32 parameter bytes of one dense model;
- RSS: each bundle is loaded by the runtime in a fresh process (``Pipeline.from_bundle``, the
  flexdit-run settings: one shared thread pool) and sampled for a 8-step DDIM trajectory with
  CFG, which passes through every stage; peak RSS (VmHWM) at the end;
- load: wall time of ``Pipeline.from_bundle`` in that process (after imports), i.e. reading the
  manifest, checksums, weights and building every stage session.
The multi-stage bundle is loaded twice per round: as the runtime does by default (its shared
graph: one session for the stages of a precision) and with ``RuntimeSettings(shared_graphs=False)``
(one session per stage). Processes alternate (interleaved rounds); medians and ratios are reported.

    python benchmarks/bundle_footprint.py --models fashion S B --rounds 5 --json benchmarks/results/bundle_footprint.json
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
FASHION = ROOT / "models" / "fashion-flexdit"

PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
from flexdit_runtime import Pipeline, RuntimeSettings
from flexdit_runtime.engines import share_thread_pool
share_thread_pool(int(sys.argv[2]))
t1 = time.perf_counter()
pipe = Pipeline.from_bundle(sys.argv[1], settings=RuntimeSettings(shared_graphs=sys.argv[3] == "1"))
t2 = time.perf_counter()
res = pipe([0], steps=8, sampler="ddim", cfg_scale=4.0, seed=0)
stages = sorted(res.stage_seconds)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec, so a
# benchmark process holding a checkpoint would inflate every child's number.
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"load_s": t2 - t1, "import_s": t1 - t0, "rss_mb": hwm / 1024, "stages_run": stages}))
"""


def _cli(*args):
    cmd = [sys.executable, "-m", "flexdit_export.cli", *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr}")


def _random_checkpoint(body: str, path: Path) -> tuple[Path, list]:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from timing import FLEX_LAYOUT, random_weights

    from flexdit_export.model import SIZES, ModelConfig, build_model

    C, h, depth = SIZES[body]
    model = random_weights(build_model(ModelConfig(family="flexdit", hidden_size=C, num_heads=h, depth=depth,
                                                   patch_size=2, input_size=32, num_classes=1000, **FLEX_LAYOUT)), 1)
    torch.save(model.state_dict(), path)
    return path, ["--num-heads", str(h)]


def _param_bytes(ckpt: Path) -> int:
    """fp32 bytes of every parameter of the dense model (what one copy of the weights costs)."""
    if ckpt.is_dir():
        from safetensors import safe_open

        with safe_open(str(ckpt / "model.safetensors"), "np") as f:
            return sum(f.get_tensor(k).size * 4 for k in f.keys())
    import torch

    return sum(v.numel() * 4 for v in torch.load(ckpt, weights_only=True).values())


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _probe(bundle: Path, threads: int, shared_graphs: bool = True) -> dict:
    p = subprocess.run([sys.executable, "-c", PROBE, str(bundle), str(threads), str(int(shared_graphs))],
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"probe of {bundle} failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def measure(name: str, work: Path, rounds: int, threads: int) -> dict:
    if name == "fashion":
        ckpt, extra, multi = FASHION, [], []  # the checkpoint's own trained 4-stage schedule
    else:
        ckpt, extra = _random_checkpoint(name, work / f"flex{name}.pt")
        multi = ["--schedule", "paper4"]
    flex, dense = work / f"{name}-stages", work / f"{name}-dense"
    for b, sched in ((flex, multi), (dense, ["--schedule", "dense"])):
        if not (b / "manifest.json").exists():  # --work keeps bundles between runs
            _cli("convert", ckpt, "-o", b, *sched, *extra, "--force")
    weights = _param_bytes(ckpt)
    runs = {"stages": [], "dense": [], "per_stage_sessions": []}
    for _ in range(rounds):
        for key, b, shared in (("dense", dense, True), ("stages", flex, True), ("per_stage_sessions", flex, False)):
            runs[key].append(_probe(b, threads, shared))
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("load_s", "rss_mb")} for k, v in runs.items()}
    from flexdit_bundle import load_bundle

    manifest = load_bundle(flex, verify_checksums=False).manifest
    n_stages = len(manifest.stages)
    return {"model": name, "stages": n_stages, "param_bytes": weights,
            "bundle_bytes": _dir_bytes(flex), "dense_bundle_bytes": _dir_bytes(dense),
            "size_ratio": _dir_bytes(flex) / weights, "dense_size_ratio": _dir_bytes(dense) / weights,
            "rss_mb": med["stages"]["rss_mb"], "dense_rss_mb": med["dense"]["rss_mb"],
            "rss_ratio": med["stages"]["rss_mb"] / med["dense"]["rss_mb"],
            "load_s": med["stages"]["load_s"], "dense_load_s": med["dense"]["load_s"],
            "load_ratio": med["stages"]["load_s"] / med["dense"]["load_s"],
            # the same bundle with RuntimeSettings(shared_graphs=False): one session per stage
            "per_stage_sessions_load_ratio": med["per_stage_sessions"]["load_s"] / med["dense"]["load_s"],
            "per_stage_sessions_rss_ratio": med["per_stage_sessions"]["rss_mb"] / med["dense"]["rss_mb"],
            "shared_graphs": [g.path for g in manifest.shared_graphs or ()],
            "stages_run": runs["stages"][0]["stages_run"], "rounds": rounds, "threads": threads}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["fashion", "S", "B"], help="fashion and/or DiT body sizes S, B")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--work", help="keep the converted bundles here (and reuse them on the next run)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="flexdit-footprint-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            rows.append(measure(name, work, args.rounds, args.threads))
            r = rows[-1]
            print(f"{name}: {r['stages']} stages; size {r['bundle_bytes'] / 1e6:.1f} MB = {r['size_ratio']:.3f}x params "
                  f"(dense bundle {r['dense_size_ratio']:.3f}x); peak RSS {r['rss_mb']:.0f} vs {r['dense_rss_mb']:.0f} MB "
                  f"= {r['rss_ratio']:.2f}x; load {r['load_s'] * 1e3:.0f} vs {r['dense_load_s'] * 1e3:.0f} ms = "
                  f"{r['load_ratio']:.2f}x (one session per stage: {r['per_stage_sessions_load_ratio']:.2f}x, "
                  f"RSS {r['per_stage_sessions_rss_ratio']:.2f}x)", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": os.uname().machine, "cpus": os.cpu_count(), "rows": rows},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
