"""The end-to-end quality gate of convert, wired through the real evaluator (shipped classifier,
Fashion-MNIST test set) on a tiny random model of the demo's shape (1x32x32, 10 classes)."""

import json

import pytest

from conftest import run_cli
from factories import random_model
from flexdit_export.checkpoints import save_checkpoint
from flexdit_fashion.datasets import FASHION_CLASSES

TINY_FASHION = dict(family="flexdit", hidden_size=32, num_heads=2, patch_size=4, input_size=32, in_channels=1,
                    num_classes=10, depth=1 + 2 * 4 + 1, num_poolingformer=1, num_dumbbell=2,
                    dumbbell_group=[1, 1, 1, 1], num_normal_block=1, semantic_size=4)

pytestmark = pytest.mark.usefixtures("fashion_data")  # fails, with the install command, where it is missing


def test_quality_gate_records_both_runs(tmp_path, capsys):
    """In-process (the CLI's main), so the classifier features of the test set are computed once."""
    from flexdit_export.cli import main
    ck = save_checkpoint(random_model(TINY_FASHION, seed=3, scale=0.05), tmp_path / "ck", FASHION_CLASSES,
                         {"sampling": {"sampler": "ddim", "steps": 4, "cfg_scale": 2.0}, "schedule": "0:4"})
    out = tmp_path / "b"
    rc = main(["convert", str(ck), "-o", str(out), "--precision", "int8", "--extra-precisions", "fp16",
               "--quality-gate", "2", "--calib-images", "4", "--calib-holdout-images", "2", "--batch", "4"])
    err = capsys.readouterr().err
    assert rc == 0 and "end-to-end: policy (int8-dynamic:stages=0)" in err
    q = json.loads((out / "manifest.json").read_text())["quality"]
    assert q["images"] == 20 and q["steps"] == 4 and q["sampler"] == "ddim"
    assert q["policy"] == "int8-dynamic:stages=0" and q["bar"] == "int8" and q["fp32"]["policy"] == "fp32:stages=0"
    for r in (q["fp32"], q["policy_result"]):
        assert 0 <= r["class_accuracy"] <= 1 and r["fd"] > 0
    assert q["fd_ratio"] == pytest.approx(q["policy_result"]["fd"] / q["fp32"]["fd"])
    assert q["passed"] == (q["accuracy_drop"] <= 0.02 and q["fd_ratio"] <= 1.15)
    # the gate's fp32 run is the evaluator's run of the same bundle in fp32: same noise, same scores
    from flexdit_fashion.quality import compare_policies
    from flexdit_runtime import load_bundle
    r = compare_policies(load_bundle(out), {"half": "fp16"}, per_class=2, log=lambda *a: None)
    assert r["fp32"]["fd"] == pytest.approx(q["fp32"]["fd"]) and r["fp32"]["class_accuracy"] == q["fp32"]["class_accuracy"]
    assert r["policies"]["half"]["policy"] == "fp16:stages=0" and r["policies"]["half"]["bar"] == "fp16"
    text = run_cli("flexdit-export", "inspect", out).stdout
    assert "end-to-end gate:" in text


def test_quality_gate_needs_the_fashion_model_shape(ref_ckpt, tmp_path):
    p = run_cli("flexdit-export", "convert", ref_ckpt, "-o", tmp_path / "b", "--num-heads", "4", "--schedule", "0:2",
                "--precision", "fp16", "--quality-gate", "1", "--calib-steps", "4", "--calib-images", "2",
                "--calib-holdout-images", "2", check=False)
    assert p.returncode == 2 and "needs a 10-class 1x32x32 pixel-space model" in p.stderr
    assert list(tmp_path.iterdir()) == []  # refused before any export or calibration
