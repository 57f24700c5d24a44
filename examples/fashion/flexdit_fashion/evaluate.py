"""Sample quality of the Fashion-MNIST demo model: class accuracy and a classifier-feature FD.

A small CNN trained on Fashion-MNIST (``examples/fashion/train_classifier.py``; weights and
test accuracy shipped as this package's data in ``classifier/``) judges generated 32 x 32 images:

- **class accuracy**: the share of images the classifier assigns to the class they were
  generated for;
- **FD**: the Frechet distance between Gaussian fits of the classifier's penultimate-layer
  features (128-d) of generated images and of the 10,000 test images. This is *not*
  Inception FID: the feature extractor is this small Fashion-MNIST CNN, so the numbers are
  only comparable with each other (same classifier, same number of images), never with
  published FIDs. FD is biased upwards for small sample sizes, which is why every result
  carries the real-vs-real baseline: a train subset of the same size against the test set.

``evaluate_bundle`` samples N images per class through the torch-free runtime
(``flexdit_runtime.Pipeline``, the fp32 bundle) and, given the checkpoint, the same model in
PyTorch (``reference_sample``) from the *same* initial and per-step noise, so the two FDs
differ only by what the export changed. ``compare_latency`` times two bundles (e.g. the
FlexDiT schedule against the same checkpoint converted with ``--schedule dense``)
interleaved on the same prompts.

The classifier is found without the source tree: an explicit directory, else
``$FLEXDIT_FASHION_CLASSIFIER``, else the package's own ``classifier/``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flexdit_bundle.spec import Manifest
from flexdit_export.errors import UserError

from .datasets import FASHION_CLASSES, load_model_split, to_model

PACKAGED_CLASSIFIER_DIR = Path(__file__).resolve().parent / "classifier"  # package data, installed with the package
ENV_CLASSIFIER = "FLEXDIT_FASHION_CLASSIFIER"  # overrides the packaged classifier when set
CLASSIFIER_WEIGHTS, CLASSIFIER_METRICS = "classifier.safetensors", "metrics.json"
FEATURE_DIM = 128
FD_NOTE = ("FD = Frechet distance of the Fashion-MNIST classifier's 128-d penultimate features, "
           "not Inception FID; compare only at equal sample sizes")
_NOISE_SALT = 7919  # per-step noise stream: default_rng([seed, salt, k])


# ---------------------------------------------------------------- classifier
class FashionClassifier(nn.Module):
    """Three conv blocks on the 1 x 32 x 32 [-1, 1] representation -> 128-d features -> 10 logits."""

    def __init__(self, num_classes: int = 10, width: int = 16, feature_dim: int = FEATURE_DIM):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))

        self.body = nn.Sequential(block(1, width), block(width, 2 * width), block(2 * width, 4 * width))  # -> 4x4
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, feature_dim), nn.ReLU())
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x):
        return self.embed(self.body(x))

    def forward(self, x):
        return self.head(self.drop(self.features(x)))


def find_classifier_dir(explicit=None) -> Path:
    """The classifier directory: ``explicit``, else ``$FLEXDIT_FASHION_CLASSIFIER``, else the
    packaged copy."""
    return Path(explicit or os.environ.get(ENV_CLASSIFIER) or PACKAGED_CLASSIFIER_DIR)


def load_classifier(classifier_dir=None) -> tuple[FashionClassifier, dict]:
    """-> (classifier in eval mode, its metrics.json). Missing/corrupt files -> UserError."""
    return _load_classifier_cached(str(find_classifier_dir(classifier_dir).resolve()))


@lru_cache(maxsize=4)
def _load_classifier_cached(d: str):
    from safetensors.torch import load_file

    d = Path(d)
    weights, metrics = d / CLASSIFIER_WEIGHTS, d / CLASSIFIER_METRICS
    if not weights.is_file():
        raise UserError(f"classifier weights not found: {weights} (pass the classifier directory, set "
                        f"{ENV_CLASSIFIER}, or train one with examples/fashion/train_classifier.py)")
    try:
        meta = json.loads(metrics.read_text()) if metrics.is_file() else {}
        sd = load_file(str(weights))
        model = FashionClassifier(**meta.get("architecture", {}))
        model.load_state_dict(sd)
    except Exception as e:  # bad JSON, bad safetensors, wrong shapes
        raise UserError(f"cannot load the classifier from {d}: {str(e).splitlines()[0][:200]}") from None
    return model.eval(), meta


def _as_input(images) -> torch.Tensor:
    """uint8 (N, H, W[, 1]) 28 or 32 px, or float (N, 1, 32, 32) in [-1, 1] -> float tensor."""
    a = np.asarray(images)
    if a.dtype == np.uint8:
        a = to_model(a)
    a = np.asarray(a, dtype=np.float32)
    if a.ndim != 4 or a.shape[1:] != (1, 32, 32):
        raise ValueError(f"expected images (N, 32, 32[, 1]) uint8 or (N, 1, 32, 32) float, got {a.shape}")
    return torch.from_numpy(np.ascontiguousarray(a))


@torch.no_grad()
def _run(images, classifier=None, batch: int = 1000):
    model = classifier if classifier is not None else load_classifier()[0]
    x = _as_input(images)
    feats, logits = [], []
    for lo in range(0, x.shape[0], batch):
        f = model.features(x[lo:lo + batch])
        feats.append(f)
        logits.append(model.head(f))
    return torch.cat(feats).double().numpy(), torch.cat(logits).numpy()


def features(images, classifier=None) -> np.ndarray:
    """Penultimate-layer (128-d) features, float64 (N, 128)."""
    return _run(images, classifier)[0]


def predict(images, classifier=None) -> np.ndarray:
    return _run(images, classifier)[1].argmax(axis=1)


def class_accuracy(images, labels, classifier=None, per_class: bool = False):
    """Share of ``images`` the classifier assigns to ``labels``; with ``per_class`` also a
    {class name: accuracy} dict."""
    labels = np.asarray(labels)
    pred = predict(images, classifier)
    acc = float(np.mean(pred == labels))
    if not per_class:
        return acc
    return acc, {FASHION_CLASSES[c]: float(np.mean(pred[labels == c] == c)) for c in np.unique(labels)}


def frechet_distance(feats_a, feats_b) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)) of Gaussian fits of two feature sets.

    Tr sqrtm(S_a S_b) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix S_a^1/2 S_b S_a^1/2 (same eigenvalues as S_a S_b), which is exact
    and, unlike a general sqrtm, stays real and finite for singular covariances.
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (N >= 2, D) feature sets of equal D, got {a.shape} and {b.shape}")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    fd = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    return max(fd, 0.0)


@lru_cache(maxsize=2)
def _test_reference(classifier_dir: str | None, data_dir: str | None):
    model = load_classifier(classifier_dir)[0]
    x, y = load_model_split("test", data_dir)
    f, logits = _run(x, model)
    return f, float(np.mean(logits.argmax(1) == y))


def real_baseline(n: int, seed: int = 0, classifier_dir=None, data_dir=None) -> dict:
    """FD of ``n`` random train images against the test set, and their class accuracy: the
    best a generator of n images can hope for with this metric."""
    model = load_classifier(classifier_dir)[0]
    test_f, test_acc = _test_reference(str(classifier_dir) if classifier_dir else None, data_dir)
    x, y = load_model_split("train", data_dir)
    idx = np.random.default_rng([seed, 99]).choice(len(x), size=min(n, len(x)), replace=False)
    f, logits = _run(x[idx], model)
    return {"n": int(len(idx)), "fd": frechet_distance(f, test_f),
            "class_accuracy": float(np.mean(logits.argmax(1) == y[idx])),
            "classifier_test_accuracy": test_acc}


# ---------------------------------------------------------------- sampling
def _noise_source(seed: int, n: int, shape):
    """The per-step noise both samplers use: step k's noise for all n images."""
    def noise(k):
        rng = np.random.default_rng([int(seed), _NOISE_SALT, int(k)])
        return rng.standard_normal((n,) + tuple(shape), dtype=np.float32)
    return noise


def _initial_noise(seed: int, n: int, shape) -> np.ndarray:
    # The runtime's own rule (Pipeline draws x_T per image from default_rng([seed, i])).
    return np.stack([np.random.default_rng([int(seed), i]).standard_normal(shape, dtype=np.float32) for i in range(n)])


class _Estimate:
    """Says the sample size before sampling starts and, after the first step, how long the rest
    will take at that step's rate (an eval of 1000 images runs for minutes on a CPU)."""

    def __init__(self, n: int, steps: int, sampler: str, log):
        self.n, self.steps, self.log, self.done = n, steps, log, 0
        self.log(f"sampling {n} images ({n // len(FASHION_CLASSES)} per class), {steps} {sampler} steps ...")
        self.start = time.perf_counter()

    def __call__(self, k: int = 1):
        self.done += k
        if self.done == 1:
            first = time.perf_counter() - self.start
            self.log(f"first step took {first:.1f} s: about {first * self.steps / 60:.1f} min for the {self.n} images")


def sample_bundle(bundle_path, labels, *, steps=None, sampler=None, cfg_scale=None, seed=0, threads=None,
                  pipeline=None, log=None):
    """-> (Result, settings dict): the fp32 bundle sampled from the shared seeded noise. ``log``
    (e.g. print to stderr) receives the sample size and a time estimate."""
    from flexdit_runtime import Pipeline

    check_seed(seed)
    pipe = pipeline or Pipeline.from_bundle(bundle_path, providers=["cpu"], threads=threads)
    cfg = pipe.cfg
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    n = len(labels)
    # every value checked (steps in 1..T, a finite guidance scale) before the first step is logged
    params = pipe.model.params(steps=steps, sampler=sampler, cfg_scale=cfg_scale)
    settings = {"steps": params.steps, "sampler": params.sampler, "cfg_scale": params.cfg_scale}
    noise = _noise_source(seed, n, shape)
    progress = _Estimate(n, settings["steps"], settings["sampler"], log) if log else None
    res = pipe([int(v) for v in labels], **settings, seed=seed, init_noise=_initial_noise(seed, n, shape),
               noise_fn=lambda k, idx: noise(k)[idx], batch=n, progress=progress)
    return res, settings, pipe


def reference_model(ckpt, bundle_manifest: Manifest | dict) -> nn.Module:
    """The checkpoint as a PyTorch model; refused (UserError) when missing, unreadable or not the
    model of the bundle. Cheap next to sampling: callers load it before they sample."""
    from flexdit_export.checkpoints import load_checkpoint

    mcfg = Manifest.from_json(bundle_manifest).model.config
    ck = load_checkpoint(ckpt, mcfg.num_heads, mcfg.extra.get("semantic_size"))
    if ck.config.to_dict() != mcfg.to_json():
        raise UserError(f"reference checkpoint {ckpt} is {ck.config.name}, not the model of the bundle")
    return ck.build()


def check_seed(seed) -> int:
    """numpy seeds are non-negative integers (image i uses ``default_rng([seed, i])``)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"--seed must be at least 0, got {seed}")
    return int(seed)


def sample_reference(ckpt, bundle_manifest: Manifest | dict, labels, stages, *, steps, sampler, cfg_scale, seed=0):
    """The same model in PyTorch (reference_sample) from the same noise; -> (uint8 images, samples, seconds).
    ``ckpt``: a checkpoint path or the model ``reference_model`` loaded from it."""
    from flexdit_runtime.images import to_uint8

    from flexdit_export.reference_sampler import reference_sample

    m = Manifest.from_json(bundle_manifest)
    model = ckpt if isinstance(ckpt, nn.Module) else reference_model(ckpt, m)
    mcfg = m.model.config
    shape = (mcfg.in_channels, mcfg.input_size, mcfg.input_size)
    n = len(labels)
    d = m.diffusion
    start = time.perf_counter()
    samples = reference_sample(model, stages, _initial_noise(seed, n, shape), np.asarray(labels, np.int64),
                               steps=steps, sampler=sampler, cfg_scale=cfg_scale, cfg_channels=d.cfg_channels,
                               num_timesteps=d.num_timesteps, noise_fn=_noise_source(seed, n, shape))
    seconds = time.perf_counter() - start
    return to_uint8(samples, m.output.value_range), samples, seconds


def _score(images, labels, test_feats, classifier) -> dict:
    acc, per = class_accuracy(images, labels, classifier, per_class=True)
    return {"class_accuracy": acc, "fd": frechet_distance(features(images, classifier), test_feats),
            "per_class_accuracy": per}


def evaluate_bundle(bundle_path, per_class: int = 50, steps=None, sampler=None, cfg_scale=None, seed: int = 0,
                    classifier_dir=None, reference_ckpt=None, schedule_override=None, data_dir=None, threads=None,
                    log=None) -> dict:
    """Sample ``per_class`` images of every class through the bundle and score them.

    Returns class accuracy and FD (classifier features vs the 10k test images; not Inception
    FID) of the bundle's images, the real-vs-real baseline at the same size, and with
    ``reference_ckpt`` the same model sampled in PyTorch from the same noise (``fd_ratio`` =
    bundle FD / PyTorch FD, ``max_abs_sample_diff`` between the two final samples).
    ``schedule_override`` (preset or 'lo:s,...') makes the PyTorch run use that schedule
    instead of the bundle's, e.g. "dense" for the same weights dense at every step.
    Sampler settings default to the bundle's defaults. The headline numbers are also flat
    top-level keys (class_accuracy, fd, real_fd, ...); the summary table goes to ``log``
    (default: stderr, so stdout stays free for JSON).
    """
    from flexdit_runtime import Pipeline, load_bundle
    from flexdit_runtime.sampling_params import resolve_params
    from flexdit_runtime.settings import RuntimeSettings

    from flexdit_export.schedule import parse_schedule

    # Everything a user can get wrong is refused here, before any engine loads or any image is sampled.
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise UserError(f"per_class must be at least 1, got {per_class}")
    check_seed(seed)
    run_settings = RuntimeSettings(providers=["cpu"], threads=threads)  # refuses --threads < 1
    bundle = load_bundle(bundle_path, defer_weights=True)
    m = bundle.manifest
    if m.model.num_classes != len(FASHION_CLASSES):
        raise UserError(f"bundle has {m.model.num_classes} classes, not the 10 Fashion-MNIST classes")
    resolve_params(bundle.sampling_defaults, bundle.diffusion.num_timesteps, steps=steps, sampler=sampler,
                   cfg_scale=cfg_scale)
    ref_model = reference_model(reference_ckpt, m) if reference_ckpt is not None else None
    stages = None
    if ref_model is not None and schedule_override:
        cfg = m.model.config
        parsed = parse_schedule(schedule_override, T=m.diffusion.num_timesteps,
                                grid=cfg.input_size // cfg.patch_size, family=cfg.extra["family"],
                                semantic_size=cfg.extra.get("semantic_size", 8))
        stages = [(s.t_min, s.t_max, s.sparse_grid) for s in parsed]
    classifier, meta = load_classifier(classifier_dir)
    test_feats, test_acc = _test_reference(str(classifier_dir) if classifier_dir else None, data_dir)
    labels = np.repeat(np.arange(len(FASHION_CLASSES)), per_class)
    say = log or (lambda msg: print(msg, file=sys.stderr))
    res, settings, pipe = sample_bundle(bundle_path, labels, steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                                        seed=seed, pipeline=Pipeline(bundle, settings=run_settings), log=say)
    bundle_stages = [(s.t_min, s.t_max, s.sparse_grid) for s in m.stages]
    report = {"bundle": str(bundle_path), "n_images": int(len(labels)), "per_class": per_class, "seed": seed,
              **settings, "schedule": _schedule_text(bundle_stages), "fd_note": FD_NOTE,
              "classifier_test_accuracy": test_acc}
    report["bundle_result"] = {**_score(res.images, labels, test_feats, classifier), "seconds": res.seconds,
                               "seconds_per_image": res.seconds / len(labels)}
    report["real_baseline"] = real_baseline(len(labels), seed, classifier_dir, data_dir)
    if ref_model is not None:
        stages = stages or bundle_stages
        imgs, samples, secs = sample_reference(ref_model, m, labels, stages, seed=seed, **settings)
        report["reference"] = {**_score(imgs, labels, test_feats, classifier), "schedule": _schedule_text(stages),
                               "seconds": secs, "max_abs_sample_diff": float(np.abs(samples - res.samples).max()),
                               "images_identical_share": float(np.mean(np.all(imgs == res.images, axis=(1, 2, 3))))}
        report["fd_ratio"] = report["bundle_result"]["fd"] / max(report["reference"]["fd"], 1e-12)
    report.update(_headline(report))
    (log or (lambda msg: print(msg, file=sys.stderr)))(render(report))
    return report


def _headline(r: dict) -> dict:
    out = {"class_accuracy": r["bundle_result"]["class_accuracy"], "fd": r["bundle_result"]["fd"],
           "real_fd": r["real_baseline"]["fd"], "real_class_accuracy": r["real_baseline"]["class_accuracy"]}
    if "reference" in r:
        out.update(reference_class_accuracy=r["reference"]["class_accuracy"], reference_fd=r["reference"]["fd"])
    return out


def _schedule_text(stages) -> str:
    return ",".join(f"{lo}:{'dense' if s is None else s}" for lo, _, s in stages)


_TIMER = """
import json, sys, time
from flexdit_runtime import Pipeline
from flexdit_runtime.engines import share_thread_pool
a = json.loads(sys.argv[1])
share_thread_pool(a["threads"])
pipe = Pipeline.from_bundle(a["bundle"], providers=["cpu"], threads=a["threads"])
times = []
for r in range(2):  # the first pass warms the sessions up and is discarded
    t0 = time.perf_counter()
    pipe(a["labels"], steps=a["steps"], cfg_scale=a["cfg_scale"], seed=a["seed"])
    times.append(time.perf_counter() - t0)
print(json.dumps({"seconds": times[-1]}))
"""


def _time_in_runtime_process(bundle, labels, steps, cfg_scale, threads, seed) -> float:
    """Seconds to sample ``labels`` in a fresh process set up as flexdit-run sets itself up (one
    intra-op pool shared by the stage sessions), not inside this compiler process."""
    import json
    import subprocess
    import sys

    arg = json.dumps({"bundle": str(bundle), "labels": [int(v) for v in labels], "steps": steps,
                      "cfg_scale": cfg_scale, "threads": threads, "seed": seed})
    p = subprocess.run([sys.executable, "-c", _TIMER, arg], capture_output=True, text=True)
    if p.returncode != 0:
        raise UserError(f"timing {bundle} failed: {(p.stderr.strip().splitlines() or ['?'])[-1][:300]}")
    return json.loads(p.stdout.strip().splitlines()[-1])["seconds"]


def compare_latency(bundle_a, bundle_b, *, n_images: int = 8, steps: int = 20, cfg_scale=None, repeats: int = 3,
                    threads=None, seed: int = 0) -> dict:
    """Per-image sampling latency of two bundles (same prompts, steps and noise), each timed in
    its own runtime process, interleaved a, b, a, b, ... so machine load hits both alike;
    medians and the b/a ratio."""
    from flexdit_runtime import load_bundle

    # read for the MACs only: each timing process verifies its bundle's checksums itself
    bundles = [load_bundle(p, verify_checksums=False) for p in (bundle_a, bundle_b)]
    labels = np.arange(n_images) % len(FASHION_CLASSES)
    times = [[], []]
    for _ in range(repeats):
        for i, path in enumerate((bundle_a, bundle_b)):
            times[i].append(_time_in_runtime_process(path, labels, steps, cfg_scale, threads, seed) / n_images)
    med = [float(np.median(t)) for t in times]
    macs = [sum(s.macs for s in b.stages) / len(b.stages) for b in bundles]
    return {"a": str(bundle_a), "b": str(bundle_b), "n_images": n_images, "steps": steps, "repeats": repeats,
            "threads": threads, "seconds_per_image": med, "ratio_b_over_a": med[1] / med[0],
            "mean_stage_macs": macs, "macs_ratio_b_over_a": macs[1] / macs[0] if macs[0] else None}


def render(report: dict) -> str:
    r = report
    lines = [f"{r['bundle']}: {r['n_images']} images ({r['per_class']}/class), {r['sampler']} {r['steps']} steps, "
             f"cfg {r['cfg_scale']}, seed {r['seed']}, schedule {r['schedule']}",
             f"  {'':24}{'class acc':>10}{'FD':>10}"]

    def row(name, d):
        lines.append(f"  {name:24}{d['class_accuracy']:10.3f}{d['fd']:10.3f}")

    row("bundle (ONNX fp32)", r["bundle_result"])
    if "reference" in r:
        row(f"PyTorch ({r['reference']['schedule']})"[:24], r["reference"])
        lines.append(f"  FD bundle / PyTorch = {r['fd_ratio']:.3f}; max |sample diff| = "
                     f"{r['reference']['max_abs_sample_diff']:.2e}")
    row(f"real train ({r['real_baseline']['n']}) vs test"[:24], r["real_baseline"])
    lines.append(f"  ({r['fd_note']}; classifier test accuracy {r['classifier_test_accuracy']:.4f})")
    return "\n".join(lines)
