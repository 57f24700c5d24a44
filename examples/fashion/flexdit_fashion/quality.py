"""End-to-end quality gate at conversion, on the Fashion-MNIST demo model.

``FashionMnistGate`` is the plug-in that ``flexdit-export convert --quality-gate PER_CLASS``
loads (``flexdit_export.quality_gates``); ``compare_policies`` also backs ``flexdit-fashion
compare``. The bundle being written is sampled twice through the torch-free runtime from the same seeded
noise: once with every stage in fp32, once with the bundle's precision policy (what
``flexdit-run`` loads by default). The shipped classifier (``flexdit_fashion.evaluate``) scores
both: class accuracy and the classifier-feature FD against the 10k test images. Bars:

    int8 / fp8 in the policy:  accuracy within 2 points of fp32, FD within 1.15x of fp32
    fp16 / bf16 only:          accuracy within 1 point,          FD within 1.05x

A policy may name its engine: ``openvino/bf16``, ``openvino/int8``, ``auto/fp16`` (see ``split_backend``).
"""

from __future__ import annotations

import numpy as np

from flexdit_export.errors import UserError

BARS = {"int8": {"max_accuracy_drop": 0.02, "max_fd_ratio": 1.15},
        "fp16": {"max_accuracy_drop": 0.01, "max_fd_ratio": 1.05}}


def bar_for(precisions) -> tuple[str, dict] | None:
    ps = set(precisions) - {"fp32"}
    if not ps:
        return None
    key = "fp16" if ps <= {"fp16", "bf16"} else "int8"  # bf16 (OpenVINO) meets the fp16 bar
    return key, BARS[key]


def split_backend(spec):
    """'openvino/bf16' -> ('openvino', 'bf16'): a policy may name the engine kind that runs it
    (``flexdit_runtime.stage_engine.backend_choices()``); plain specs run on ONNX Runtime."""
    from flexdit_runtime.stage_engine import backend_choices

    head, sep, rest = (spec or "").partition("/")
    if sep and head in backend_choices():
        return head, rest or None
    return "onnx", spec


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
    check_gate_model(m.model.num_classes, m.model.config.in_channels, m.model.config.input_size)


def check_policy(bundle, spec) -> None:
    """Refuse, without loading an engine, a policy the bundle cannot run: an unknown precision or
    engine kind, a stage it does not have, a precision no stage artifact holds (BundleError, one
    line). Mirrors what ``StageRunner`` picks; ``auto`` chooses at load time and is only parsed."""
    from flexdit_runtime.engines import choose_artifact, precision_overrides
    from flexdit_runtime.stage_engine import AUTO, engine_kind

    backend, spec = split_backend(spec)
    wants = precision_overrides(bundle, spec, backend)
    if backend == AUTO:
        return
    artifact_backend, engine_cls = engine_kind(backend)
    pick = getattr(engine_cls, "choose_artifact", None)
    for st in bundle.stages:
        want = wants.get(st.id, wants.get("*"))
        pick(bundle, st, want) if pick else choose_artifact(bundle, st, artifact_backend, want)


def compare_policies(bundle, policies: dict, per_class: int, seed: int = 0, steps=None, threads=None,
                     log=print, classifier_dir=None, data_dir=None, sampler=None) -> dict:
    """Sample fp32 once and every policy ({name: precision spec or None for the bundle's
    default}) from the same noise; score and judge each against fp32."""
    from flexdit_runtime import Pipeline
    from flexdit_runtime.sampling_params import resolve_params
    from flexdit_runtime.settings import RuntimeSettings
    from flexdit_bundle.precision import describe

    from .datasets import FASHION_CLASSES
    from .evaluate import _test_reference, check_seed, load_classifier, sample_bundle

    # Everything a caller can get wrong is refused here, before the first image is sampled.
    _check_model(bundle)
    if per_class < 1:
        raise UserError(f"the end-to-end gate needs at least 1 image per class, got {per_class}")
    check_seed(seed)
    RuntimeSettings(providers=["cpu"], threads=threads)  # refuses --threads < 1
    resolve_params(bundle.sampling_defaults, bundle.diffusion.num_timesteps, steps=steps, sampler=sampler)
    for spec in policies.values():
        check_policy(bundle, spec)
    classifier, _ = load_classifier(classifier_dir)
    test_feats = _test_reference(str(classifier_dir) if classifier_dir else None, data_dir)[0]  # cached per process
    labels = np.repeat(np.arange(len(FASHION_CLASSES)), per_class)
    report = {"per_class": per_class, "images": int(len(labels)), "seed": seed, "policies": {}}
    fp32 = None
    for name, spec in (("fp32", "fp32"), *policies.items()):
        backend, spec = split_backend(spec)
        pipe = Pipeline(bundle, providers=["cpu"], threads=threads, precision=spec, backend=backend)
        used = dict(enumerate(pipe.runner.precisions))
        res, settings, _ = sample_bundle(None, labels, steps=steps, sampler=sampler, seed=seed, pipeline=pipe)
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
    policy = {st.id: st.default_precision or "fp32" for st in bundle.stages}
    if bar_for(policy.values()) is None:
        return {"passed": True, "verdict": "skipped: the policy is fp32 everywhere", "policy": "fp32"}
    r = compare_policies(bundle, {"policy": None}, per_class, seed, steps, threads, log)
    p = r["policies"]["policy"]
    return {k: v for k, v in r.items() if k != "policies"} | {
        "policy": describe(policy), "policy_result": {k: p[k] for k in ("class_accuracy", "fd", "seconds")},
        **{k: p[k] for k in ("bar", "max_accuracy_drop", "max_fd_ratio", "accuracy_drop", "fd_ratio", "passed",
                             "verdict")}}


class FashionMnistGate:
    """The conversion's end-to-end gate as a ``flexdit_export.quality_gates.QualityGate``:
    ``per_class`` images of every class, the bundle's default policy against fp32."""

    name = "fashion-mnist"

    def __init__(self, per_class: int, steps=None, threads=None):
        if per_class < 1:
            raise UserError(f"--quality-gate needs at least 1 image per class, got {per_class}")
        self.per_class, self.steps, self.threads = per_class, steps, threads

    def check_model(self, cfg) -> None:
        check_gate_model(cfg.num_classes, cfg.in_channels, cfg.input_size)

    def run(self, bundle, *, seed: int = 0, log=print) -> dict:
        return end_to_end(bundle, self.per_class, seed=seed, steps=self.steps, threads=self.threads, log=log)
