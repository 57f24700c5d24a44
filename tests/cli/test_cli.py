"""End-to-end runs of the real CLIs, and every bad input a user can cause."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli


def _no_traceback(p):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    # progress lines may come first; the failure itself is one line, and the last
    assert len(errors) == 1 and lines[-1] == errors[0], p.stderr
    return errors[0]


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or p.name.startswith(".flexdit-run-")]


def test_inspect_reports_stages(flex_bundle):
    s = json.loads(run_cli("flexdit-export", "inspect", flex_bundle, "--json").stdout)
    assert [(st["t_min"], st["t_max"], st["sparse_grid"], st["tokens"]) for st in s["stages"]] == \
        [(600, 999, 2, 4), (300, 599, 3, 9), (0, 299, None, 64)]
    for st in s["stages"]:
        assert {(a["backend"], a["precision"]) for a in st["artifacts"]} == {("onnx", "fp32"), ("torchscript", "fp32")}
        assert st["parity"]["onnx/fp32"]["max_rel"] < 1e-4
        assert st["parity"]["torchscript/fp32"]["max_rel"] < 1e-4
    assert s["stages"][0]["gmacs_per_sample"] < s["stages"][2]["gmacs_per_sample"]
    text = run_cli("flexdit-export", "inspect", flex_bundle).stdout
    assert "s=2" in text and "dense" in text and "parity" in text
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if "parity (max rel)" in line)
    header, *rows = lines[at:at + 4]  # the parity column starts at one offset in every row
    col = header.index("parity")
    assert all(row[col - 2:col] == "  " and row[col:].startswith("onnx/fp32 ") for row in rows), text
    assert "(* = the precision a stage loads by default)" in text  # the '*' is always explained


def test_verify_with_checkpoint(flex_bundle, ref_ckpt):
    r = json.loads(run_cli("flexdit-export", "verify", flex_bundle, "--ckpt", ref_ckpt, "--json").stdout)
    assert r["ok"] and len(r["stages"]) == 3
    assert all(s["max_rel"] < 1e-4 for s in r["stages"])
    assert r["trajectory"]["psnr_db"] > 60 and r["trajectory"]["final_max_rel"] < 1e-4


def test_verify_detects_a_different_checkpoint(flex_bundle, tmp_path):
    from factories import TINY_FLEX, random_model, save_reference_training
    other = save_reference_training(random_model(TINY_FLEX, seed=99), tmp_path / "other.pt")
    p = run_cli("flexdit-export", "verify", flex_bundle, "--ckpt", other, check=False)
    assert p.returncode == 1 and "FAIL" in p.stderr + p.stdout


def test_run_writes_pngs_and_grid_deterministically(flex_bundle, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# ids: the tiny model has no class names\n3\n\n0  # zero\n9\n")
    p = run_cli("flexdit-run", prompts, "--bundle", flex_bundle, "-o", tmp_path / "a", "--steps", "6", "--seed", "1",
                "--save-npy")
    assert "wrote 3 images" in p.stdout and "per image" in p.stdout and "stage 0" in p.stdout
    names = sorted(f.name for f in (tmp_path / "a").iterdir())
    assert names == ["000_3.png", "001_0.png", "002_9.png", "grid.png", "samples.npy"]
    assert Image.open(tmp_path / "a" / "000_3.png").size == (16, 16)
    run_cli("flexdit-run", prompts, "--bundle", flex_bundle, "-o", tmp_path / "b", "--steps", "6", "--seed", "1",
            "--save-npy", "--batch", "3", "--sampler", "ddim")
    run_cli("flexdit-run", prompts, "--bundle", flex_bundle, "-o", tmp_path / "c", "--steps", "6", "--seed", "1",
            "--save-npy", "--batch", "3")
    a, c = np.load(tmp_path / "a" / "samples.npy"), np.load(tmp_path / "c" / "samples.npy")
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)  # --batch does not change images
    assert not np.allclose(a, np.load(tmp_path / "b" / "samples.npy"))  # another sampler does


def test_grid_is_upscaled_for_small_images(flex_bundle, tmp_path):
    """grid.png of 16x16 images was drawn at 38x38: by default each pixel is now an 8x8 block
    (images of at least 128 pixels), the same bytes as --grid-scale 1 repeated; --grid-scale sets it."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("1\n2\n3\n")
    common = [prompts, "--bundle", flex_bundle, "--steps", "2", "-q", "--seed", "3"]
    run_cli("flexdit-run", *common, "-o", tmp_path / "auto")
    run_cli("flexdit-run", *common, "-o", tmp_path / "one", "--grid-scale", "1")
    run_cli("flexdit-run", *common, "-o", tmp_path / "three", "--grid-scale", "3")
    auto, one, three = (np.asarray(Image.open(tmp_path / d / "grid.png")) for d in ("auto", "one", "three"))
    assert one.shape[:2] == (38, 38) and auto.shape[:2] == (304, 304) and three.shape[:2] == (114, 114)
    assert np.array_equal(auto, one.repeat(8, 0).repeat(8, 1)) and np.array_equal(three, one.repeat(3, 0).repeat(3, 1))
    first = np.asarray(Image.open(tmp_path / "one" / "000_1.png"))
    assert np.array_equal(one[2:18, 2:18], first)
    bad = run_cli("flexdit-run", *common, "-o", tmp_path / "bad", "--grid-scale", "17", check=False)
    assert bad.returncode == 2 and bad.stderr == "flexdit-run: error: --grid-scale must be in 1..16, got 17\n"
    assert not (tmp_path / "bad").exists()


def test_run_with_init_noise(flex_bundle, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("1\n2\n")
    z = np.random.default_rng(0).standard_normal((4, 16, 16)).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    for out in ("x", "y"):
        run_cli("flexdit-run", prompts, "--bundle", flex_bundle, "-o", tmp_path / out, "--steps", "4", "--seed",
                "5" if out == "x" else "6", "--init-noise", tmp_path / "z.npy", "--sampler", "ddim", "--save-npy", "-q")
    np.testing.assert_array_equal(np.load(tmp_path / "x" / "samples.npy"), np.load(tmp_path / "y" / "samples.npy"))


def test_dit_checkpoint_converts_to_a_dense_bundle(dit_ckpt, tmp_path):
    out = tmp_path / "dit"
    run_cli("flexdit-export", "convert", dit_ckpt, "-o", out, "--num-heads", "4", "--batch", "4", "--opset", "20")
    s = json.loads(run_cli("flexdit-export", "inspect", out, "--json").stdout)
    assert s["model"]["family"] == "dit" and len(s["stages"]) == 1 and s["stages"][0]["sparse_grid"] is None
    assert s["stages"][0]["batch"] == 4
    r = json.loads(run_cli("flexdit-export", "verify", out, "--ckpt", dit_ckpt, "--json").stdout)
    assert r["ok"]


def test_installed_console_scripts_exist():
    assert shutil.which("flexdit-export") and shutil.which("flexdit-run")


# ---- bad input: one line on stderr, non-zero exit, nothing left behind -------------------------

@pytest.mark.parametrize("args,match", [
    (["/nonexistent.pt"], "not found"),
    (["{garbage}"], "cannot read checkpoint"),
    (["{wrong_arch}"], "not a DiT/FlexDiT"),
    (["{ref}", "--schedule", "500:2"], "uncovered"),
    (["{ref}", "--schedule", "0:9"], "outside 1..8"),
    (["{ref}", "--opset", "17"], "opset 17"),
    (["{ref}", "--opset", "99"], "opset 99"),
    (["{ref}", "--batch", "0"], "--batch"),
    (["{ref}", "--formats", "onnx,tflite"], "tflite"),
    (["{ref}", "--class-names", "{names3}"], "3 names"),
    (["{ref}", "--vae", "/nonexistent-vae"], "config.json"),
    (["{dit}", "--schedule", "paper4"], "plain DiT"),
    (["{ref}", "--init-from-dit", "256"], "already a FlexDiT"),
])
def test_convert_bad_input(tmp_path, ref_ckpt, dit_ckpt, args, match):
    import torch
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 not a checkpoint")
    wrong = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, wrong)
    names3 = tmp_path / "names.txt"
    names3.write_text("a\nb\nc\n")
    subs = {"{garbage}": garbage, "{wrong_arch}": wrong, "{ref}": ref_ckpt, "{dit}": dit_ckpt, "{names3}": names3}
    args = [str(subs.get(a, a)) for a in args]
    out = tmp_path / "out" / "bundle"
    p = run_cli("flexdit-export", "convert", *args, "-o", out, "--num-heads", "4", check=False)
    line = _no_traceback(p)
    assert match in line, line
    assert not out.exists()
    assert not (tmp_path / "out").exists() or _leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("edit,match", [
    (lambda m: [], "is not a checkpoint config (expected a JSON object, got list)"),
    (lambda m: {**m, "model": "big"}, "'model' must be an object"),
    (lambda m: {**m, "model": {**m["model"], "depth": "ten"}}, "its model config is invalid: layout has"),
    (lambda m: {**m, "sampling": {"steps": -4}}, "steps: -4 is less than the minimum of 1"),
    (lambda m: {**m, "sampling": {"cfg_scale": float("nan")}}, "cfg_scale must be a finite number"),
])
def test_checkpoint_config_of_the_wrong_shape_is_one_line(tiny_flex_model, tmp_path, edit, match):
    """A project checkpoint whose config.json is valid JSON of the wrong shape: one line before
    any export (it used to be a traceback, or an 'internal error' after the whole export)."""
    from flexdit_export.checkpoints import save_checkpoint

    ck = save_checkpoint(tiny_flex_model, tmp_path / "ck", extra={"schedule": "500:2,0:3"})
    cfg = ck / "config.json" if ck.is_dir() else ck.with_name("config.json")
    cfg.write_text(json.dumps(edit(json.loads(cfg.read_text()))))
    out = tmp_path / "out"
    p = run_cli("flexdit-export", "convert", ck, "-o", out, check=False)
    line = _no_traceback(p)
    assert match in line and "internal error" not in line, line
    assert not out.exists() and _leftovers(tmp_path) == []


def test_quantisation_that_changes_no_node_is_refused(ref_ckpt, tmp_path):
    """A known operator type the graph does not contain: no 'int8' bundle with nothing quantised."""
    out = tmp_path / "out"
    p = run_cli("flexdit-export", "convert", ref_ckpt, "-o", out, "--num-heads", "4", "--precision", "int8",
                "--quant-ops", "LSTM", check=False)
    assert "changed no node: --quant-ops LSTM" in _no_traceback(p)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_convert_refuses_to_overwrite_without_force(flex_bundle, ref_ckpt):
    before = (flex_bundle / "manifest.json").read_text()
    p = run_cli("flexdit-export", "convert", ref_ckpt, "-o", flex_bundle, check=False)
    assert "already exists" in _no_traceback(p)
    assert (flex_bundle / "manifest.json").read_text() == before


@pytest.fixture
def bundle_copy(flex_bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(flex_bundle, dst)
    return dst


def _tamper_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,match", [
    (lambda b: _tamper_byte(b / "stages" / "stage1_s3.onnx"), "checksum mismatch"),
    (lambda b: (b / "stages" / "stage2_dense.onnx").write_bytes((b / "stages" / "stage2_dense.onnx").read_bytes()[:1000]),
     "checksum mismatch"),
    (lambda b: (b / "stages" / "stage0_s2.onnx").unlink(), "missing"),
    (lambda b: (b / "manifest.json").write_text("{not json"), "cannot read"),
    (lambda b: (b / "manifest.json").unlink(), "not a bundle"),
    (lambda b: (b / "manifest.json").write_text(
        (b / "manifest.json").read_text().replace('"t_min": 300', '"t_min": 310')), "exactly once"),
    (lambda b: ((b / "stages" / "stage0_s2.onnx").unlink(), (b / "stages" / "stage0_s2.onnx").symlink_to("stage0_s2.onnx")),
     "symlink loop"),
])
def test_damaged_bundles_are_refused(bundle_copy, tmp_path, damage, match):
    damage(bundle_copy)
    prompts = tmp_path / "p.txt"
    prompts.write_text("1\n")
    for cli, args in (("flexdit-run", [prompts, "--bundle", bundle_copy, "-o", tmp_path / "o", "--steps", "2"]),
                      ("flexdit-export", ["inspect", bundle_copy]), ("flexdit-export", ["verify", bundle_copy])):
        p = run_cli(cli, *args, check=False)
        assert match in _no_traceback(p)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("prompt_text,extra,match", [
    ("sneakers\n", [], "no class names"),
    ("12\n", [], "outside 0..9"),
    ("# nothing\n\n", [], "no prompts"),
    ("1\n", ["--init-noise", "{badnoise}"], "expected"),
    ("1\n", ["--init-noise", "{missing}"], "cannot read --init-noise"),
    ("1\n", ["--batch", "0"], "--batch"),
    ("1\n", ["--steps", "0"], "--steps"),
    ("1\n", ["--steps", "5000"], "--steps"),
    ("1\n", ["--providers", "nosuch"], "not available"),
    ("1\n", ["--precision", "int8"], "no onnx/int8"),
    ("1\n", ["--bundle", "/nonexistent"], "not found"),
])
def test_run_bad_input(flex_bundle, tmp_path, prompt_text, extra, match):
    prompts = tmp_path / "p.txt"
    prompts.write_text(prompt_text)
    np.save(tmp_path / "bad.npy", np.zeros((3, 3), np.float32))
    subs = {"{badnoise}": tmp_path / "bad.npy", "{missing}": tmp_path / "missing.npy"}
    extra = [str(subs.get(a, a)) for a in extra]
    out = tmp_path / "o"
    p = run_cli("flexdit-run", prompts, "--bundle", flex_bundle, "-o", out, "--steps", "3", *extra, check=False)
    assert match in _no_traceback(p)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_run_usage_errors_are_one_line(flex_bundle, tmp_path):
    """argparse's own refusals follow the same one-line form (no usage block)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("1\n")
    for bad in (["--seed", "abc"], ["--sampler", "nope"], ["--no-such-flag"]):
        p = run_cli("flexdit-run", prompts, "--bundle", flex_bundle, "-o", tmp_path / "o", *bad, check=False)
        assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, p.stderr
        assert p.stderr.startswith("flexdit-run: error: ") and "(see --help)" in p.stderr
    assert not (tmp_path / "o").exists()


def test_unknown_class_name_suggests_close_matches(tmp_path, tiny_flex_model):
    from flexdit_export.checkpoints import save_checkpoint
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    ck = save_checkpoint(tiny_flex_model, tmp_path / "named", class_names=names)
    out = tmp_path / "nb"
    run_cli("flexdit-export", "convert", ck, "-o", out, "--num-heads", "4", "--schedule", "dense")
    prompts = tmp_path / "p.txt"
    prompts.write_text("sneaker\nANKLE BOOT\nsnekaer\n")
    p = run_cli("flexdit-run", prompts, "--bundle", out, "-o", tmp_path / "o", "--steps", "2", check=False)
    line = _no_traceback(p)
    assert "unknown class 'snekaer'" in line and "'sneaker'" in line and "p.txt" in line
    prompts.write_text("sneaker\nANKLE BOOT\n1\n")
    run_cli("flexdit-run", prompts, "--bundle", out, "-o", tmp_path / "o", "--steps", "2")
    assert sorted(f.name for f in (tmp_path / "o").iterdir()) == \
        ["000_Sneaker.png", "001_Ankle_boot.png", "002_Trouser.png", "grid.png"]
