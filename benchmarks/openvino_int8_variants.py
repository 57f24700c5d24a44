"""Study: which OpenVINO int8 form for FlexDiT stages (speed, error, memory), beyond the one the
bundle ships (NNCF post-training quantisation per stage, run with an f32 hint).

The shipped int8 models are calibrated per stage, so each stage is its own compiled model and
its own repacked weights (peak RSS misses issue 12's 1.3x bound), and they reach 3.8x ONNX
Runtime fp32 on the DiT-B/2 body where the issue asks 5x. This script measures the alternatives
that could change either number, on the same stages and inputs:

    nncf per stage           the bundle's int8-static IRs, INFERENCE_PRECISION_HINT f32 (shipped)
    nncf per stage, bf16     the same IRs, the layers NNCF left in float run in bf16
    nncf pooled              ONE model for all stages: the stages' fp32 graphs merged as the
                             runtime merges them (the differing constants become inputs), NNCF
                             calibrated on every stage's rows with that stage's constants
    int8 weights, dyn. act.  ONE model: the merged graph with int8 weights (nncf.compress_weights,
                             data-free), activations quantised at run time in groups
                             (DYNAMIC_QUANTIZATION_GROUP_SIZE); no calibration at all

Per stage: median ms per call (interleaved rounds), relative RMS error against the fp32 graph
(OpenVINO f32) on the stage's held-out calibration rows; peak RSS (VmHWM) of fresh processes
that compile every stage and run each once.

    python benchmarks/openvino_int8_variants.py --bundle /tmp/ov13/bodyB/bundle --rounds 5
    python benchmarks/openvino_int8_variants.py --bundle /tmp/ov13/fashion --calib /tmp/ov13/fashion.calib --rss
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexdit_runtime import RuntimeSettings, load_bundle  # noqa: E402
from flexdit_runtime.engines import StageRunner  # noqa: E402
from flexdit_runtime.openvino_engine import _bound, _merge, artifact_for, compile_config  # noqa: E402
from flexdit_runtime.openvino_int8_weights import GROUP_SIZE as GROUP  # noqa: E402  (the runtime's int8-dynamic)


def cfg(threads: int, hint: str = "f32", group: int | None = None, cache: str | None = None) -> dict:
    """The runtime's compile settings, with another inference precision hint / activation group."""
    c = {**compile_config("fp32", threads, cache), "INFERENCE_PRECISION_HINT": hint}
    if group is not None:
        c["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = group
    return c


def merged_fp32(ov, core, b):
    """(one model for every stage, [per stage {input: value}]) as the runtime builds it."""
    arts = [artifact_for(b, st, "fp32") for st in b.stages]
    merged = _merge(ov, [core.read_model(str(b.path(a))) for a in arts], [_bound(a) for a in arts])
    if merged is None:
        raise SystemExit("the stage graphs do not merge into one model")
    return merged


def build_shared(b, cs, out: Path) -> None:
    """Write pooled.xml (NNCF over all stages' rows) and dynq.xml (int8 weights) + feeds.npz."""
    import nncf
    import openvino as ov
    from flexdit_export.calib.readers import StageBatches

    core = ov.Core()
    base, feeds = merged_fp32(ov, core, b)
    np.savez(out / "feeds.npz", **{f"{i}/{k}": v for i, f in enumerate(feeds) for k, v in f.items()})
    t0 = time.perf_counter()
    dynq = nncf.compress_weights(base.clone(), mode=nncf.CompressWeightsMode.INT8_SYM)
    ov.save_model(dynq, str(out / "dynq.xml"), compress_to_fp16=False)
    print(f"int8 weights (data-free): {time.perf_counter() - t0:.0f} s", flush=True)
    batch = b.stages[0].batch
    rows = [{**f, **feeds[i]} for i, st in enumerate(b.stages) for f in StageBatches(cs, st.id, batch, "calib")]
    t0 = time.perf_counter()
    pooled = nncf.quantize(base, nncf.Dataset(rows), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(rows))
    ov.save_model(pooled, str(out / "pooled.xml"), compress_to_fp16=False)
    print(f"NNCF pooled over {len(rows)} batches of every stage: {time.perf_counter() - t0:.0f} s", flush=True)


def load_feeds(out: Path, n: int) -> list[dict]:
    z = np.load(out / "feeds.npz")
    return [{k.split("/", 1)[1]: z[k] for k in z.files if k.split("/", 1)[0] == str(i)} for i in range(n)]


def candidates(b, out: Path, threads: int) -> dict:
    """{name: [per stage fn(feed) -> output]}; shared models are compiled once."""
    import openvino as ov

    core = ov.Core()
    feeds = load_feeds(out, len(b.stages))
    ort = StageRunner(b, RuntimeSettings(threads=threads, shared_thread_pool=False), {"*": "fp32"}, "onnx")
    per = {h: [core.compile_model(str(b.path(b.artifact(st, "openvino", "int8-static"))), "CPU", cfg(threads, h))
               for st in b.stages] for h in ("f32", "bf16")}
    pooled = core.compile_model(str(out / "pooled.xml"), "CPU", cfg(threads))
    dynq = core.compile_model(str(out / "dynq.xml"), "CPU", cfg(threads, group=GROUP))

    def shared(m):
        return [lambda f, i=i: m({**f, **feeds[i]})[0] for i in range(len(b.stages))]

    return {"onnx/fp32": [lambda f, e=ort.engines[st.id]: e.run(f["x"], f["t"], f["y"]) for st in b.stages],
            "nncf per stage": [lambda f, m=m: m(f)[0] for m in per["f32"]],
            "nncf per stage, bf16": [lambda f, m=m: m(f)[0] for m in per["bf16"]],
            "nncf pooled": shared(pooled),
            f"int8 weights, dyn. act. g={GROUP}": shared(dynq)}


def rss_child(bundle: str, out: str, which: str, threads: int) -> None:
    """Compile every stage of one candidate, run each once, print VmHWM (MB)."""
    b = load_bundle(bundle, defer_weights=True)
    import openvino as ov

    if which in ("openvino/fp32", "openvino/int8-static"):
        r = StageRunner(b, RuntimeSettings(threads=threads), {"*": which.split("/")[1]}, "openvino")
        fns = [lambda f, e=r.engines[st.id]: e.run(f["x"], f["t"], f["y"]) for st in b.stages]
    else:
        core = ov.Core()
        feeds = load_feeds(Path(out), len(b.stages))
        m = core.compile_model(str(Path(out) / f"{which}.xml"), "CPU",
                               cfg(threads, group=GROUP if which == "dynq" else None,
                                   cache=os.environ.get("FLEXDIT_OPENVINO_CACHE")))
        fns = [lambda f, i=i: m({**f, **feeds[i]})[0] for i in range(len(b.stages))]
    for st, fn in zip(b.stages, fns):
        rng = np.random.default_rng(0)
        fn({"x": rng.standard_normal(st.inputs[0].shape, dtype=np.float32),
            "t": np.full(st.batch, st.t_min, np.float32), "y": np.zeros(st.batch, np.int64)})
    status = dict(ln.split(":", 1) for ln in Path("/proc/self/status").read_text().splitlines() if ":" in ln)
    print(json.dumps({"VmHWM": int(status["VmHWM"].split()[0]) / 1024}))


RSS_CASES = ("openvino/fp32", "openvino/int8-static", "pooled", "dynq")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, help="a bundle converted with --backend openvino --extra-precisions int8")
    ap.add_argument("--calib", help="its calibration set (default: BUNDLE.calib)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rss", action="store_true", help="also peak RSS of fresh processes (cache warm, 2 rounds, medians)")
    ap.add_argument("--work", help="keep the pooled / dynq models here (default: a temporary directory)")
    ap.add_argument("--json")
    ap.add_argument("--rss-child", nargs=2, metavar=("WORK", "CASE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        return rss_child(args.bundle, args.rss_child[0], args.rss_child[1], args.threads)
    # only here: the RSS children must not pay for calib's or timing's (torch) imports
    from flexdit_export.calib.readers import StageBatches
    from flexdit_export.calib.store import CalibSet
    from timing import interleaved_medians

    b = load_bundle(args.bundle, defer_weights=True)
    cs = CalibSet.open(args.calib or f"{args.bundle.rstrip('/')}.calib")
    out = Path(args.work or tempfile.mkdtemp(prefix="flexdit-ov-int8-"))
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "pooled.xml").exists():
        build_shared(b, cs, out)
    cands = candidates(b, out, args.threads)
    names = list(cands)
    batch = b.stages[0].batch
    rows = {}
    for i, st in enumerate(b.stages):
        hold = list(StageBatches(cs, st.id, batch, "holdout"))
        ref = np.concatenate([cands["onnx/fp32"][i](f) for f in hold])
        err = {}
        for n in names:
            got = np.concatenate([cands[n][i](f) for f in hold])
            err[n] = float(np.sqrt(((got - ref) ** 2).mean() / (ref ** 2).mean()))
        x = hold[0]
        ms = interleaved_medians({n: (lambda fn=cands[n][i]: fn(x)) for n in names}, args.rounds, 2)
        rows[st.id] = {"ms": ms, "rel_rms": err}
    print(f"\n### {args.bundle}: batch {batch}, {args.threads} threads, {args.rounds} interleaved rounds; median ms per "
          "call (speed-up vs onnx/fp32), rel RMS error vs fp32 on held-out rows")
    print("| stage | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for sid, r in rows.items():
        base = r["ms"]["onnx/fp32"]
        print(f"| {sid} | " + " | ".join(f"{r['ms'][n]:.1f} ({base / r['ms'][n]:.2f}x, {r['rel_rms'][n]:.1e})"
                                         for n in names) + " |")
    total = {n: sum(r["ms"][n] for r in rows.values()) for n in names}
    print("| sum | " + " | ".join(f"{total[n]:.1f} ({total['onnx/fp32'] / total[n]:.2f}x)" for n in names) + " |")
    result = {"bundle": args.bundle, "threads": args.threads, "rounds": args.rounds, "stages": rows}
    if args.rss:
        env = {**os.environ, "FLEXDIT_OPENVINO_CACHE": str(out / "cache")}
        got = {}
        for r in range(3):  # round 0 fills the compiled-model cache and is not counted
            for case in RSS_CASES:
                p = subprocess.run([sys.executable, __file__, "--bundle", args.bundle, "--threads", str(args.threads),
                                    "--rss-child", str(out), case], capture_output=True, text=True, env=env)
                if p.returncode:
                    raise SystemExit(f"{case}: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
                if r:
                    got.setdefault(case, []).append(json.loads(p.stdout.strip().splitlines()[-1])["VmHWM"])
        med = {c: statistics.median(v) for c, v in got.items()}
        print("\npeak RSS (VmHWM MB, fresh processes, compiled-model cache warm, medians of 2): "
              + ", ".join(f"{c} {v:.0f} ({v / med['openvino/fp32']:.2f}x openvino/fp32)" for c, v in med.items()))
        result["rss_mb"] = med
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
