"""Quality per step of every sampler on the shipped Fashion-MNIST FlexDiT: class accuracy
and FD (flexdit_fashion's classifier features against the 10k test images) of 500+ images per
setting, against network calls per image; writes a JSON of results (resumable) and, with
--report, the table and a PNG plot of FD against calls.

    nice python3 benchmarks/solver_quality.py --json benchmarks/results/solver_quality.json
    python3 benchmarks/solver_quality.py --json benchmarks/results/solver_quality.json --report \\
        --plot benchmarks/results/solver_quality.png

    python3 benchmarks/solver_quality.py --json benchmarks/results/solver_quality.json \
        --timing dpmpp-2m-10 unipc-8   # per-image time against DDPM-250, interleaved rounds

Every setting samples the same images (50 per class, seed 0, CFG from the bundle's defaults)
from the same x_T; DDPM's per-step noise is the evaluator's shared stream. The quality run's
own ms/image is sequential (it drifts with the machine's load); the table's time ratios come
from --timing, which interleaves the settings round by round.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [("ddpm", 250), ("ddpm", 100), ("ddpm", 50), ("ddim", 50), ("ddim", 25),
            ("dpmpp-2m", 25), ("dpmpp-2m", 20), ("dpmpp-2m", 15), ("dpmpp-2m", 10), ("dpmpp-2m", 8), ("dpmpp-2m", 5),
            ("unipc", 10), ("unipc", 8), ("unipc", 5), ("euler", 25), ("euler", 15)]


def _bundle(work: Path) -> Path:
    b = work / "fashion"
    if not (b / "manifest.json").exists():
        cmd = [sys.executable, "-m", "flexdit_export.cli", "convert", str(ROOT / "models" / "fashion-flexdit"),
               "-o", str(b), "--force"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    return b


def measure(bundle: Path, per_class: int, out: Path, threads: int | None) -> dict:
    from flexdit_fashion.evaluate import (FASHION_CLASSES, _score, _test_reference, load_classifier, sample_bundle)
    from flexdit_runtime import Pipeline

    results = json.loads(out.read_text()) if out.exists() else {}
    classifier, _ = load_classifier()
    test_feats, _ = _test_reference(None, None)
    labels = np.repeat(np.arange(len(FASHION_CLASSES)), per_class)
    pipe = Pipeline.from_bundle(bundle, providers=["cpu"], threads=threads)
    for sampler, steps in SETTINGS:
        key = f"{sampler}-{steps}"
        if key in results:
            continue
        res, settings, _ = sample_bundle(bundle, labels, steps=steps, sampler=sampler, pipeline=pipe)
        score = _score(res.images, labels, test_feats, classifier)
        results[key] = {"sampler": sampler, "steps": steps, "calls_per_image": steps, "n_images": int(len(labels)),
                        "cfg_scale": settings["cfg_scale"], "class_accuracy": score["class_accuracy"],
                        "fd": score["fd"], "seconds_per_image": res.seconds / len(labels)}
        out.write_text(json.dumps(results, indent=1))
        print(f"{key}: acc {score['class_accuracy']:.4f} FD {score['fd']:.3f} "
              f"{res.seconds / len(labels) * 1e3:.1f} ms/image", file=sys.stderr, flush=True)
    return results


def _cpu_model() -> str:
    import platform

    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def timing(bundle: Path, keys: list[str], out: Path, images: int, rounds: int, threads: int | None) -> dict:
    """Per-image time of each setting against DDPM-250, interleaved round by round in one process
    (the sequential ms/image of ``measure`` drift with the machine's load): medians and ratios."""
    import statistics
    import time

    from flexdit_runtime import Pipeline

    results = json.loads(out.read_text()) if out.exists() else {}
    pipe = Pipeline.from_bundle(bundle, providers=["cpu"], threads=threads)
    labels = [i % 10 for i in range(images)]
    keys = ["ddpm-250"] + [k for k in keys if k != "ddpm-250"]
    runs = {k: [] for k in keys}
    for _ in range(rounds):
        for k in keys:
            sampler, steps = k.rsplit("-", 1)
            t0 = time.perf_counter()
            pipe(labels, sampler=sampler, steps=int(steps), seed=0)
            runs[k].append((time.perf_counter() - t0) / images)
    med = {k: statistics.median(v) for k, v in runs.items()}
    results["timing"] = {"cpu": _cpu_model(), "images": images, "rounds": rounds,
                         "threads": threads, "ms_per_image": {k: v * 1e3 for k, v in med.items()},
                         "ratio_to_ddpm250": {k: med[k] / med["ddpm-250"] for k in keys}}
    out.write_text(json.dumps(results, indent=1))
    return results["timing"]


def pick(results: dict, base: str = "ddpm-250") -> str:
    """The fewest-calls setting within 5% of DDPM-250's FD and 1 point of its accuracy."""
    ref = results[base]
    results = {k: r for k, r in results.items() if k != "timing"}
    ok = [k for k, r in results.items() if r["fd"] <= 1.05 * ref["fd"] and r["class_accuracy"] >= ref["class_accuracy"] - 0.01]
    return min(ok, key=lambda k: (results[k]["calls_per_image"], results[k]["fd"]))


def report(results: dict, plot: Path | None) -> str:
    base = results["ddpm-250"]
    best = pick(results)
    ratios = results.get("timing", {}).get("ratio_to_ddpm250", {})
    results = {k: r for k, r in results.items() if k != "timing"}
    rows = ["| sampler | steps = calls/image | class accuracy | FD | FD / DDPM-250 | time per image / DDPM-250 "
            "(interleaved) |", "|---|---|---|---|---|---|"]
    for key, r in sorted(results.items(), key=lambda kv: (SETTINGS.index((kv[1]["sampler"], kv[1]["steps"])))):
        mark = " **(chosen)**" if key == best else ""
        rows.append(f"| {r['sampler']}{mark} | {r['steps']} | {r['class_accuracy']:.4f} | {r['fd']:.3f} | "
                    f"{r['fd'] / base['fd']:.3f} | {f'{ratios[key]:.3f}' if key in ratios else ''} |")
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for sampler in dict.fromkeys(s for s, _ in SETTINGS):
            pts = sorted((r["calls_per_image"], r["fd"]) for r in results.values() if r["sampler"] == sampler)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=sampler)
        ax.axhline(1.05 * base["fd"], color="gray", ls="--", lw=0.8, label="DDPM-250 FD + 5%")
        ax.set_xscale("log")
        ax.set_xlabel("network calls per image (log)")
        ax.set_ylabel("FD (Fashion classifier features, lower is better)")
        ax.set_title(f"Fashion FlexDiT: FD against calls ({base['n_images']} images per point)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
    return "\n".join(rows) + f"\n\nchosen: {best}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, required=True, help="results file (settings already in it are skipped)")
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--work", type=Path, help="where the converted bundle is kept")
    ap.add_argument("--report", action="store_true", help="print the markdown table from --json (no sampling)")
    ap.add_argument("--plot", type=Path, help="with --report: write the FD-against-calls plot here (PNG)")
    ap.add_argument("--timing", nargs="+", metavar="SAMPLER-STEPS",
                    help="time these settings against ddpm-250, interleaved (e.g. dpmpp-2m-10); no quality run")
    ap.add_argument("--images", type=int, default=16, help="with --timing: images per run")
    ap.add_argument("--rounds", type=int, default=3, help="with --timing: interleaved rounds")
    a = ap.parse_args(argv)
    if a.report:
        print(report(json.loads(a.json.read_text()), a.plot))
        return 0
    work = a.work or Path(tempfile.mkdtemp(prefix="solver-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.timing:
        print(json.dumps(timing(_bundle(work), a.timing, a.json, a.images, a.rounds, a.threads), indent=1))
        return 0
    measure(_bundle(work), a.per_class, a.json, a.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
