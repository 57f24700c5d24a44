"""The runtime side of issue 9 on a device, end to end: a tiny random-weight FlexDiT (2 stages,
batch 2) converted with ``--backend aoti --device DEVICE`` (fp32), then sampled through the
runtime's user-facing device choice and compared with the torch-free reference (the same
bundle's ONNX graphs on ONNX Runtime's CPU provider, same noise):

- ``Pipeline.from_bundle(b, device=DEVICE)``: what ``--device`` picks (cuda: the AOTI packages,
  one CUDA graph per stage, the sampler on the device);
- ``backend="aoti"`` and ``backend="onnx"`` on that device (cuda + onnx: ONNX Runtime's CUDA
  provider with IO binding and CUDA graphs, which needs onnxruntime-gpu; where it is absent
  the one-line refusal is recorded instead);
- ``flexdit-run --device DEVICE --json`` as a user runs it.

    python3 benchmarks/gpu_runtime_check.py --device cuda --out OUT   # GPU_CHECK.md, step 1
    python3 benchmarks/gpu_runtime_check.py --device cpu --out OUT    # the same code on the CPU

Writes OUT/runtime_check.json and prints it. Exit status 0 even when a path fails: every
outcome is in the JSON (this is a check to read, run once on a lent machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "runtimes" / "python"), str(ROOT / "tests")]

import numpy as np  # noqa: E402

MICRO = dict(family="flexdit", hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=4,
             num_classes=10, depth=3, num_poolingformer=1, num_dumbbell=1, dumbbell_group=[1, 0, 1, 0],
             num_normal_block=0, semantic_size=2)
SAMPLING = dict(steps=8, sampler="ddpm", cfg_scale=3.0, seed=3)
PROMPTS = [1, 2, 3]


def build_bundle(out: Path, device: str) -> Path:
    """The tiny model, converted with ONNX graphs plus fp32 AOTI packages for ``device``."""
    from factories import random_model, save_state_dict
    from flexdit_export.convert import ConvertOptions, convert

    out.mkdir(parents=True, exist_ok=True)
    ck = save_state_dict(random_model(MICRO, seed=1), out / "micro.pt")
    opts = ConvertOptions(schedule="500:2,0:dense", batch=2, num_heads=2, backend="aoti", device=device,
                          precision=None, parity_tol=1e-3)
    return Path(convert(ck, out / "bundle", opts, log=lambda m: None))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def check(bundle, device: str, deadline: float | None = None) -> dict:
    """Every path of ``device`` on ``bundle`` against the ONNX Runtime CPU reference."""
    from flexdit_bundle.manifest import BundleError
    from flexdit_runtime.pipeline import Pipeline

    deadline = deadline or time.time() + 600
    ref = Pipeline.from_bundle(bundle, device="cpu")(PROMPTS, **SAMPLING).samples
    scale = float(np.abs(ref).max())
    out = {"device": device, "sampling": SAMPLING, "reference": "onnx graphs on CPUExecutionProvider", "paths": {}}
    for label, backend in (("device default", None), ("aoti", "aoti"), ("onnx", "onnx")):
        if time.time() > deadline:
            out["paths"][label] = {"status": "skipped", "reason": "time budget"}
            continue
        try:
            t0 = time.perf_counter()
            pipe = Pipeline.from_bundle(bundle, device=device, backend=backend)
            load = time.perf_counter() - t0
            pipe(PROMPTS, **SAMPLING)  # warm-up (CUDA graphs are captured at load; allocator, caches)
            t0 = time.perf_counter()
            res = pipe(PROMPTS, **SAMPLING)
            run = time.perf_counter() - t0
        except BundleError as e:
            out["paths"][label] = {"status": "refused", "message": str(e)}
            continue
        except Exception as e:  # a crash of a path is a result too
            out["paths"][label] = {"status": "failed", "error": f"{type(e).__name__}: {_first_line(e)}"}
            continue
        keys = ("kind", "precision", "device", "compat", "cuda_graph", "cuda_graph_error", "providers", "io_binding",
                "io_device", "provider_options")
        out["paths"][label] = {
            "status": "ok", "load_s": round(load, 3), "run_s": round(run, 4),
            "max_abs_diff_rel": float(np.abs(res.samples - ref).max() / scale),
            "finite": bool(np.isfinite(res.samples).all()),
            "engines": [{k: d[k] for k in keys if k in d} for d in pipe.model.engines()]}
    if time.time() < deadline:
        prompts = Path(bundle).parent / "prompts.txt"
        prompts.write_text("".join(f"{p}\n" for p in PROMPTS))
        cmd = [sys.executable, "-m", "flexdit_runtime.cli", str(prompts), "--bundle", str(bundle), "-o",
               str(Path(bundle).parent / f"images-{device}"), "--force", "--device", device, "--json", "-q",
               "--steps", str(SAMPLING["steps"]), "--seed", str(SAMPLING["seed"])]
        try:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(  # the working tree, installed or not
                [str(ROOT), str(ROOT / "runtimes" / "python"), os.environ.get("PYTHONPATH", "")])}
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10, deadline - time.time()), env=env)
            cli = {"rc": p.returncode, "stderr": p.stderr.strip()[-300:]}
            if p.returncode == 0:
                r = json.loads(p.stdout)
                cli.update(images=r["images"], device=r.get("device"), engines=[e["kind"] for e in r["engines"]])
        except subprocess.TimeoutExpired:
            cli = {"rc": None, "stderr": "time budget (killed)"}
        out["cli"] = cli
    return out


def environment(device: str) -> dict:
    env = {"python": sys.version.split()[0]}
    try:
        import onnxruntime as ort
        env.update(onnxruntime=ort.__version__, providers=ort.get_available_providers())
    except ImportError:
        env["onnxruntime"] = None
    try:
        import torch
        env.update(torch=torch.__version__, cuda=torch.version.cuda)
        if device == "cuda" and torch.cuda.is_available():
            env.update(gpu=torch.cuda.get_device_name(),
                       compute_capability="%d.%d" % torch.cuda.get_device_capability())
    except ImportError:
        env["torch"] = None
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--out", default="gpu_runtime_check_out")
    ap.add_argument("--budget-s", type=float, default=130,
                    help="wall-clock deadline, the conversion included (default 130 s)")
    args = ap.parse_args(argv)
    start = time.time()
    out = Path(args.out)
    result = {"environment": environment(args.device)}
    try:
        bundle = build_bundle(out, args.device)
        result["convert_s"] = round(time.time() - start, 1)
        result.update(check(bundle, args.device, start + args.budget_s))
    except Exception as e:  # the conversion itself failed: that is the result
        result["error"] = f"{type(e).__name__}: {_first_line(e)}"
    result["wall_s"] = round(time.time() - start, 1)
    os.makedirs(out, exist_ok=True)
    (out / "runtime_check.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
