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


def check_gate_model(num_classes: int, in_channels: int, input_size: int) -> None:
    from .datasets import FASHION_CLASSES

    if (num_classes, in_channels, input_size) != (len(FASHION_CLASSES), 1, 32):
        raise UserError("the end-to-end gate judges samples with the Fashion-MNIST classifier: it needs a 10-class "
                        "1x32x32 pixel-space model like models/fashion-flexdit")


def _check_model(bundle) -> None:
    m = bundle.manifest
    cfg = m["model"]["config"]
    check_gate_model(m["model"]["num_classes"], cfg["in_channels"], cfg["input_size"])


def compare_policies(bundle, policies: dict, per_class: int, seed: int = 0, steps=None, threads=None,
                     log=print) -> dict:
    """Sample fp32 once and every policy ({name: precision spec or None for the bundle's
    default}) from the same noise; score and judge each against fp32."""
    from flexdit_runtime import Pipeline
    from flexdit_bundle.precision import describe

    from .datasets import FASHION_CLASSES
    from .evaluate import _test_reference, load_classifier, sample_bundle

    _check_model(bundle)
    if per_class < 1:
        raise UserError(f"the end-to-end gate needs at least 1 image per class, got {per_class}")
    classifier, _ = load_classifier()
    test_feats = _test_reference(None, None)[0]  # cached per process
    labels = np.repeat(np.arange(len(FASHION_CLASSES)), per_class)
    report = {"per_class": per_class, "images": int(len(labels)), "seed": seed, "policies": {}}
    fp32 = None
    for name, spec in (("fp32", "fp32"), *policies.items()):
        pipe = Pipeline(bundle, providers=["cpu"], threads=threads, precision=spec)
        used = dict(enumerate(pipe.runner.precisions))
        res, settings, _ = sample_bundle(None, labels, steps=steps, seed=seed, pipeline=pipe)
        scores = {**_scores(res.images, labels, classifier, test_feats), "seconds": res.seconds,
                  "policy": describe(used)}
        log(f"end-to-end: {name} ({scores['policy']}): class accuracy {scores['class_accuracy']:.3f}, "
            f"FD {scores['fd']:.3f} ({len(labels)} images, {settings['sampler']} {settings['steps']} steps, "
            f"{res.seconds:.0f} s)")
        report.update(settings)
        if fp32 is None:
            fp32 = report["fp32"] = scores
            continue
        verdict = judge(fp32, scores, used.values()) if bar_for(used.values()) else {"passed": True,
                                                                                     "verdict": "fp32 everywhere"}
        report["policies"][name] = {**scores, **verdict}
        log(f"end-to-end: {name}: {verdict['verdict']}")
    return report


def end_to_end(bundle, per_class: int, seed: int = 0, steps=None, threads=None, log=print) -> dict:
    """The conversion's gate: the bundle's default policy against fp32. ``bundle``: a
    ``flexdit_runtime.Bundle`` (the one being written). -> report with ``passed`` and ``verdict``."""
    from flexdit_bundle.precision import describe

    _check_model(bundle)
    policy = {st["id"]: st.get("default_precision", "fp32") for st in bundle.stages}
    if bar_for(policy.values()) is None:
        return {"passed": True, "verdict": "skipped: the policy is fp32 everywhere", "policy": "fp32"}
    r = compare_policies(bundle, {"policy": None}, per_class, seed, steps, threads, log)
    p = r["policies"]["policy"]
    return {k: v for k, v in r.items() if k != "policies"} | {
        "policy": describe(policy), "policy_result": {k: p[k] for k in ("class_accuracy", "fd", "seconds")},
        **{k: p[k] for k in ("bar", "max_accuracy_drop", "max_fd_ratio", "accuracy_drop", "fd_ratio", "passed",
                             "verdict")}}


def main(argv=None) -> int:
    """python -m flexdit_export.quality BUNDLE --policies fp16 int8 'int8:stages=0-2,fp16:stages=3'"""
    import argparse
    import json
    import sys

    from flexdit_runtime import load_bundle
    from flexdit_bundle.manifest import BundleError

    ap = argparse.ArgumentParser(prog="python -m flexdit_export.quality", description=__doc__.splitlines()[0])
    ap.add_argument("bundle", help="a bundle holding the precisions the policies name (convert --extra-precisions)")
    ap.add_argument("--policies", nargs="+", required=True, help="precision specs, e.g. fp16 int8 'int8:stages=0-2,fp16:stages=3'")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", help="write the report here")
    a = ap.parse_args(argv)
    try:
        r = compare_policies(load_bundle(a.bundle), {p: p for p in a.policies}, a.per_class, a.seed, a.steps, a.threads,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
    except (UserError, BundleError) as e:
        print(f"quality: error: {e}", file=sys.stderr)
        return 2
    print("| policy | class accuracy | FD | accuracy drop (points) | FD ratio | bar | verdict |")
    print("|---|---|---|---|---|---|---|")
    print(f"| fp32 | {r['fp32']['class_accuracy']:.3f} | {r['fp32']['fd']:.2f} | | | | |")
    for name, p in r["policies"].items():
        print(f"| {name} | {p['class_accuracy']:.3f} | {p['fd']:.2f} | {p.get('accuracy_drop', 0) * 100:+.1f} | "
              f"{p.get('fd_ratio', 1):.3f} | {p.get('bar', '')} | {'pass' if p['passed'] else 'FAIL'} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
