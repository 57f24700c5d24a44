"""End-to-end quality gate at conversion, on the Fashion-MNIST demo model.

The bundle being written is sampled twice through the torch-free runtime from the same seeded
noise: once with every stage in fp32, once with the bundle's precision policy (what
``flexdit-run`` loads by default). The shipped classifier (``flexdit_export.evaluate``) scores
both: class accuracy and the classifier-feature FD against the 10k test images. Bars (issue 4):

    int8 / fp8 in the policy:  accuracy within 2 points of fp32, FD within 1.15x of fp32
    fp16 only:                 accuracy within 1 point,          FD within 1.05x
"""

from __future__ import annotations

import numpy as np

from .errors import UserError

BARS = {"int8": {"max_accuracy_drop": 0.02, "max_fd_ratio": 1.15},
        "fp16": {"max_accuracy_drop": 0.01, "max_fd_ratio": 1.05}}


def bar_for(precisions) -> tuple[str, dict] | None:
    ps = set(precisions) - {"fp32"}
    if not ps:
        return None
    key = "fp16" if ps == {"fp16"} else "int8"
    return key, BARS[key]


def judge(fp32: dict, policy: dict, precisions) -> dict:
    """Compare the two score dicts ({class_accuracy, fd}) against the bar of the policy."""
    key, bar = bar_for(precisions)
    drop = fp32["class_accuracy"] - policy["class_accuracy"]
    ratio = policy["fd"] / max(fp32["fd"], 1e-12)
    ok_acc, ok_fd = drop <= bar["max_accuracy_drop"] + 1e-12, ratio <= bar["max_fd_ratio"] + 1e-12
    verdict = (f"{'passed' if ok_acc and ok_fd else 'FAILED'} ({key} bar): class accuracy {policy['class_accuracy']:.3f} "
               f"vs fp32 {fp32['class_accuracy']:.3f} (drop {drop * 100:+.1f} points, max {bar['max_accuracy_drop'] * 100:.0f}); "
               f"FD {policy['fd']:.3f} vs fp32 {fp32['fd']:.3f} (ratio {ratio:.3f}, max {bar['max_fd_ratio']})")
    return {"bar": key, **bar, "accuracy_drop": drop, "fd_ratio": ratio, "passed": bool(ok_acc and ok_fd),
            "verdict": verdict}


def _scores(images, labels, classifier, test_feats) -> dict:
    from .evaluate import class_accuracy, features, frechet_distance

    return {"class_accuracy": class_accuracy(images, labels, classifier),
            "fd": frechet_distance(features(images, classifier), test_feats)}


def end_to_end(bundle, per_class: int, seed: int = 0, steps=None, threads=None, log=print) -> dict:
    """``bundle``: a ``flexdit_runtime.Bundle`` (the one being written). -> report with ``passed``."""
    from flexdit_runtime import Pipeline

    from .datasets import FASHION_CLASSES, load_model_split
    from .evaluate import features, load_classifier, sample_bundle

    m = bundle.manifest
    cfg = m["model"]["config"]
    if (m["model"]["num_classes"], cfg["in_channels"], cfg["input_size"]) != (len(FASHION_CLASSES), 1, 32):
        raise UserError("--quality-gate judges samples with the Fashion-MNIST classifier: it needs a 10-class "
                        "1x32x32 pixel-space model like models/fashion-flexdit")
    if per_class < 1:
        raise UserError(f"--quality-gate must be at least 1 image per class, got {per_class}")
    policy = {st["id"]: st.get("default_precision", "fp32") for st in m["stages"]}
    if bar_for(policy.values()) is None:
        return {"passed": True, "verdict": "skipped: the policy is fp32 everywhere", "policy": "fp32"}
    classifier, _ = load_classifier()
    x_test, _ = load_model_split("test")
    test_feats = features(x_test, classifier)
    labels = np.repeat(np.arange(len(FASHION_CLASSES)), per_class)
    out = {}
    for name, precision in (("fp32", {"*": "fp32"}), ("policy", None)):
        pipe = Pipeline(bundle, providers=["cpu"], threads=threads, precision=precision)
        res, settings, _ = sample_bundle(None, labels, steps=steps, seed=seed, pipeline=pipe)
        out[name] = {**_scores(res.images, labels, classifier, test_feats), "seconds": res.seconds}
        log(f"end-to-end gate: {name}: class accuracy {out[name]['class_accuracy']:.3f}, FD {out[name]['fd']:.3f} "
            f"({len(labels)} images, {settings['sampler']} {settings['steps']} steps, {res.seconds:.0f} s)")
    from flexdit_runtime.precision import describe

    report = {"per_class": per_class, "images": int(len(labels)), "seed": seed, **settings,
              "policy": describe(policy), "fp32": out["fp32"], "policy_result": out["policy"],
              **judge(out["fp32"], out["policy"], policy.values())}
    log(f"end-to-end gate: {report['verdict']}")
    return report
