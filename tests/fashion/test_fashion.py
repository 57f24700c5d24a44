"""The shipped Fashion-MNIST FlexDiT, its training script, the dataset reader and the
quality evaluator (FD, class accuracy)."""

import gzip
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from flexdit_export.checkpoints import load_checkpoint
from flexdit_export.errors import UserError
from flexdit_export.schedule import parse_schedule
from flexdit_fashion.datasets import FASHION_CLASSES, load_split, read_idx
from flexdit_fashion.evaluate import (CLASSIFIER_METRICS, class_accuracy, features, find_classifier_dir,
                                      frechet_distance, load_classifier)

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "fashion-flexdit"
needs_data = pytest.mark.usefixtures("fashion_data")  # fails, with the install command, where it is missing


def _idx_bytes(arr: np.ndarray) -> bytes:
    dims = b"".join(struct.pack(">I", d) for d in arr.shape)
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + dims + arr.tobytes()


# ---------------------------------------------------------------- dataset reader
def test_idx_reader_roundtrip_and_rejects_truncated(tmp_path):
    arr = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    good = tmp_path / "ok-idx3-ubyte.gz"
    good.write_bytes(gzip.compress(_idx_bytes(arr)))
    np.testing.assert_array_equal(read_idx(good), arr)

    short = tmp_path / "short-idx3-ubyte.gz"  # valid gzip, data cut short
    short.write_bytes(gzip.compress(_idx_bytes(arr)[:-100]))
    with pytest.raises(UserError, match="truncated"):
        read_idx(short)
    cut = tmp_path / "cut-idx3-ubyte.gz"  # the gzip stream itself cut short
    cut.write_bytes(gzip.compress(_idx_bytes(arr))[:-20])
    with pytest.raises(UserError):
        read_idx(cut)
    junk = tmp_path / "junk-idx3-ubyte"
    junk.write_bytes(b"not an idx file at all")
    with pytest.raises(UserError, match="magic"):
        read_idx(junk)
    with pytest.raises(UserError, match="not found"):
        load_split("test", tmp_path / "nowhere")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(short.read_bytes())
    with pytest.raises(UserError) as e:
        load_split("test", tmp_path)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- metrics
def test_frechet_distance_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((400, 32)) @ rng.standard_normal((32, 32))
    assert abs(frechet_distance(f, f)) < 1e-6
    assert frechet_distance(f, f + 0.5) == pytest.approx(32 * 0.25, rel=1e-6)  # mean shift only
    assert frechet_distance(f, rng.standard_normal((400, 32))) > 1.0


@needs_data
def test_classifier_reproduces_its_recorded_test_accuracy():
    meta = json.loads((find_classifier_dir() / CLASSIFIER_METRICS).read_text())
    model, _ = load_classifier()
    images, labels = load_split("test")
    acc = class_accuracy(images, labels, model)  # all 10k test images, uint8 28x28 path
    assert acc >= 0.90
    # Same weights, same images: equal up to a handful of ties flipped by another BLAS.
    assert acc == pytest.approx(meta["test_accuracy"], abs=5e-4)
    assert features(images[:7], model).shape == (7, 128)


# ---------------------------------------------------------------- shipped checkpoint
def test_shipped_checkpoint_layout():
    ck = load_checkpoint(MODEL_DIR)
    c = ck.config
    assert c.family == "flexdit" and c.learn_sigma and c.in_channels == 1 and c.input_size == 32
    assert c.num_poolingformer >= 1 and c.num_dumbbell >= 2 and c.num_normal_block >= 1
    assert c.grid >= 8 and c.num_classes == 10 and ck.class_names == FASHION_CLASSES
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 25e6
    meta = json.loads((MODEL_DIR / "config.json").read_text())
    assert set(meta["sampling"]) == {"sampler", "steps", "cfg_scale"}
    assert meta["sampling"]["sampler"] in ("ddpm", "ddim")
    stages = parse_schedule(meta["schedule"], T=1000, grid=c.grid, family="flexdit")
    assert len(stages) >= 3 and len({st.tokens(c.grid) for st in stages}) == len(stages)
    assert [st.sparse_grid for st in stages] == sorted(st.sparse_grid for st in stages)  # noisiest: fewest
    assert meta["training"]["steps"] > 0 and (MODEL_DIR / "TRAINING.md").exists()
    with torch.no_grad():
        out = ck.build()(torch.zeros(2, 1, 32, 32), torch.tensor([999.0, 0.0]), torch.tensor([0, 10]),
                         stages[0].sparse_grid)
    assert out.shape == (2, 2, 32, 32) and torch.isfinite(out).all()


def test_prompts_file_resolves():
    from flexdit_runtime.prompts import ClassIndex, read_prompts

    prompts = read_prompts(ROOT / "examples" / "fashion" / "prompts.txt")
    index = ClassIndex(FASHION_CLASSES, 10)
    assert len(prompts) >= 8 and len({index.resolve(p) for p in prompts}) >= 4


# ---------------------------------------------------------------- training script
def _train_module():
    spec = importlib.util.spec_from_file_location("train_flexdit", ROOT / "examples" / "fashion" / "train_flexdit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_data
def test_training_runs_end_to_end_and_resumes_exactly(tmp_path):
    train = _train_module()
    tiny = ["--steps", "4", "--batch", "4", "--hidden", "32", "--heads", "2", "--layout", "1/2x1,0,1,0/1",
            "--log-every", "1", "--save-every", "100", "--threads", "1", "--no-progress", "--warmup", "2"]
    # One uninterrupted run ...
    assert train.main(tiny + ["--out", str(tmp_path / "a"), "--work-dir", str(tmp_path / "wa")]) == 0
    # ... and one interrupted after 2 steps, then resumed from its training state.
    assert train.main(tiny + ["--out", str(tmp_path / "b"), "--work-dir", str(tmp_path / "wb"), "--stop-at", "2"]) == 0
    state = torch.load(tmp_path / "wb" / "train_state.pt", weights_only=True)
    assert state["step"] == 2
    assert train.main(["--resume", str(tmp_path / "wb" / "train_state.pt"), "--steps", "4",
                       "--out", str(tmp_path / "b"),
                       "--work-dir", str(tmp_path / "wb"), "--threads", "1", "--no-progress", "--log-every", "1"]) == 0
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert a.config == b.config and a.config.num_dumbbell == 2
    for k in a.state_dict:
        torch.testing.assert_close(a.state_dict[k], b.state_dict[k], rtol=0, atol=0, msg=k)
    meta = json.loads((tmp_path / "b" / "config.json").read_text())
    assert meta["training"]["steps"] == 4 and len(meta["training"]["commands"]) == 2
    assert meta["class_names"] == FASHION_CLASSES and meta["schedule"] == "750:4,500:5,250:6,0:7"
    log = [json.loads(line) for line in (tmp_path / "wb" / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in log)


def test_latency_comparison_of_flexdit_and_dense_bundles(tmp_path):
    """The dense-vs-FlexDiT latency report (each bundle sampled in its own runtime process)."""
    from flexdit_export.convert import ConvertOptions, convert
    from flexdit_fashion.evaluate import compare_latency

    schedule = json.loads((MODEL_DIR / "config.json").read_text())["schedule"]
    convert(MODEL_DIR, tmp_path / "flex", ConvertOptions(schedule=schedule), log=lambda m: None)
    convert(MODEL_DIR, tmp_path / "dense", ConvertOptions(schedule="dense"), log=lambda m: None)
    r = compare_latency(tmp_path / "flex", tmp_path / "dense", n_images=2, steps=4, repeats=1, threads=1)
    assert all(s > 0 for s in r["seconds_per_image"]) and r["ratio_b_over_a"] > 0
    assert r["macs_ratio_b_over_a"] == pytest.approx(1.265, abs=0.01)  # 64 dense tokens vs 16..49


# ---------------------------------------------------------------- end-to-end gate bars
def test_end_to_end_bars():
    from flexdit_fashion.quality import judge

    fp32 = {"class_accuracy": 0.80, "fd": 10.0}
    ok = judge(fp32, {"class_accuracy": 0.785, "fd": 11.4}, ["int8-dynamic", "fp16"])
    assert ok["passed"] and ok["bar"] == "int8"
    assert not judge(fp32, {"class_accuracy": 0.775, "fd": 10.0}, ["int8-static"])["passed"]  # 2.5 points
    assert not judge(fp32, {"class_accuracy": 0.80, "fd": 11.6}, ["fp8"])["passed"]  # 1.16x
    assert judge(fp32, {"class_accuracy": 0.791, "fd": 10.4}, ["fp16", "fp32"])["passed"]
    r = judge(fp32, {"class_accuracy": 0.789, "fd": 10.0}, ["fp16"])
    assert not r["passed"] and r["bar"] == "fp16" and "FAILED" in r["verdict"]
    assert not judge(fp32, {"class_accuracy": 0.80, "fd": 10.6}, ["fp16"])["passed"]


@needs_data
def test_eval_says_the_sample_size_and_a_time_estimate_first(tmp_path):
    """A 1000-image eval runs for minutes on a CPU: it must say so before, not after."""
    import subprocess
    import sys

    from conftest import run_cli

    bundle = tmp_path / "fm"
    run_cli("flexdit-export", "convert", ROOT / "models" / "fashion-flexdit", "-o", bundle)
    p = subprocess.run([sys.executable, "-m", "flexdit_fashion", "eval", str(bundle), "--per-class", "1", "--steps", "2",
                        "--json"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert lines[0] == "sampling 10 images (1 per class), 2 ddpm steps ..."
    assert lines[1].startswith("first step took ") and "for the 10 images" in lines[1]
    assert json.loads(p.stdout)["n_images"] == 10
