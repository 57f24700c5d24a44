"""Quality per step of every sampler on the shipped Fashion-MNIST FlexDiT: class accuracy
and FD (flexdit_fashion's classifier features against the 10k test images) of 500+ images per
setting, against network calls per image; writes a JSON of results (resumable) and, with
--report, the table and a PNG plot of FD against calls.

    nice python3 benchmarks/solver_quality.py --json benchmarks/results/solver_quality.json
    python3 benchmarks/solver_quality.py --json benchmarks/results/solver_quality.json --report \\
        --plot benchmarks/results/solver_quality.png

    python3 benchmarks/solver_quality.py --json benchmarks/results/solver_quality.json \
        --timing dpmpp-2m-10 unipc-8   # per-image time against DDPM-250, interleaved rounds
    python3 benchmarks/solver_quality.py --json benchmarks/results/solver_quality-seed1.json --seed 1 \
        --only ddpm-250 ddpm-100 dpmpp-2m-25   # a second draw of the settings near the bar
    python3 benchmarks/solver_quality.py --json benchmarks/results/solver_quality.json --real-spread 20

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


def measure(bundle: Path, per_class: int, out: Path, threads: int | None, seed: int = 0, only=None) -> dict:
    from flexdit_fashion.evaluate import (FASHION_CLASSES, _score, _test_reference, load_classifier, sample_bundle)
    from flexdit_runtime import Pipeline

    results = json.loads(out.read_text()) if out.exists() else {}
    classifier, _ = load_classifier()
    test_feats, _ = _test_reference(None, None)
    labels = np.repeat(np.arange(len(FASHION_CLASSES)), per_class)
    pipe = Pipeline.from_bundle(bundle, providers=["cpu"], threads=threads)
    for sampler, steps in SETTINGS:
        key = f"{sampler}-{steps}"
        if key in results or (only and key not in only):
            continue
        res, settings, _ = sample_bundle(bundle, labels, steps=steps, sampler=sampler, seed=seed, pipeline=pipe)
        score = _score(res.images, labels, test_feats, classifier)
        results[key] = {"sampler": sampler, "steps": steps, "calls_per_image": steps, "n_images": int(len(labels)),
                        "cfg_scale": settings["cfg_scale"], "seed": seed, "class_accuracy": score["class_accuracy"],
                        "fd": score["fd"], "seconds_per_image": res.seconds / len(labels)}
        out.write_text(json.dumps(results, indent=1))
        print(f"{key}: acc {score['class_accuracy']:.4f} FD {score['fd']:.3f} "
              f"{res.seconds / len(labels) * 1e3:.1f} ms/image", file=sys.stderr, flush=True)
    return results


def real_spread(out: Path, per_class: int, draws: int) -> dict:
    """FD's own spread at this sample size: disjoint draws of real training images, each against
    the test set (the noise floor for comparing settings by FD)."""
    from flexdit_fashion.datasets import load_model_split
    from flexdit_fashion.evaluate import _test_reference, features, frechet_distance, load_classifier

    results = json.loads(out.read_text()) if out.exists() else {}
    classifier, _ = load_classifier()
    test_feats, _ = _test_reference(None, None)
    x, _ = load_model_split("train")
    n = per_class * 10
    perm = np.random.default_rng(0).permutation(len(x))
    fds = np.array([frechet_distance(features(x[perm[i * n:(i + 1) * n]], classifier), test_feats)
                    for i in range(draws)])
    results["real_spread"] = {"n_images": n, "draws": draws, "fd_mean": float(fds.mean()),
                              "fd_std": float(fds.std(ddof=1)), "fd": fds.round(4).tolist()}
    out.write_text(json.dumps(results, indent=1))
    return results["real_spread"]


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


def settings_of(results: dict) -> dict:
    return {k: r for k, r in results.items() if k not in ("timing", "real_spread")}


def seed_means(runs: list[dict], base: str = "ddpm-250") -> dict:
    """{setting: (FD / DDPM-250, accuracy - DDPM-250's)} averaged over the seeds that have it
    (each seed's ratio against the same seed's DDPM-250)."""
    out = {}
    for key in settings_of(runs[0]):
        have = [r for r in runs if key in r and base in r]
        out[key] = (float(np.mean([r[key]["fd"] / r[base]["fd"] for r in have])),
                    float(np.mean([r[key]["class_accuracy"] - r[base]["class_accuracy"] for r in have])), len(have))
    return out


def pick(runs: list[dict]) -> str:
    """The fewest-calls setting within 5% of DDPM-250's FD and 1 point of its accuracy (averaged
    over the seeds measured)."""
    means, results = seed_means(runs), settings_of(runs[0])
    ok = [k for k, (ratio, dacc, _) in means.items() if ratio <= 1.05 and dacc >= -0.01]
    return min(ok, key=lambda k: (results[k]["calls_per_image"], means[k][0]))


def report(runs: list[dict], plot: Path | None) -> str:
    """The table (first file: seed 0; the others: more seeds of some settings) and the plot."""
    results, base = settings_of(runs[0]), runs[0]["ddpm-250"]
    best, means = pick(runs), seed_means(runs)
    ratios = runs[0].get("timing", {}).get("ratio_to_ddpm250", {})
    more = len(runs) > 1
    head = "| sampler | steps = calls/image | class accuracy | FD | FD / DDPM-250 |"
    head += " FD / DDPM-250, mean of seeds (seeds) | accuracy vs DDPM-250, mean of seeds |" if more else ""
    head += " time per image / DDPM-250 (interleaved) |"
    rows = [head, "|" + "---|" * head.count(" |")]
    for key, r in sorted(results.items(), key=lambda kv: (SETTINGS.index((kv[1]["sampler"], kv[1]["steps"])))):
        mark = " **(chosen)**" if key == best else ""
        row = (f"| {r['sampler']}{mark} | {r['steps']} | {r['class_accuracy']:.4f} | {r['fd']:.3f} | "
               f"{r['fd'] / base['fd']:.3f} |")
        if more:
            ratio, dacc, n = means[key]
            row += f" {ratio:.3f} ({n}) | {dacc * 100:+.1f} points |" if n > 1 else " | |"
        rows.append(row + f" {f'{ratios[key]:.3f}' if key in ratios else ''} |")
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
    spread = runs[0].get("real_spread")
    note = (f"\nFD spread at {spread['n_images']} real images ({spread['draws']} disjoint draws against the test "
            f"set): mean {spread['fd_mean']:.3f}, std {spread['fd_std']:.3f}") if spread else ""
    return "\n".join(rows) + f"\n\nchosen: {best}" + note


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, required=True, help="results file (settings already in it are skipped)")
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--work", type=Path, help="where the converted bundle is kept")
    ap.add_argument("--report", action="store_true", help="print the markdown table from --json (no sampling)")
    ap.add_argument("--also", type=Path, nargs="+", default=[],
                    help="with --report: results files of other seeds (their ratios are averaged with --json's)")
    ap.add_argument("--seed", type=int, default=0, help="initial noise seed (use a separate --json per seed)")
    ap.add_argument("--only", nargs="+", metavar="SAMPLER-STEPS", help="measure only these settings")
    ap.add_argument("--real-spread", type=int, metavar="DRAWS",
                    help="measure FD's spread at --per-class x 10 real images over DRAWS disjoint draws; no sampling")
    ap.add_argument("--plot", type=Path, help="with --report: write the FD-against-calls plot here (PNG)")
    ap.add_argument("--timing", nargs="+", metavar="SAMPLER-STEPS",
                    help="time these settings against ddpm-250, interleaved (e.g. dpmpp-2m-10); no quality run")
    ap.add_argument("--images", type=int, default=16, help="with --timing: images per run")
    ap.add_argument("--rounds", type=int, default=3, help="with --timing: interleaved rounds")
    a = ap.parse_args(argv)
    if a.report:
        print(report([json.loads(p.read_text()) for p in [a.json, *a.also]], a.plot))
        return 0
    if a.real_spread:
        print(json.dumps(real_spread(a.json, a.per_class, a.real_spread), indent=1))
        return 0
    work = a.work or Path(tempfile.mkdtemp(prefix="solver-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.timing:
        print(json.dumps(timing(_bundle(work), a.timing, a.json, a.images, a.rounds, a.threads), indent=1))
        return 0
    measure(_bundle(work), a.per_class, a.json, a.threads, a.seed, a.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
