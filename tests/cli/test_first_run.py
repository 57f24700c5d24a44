"""Issue 13, first run: doctor, --json and -q alike on every command, calibration found again by
content, and a gate-only capture when no graph needs static scales."""

import json

from conftest import run_cli

FAST = ["--num-heads", "4", "--schedule", "0:2"]
SMALL = ["--calib-steps", "4", "--calib-images", "2", "--calib-holdout-images", "2"]
LOOSE = ["--error-tol", "int8-static=1"]  # random weights: the gate itself is tested elsewhere


def test_doctor_says_what_is_installed_and_usable():
    r = json.loads(run_cli("flexdit-export", "doctor", "--json").stdout)
    assert r["packages"]["onnxruntime"] and r["packages"]["torch"] and r["compiler_ready"]
    assert "CPUExecutionProvider" in r["onnxruntime_providers"]
    assert r["engines"]["onnx"] == "usable"
    text = run_cli("flexdit-export", "doctor").stdout
    assert "stage engines (flexdit-run --backend): onnx: usable" in text and "compiler (flexdit-export convert): ready" in text
    assert r["server_ready"] and "server (flexdit-serve): ready" in text  # .[dev] includes .[serve]
    if not r["packages"]["tensorrt"]:
        assert "pip install '.[tensorrt]'" in text
    assert run_cli("flexdit-export", "--version").stdout.startswith("flexdit-export ")


def test_json_and_quiet_behave_alike_on_every_command(flex_bundle, ref_ckpt, tmp_path):
    for cmd in (["inspect", flex_bundle], ["verify", flex_bundle], ["doctor"]):
        q = run_cli("flexdit-export", *cmd, "-q")
        assert q.stdout == "" and q.stderr == "", cmd
        json.loads(run_cli("flexdit-export", *cmd, "--json").stdout)
    p = run_cli("flexdit-export", "convert", ref_ckpt, "-o", tmp_path / "b", *FAST, "-q")
    assert p.stdout == "" and p.stderr == ""
    p = run_cli("flexdit-export", "convert", ref_ckpt, "-o", tmp_path / "c", *FAST, "--json")
    assert json.loads(p.stdout)["stages"][0]["sparse_grid"] == 2 and "schedule:" in p.stderr


def test_a_matching_calibration_set_is_found_by_content(ref_ckpt, tmp_path):
    cal = tmp_path / "fm.calib"
    run_cli("flexdit-export", "calibrate", ref_ckpt, "-o", cal, *FAST, *SMALL, "-q")
    p = run_cli("flexdit-export", "convert", ref_ckpt, "-o", tmp_path / "fm-int8", *FAST, *SMALL,
                "--precision", "int8-static", *LOOSE)
    assert f"calibration: reusing {cal} (content " in p.stderr and "capturing" not in p.stderr
    assert not (tmp_path / "fm-int8.calib").exists()
    # other capture settings: static scales need exactly these, so it captures anew
    p = run_cli("flexdit-export", "convert", ref_ckpt, "-o", tmp_path / "other", *FAST, *SMALL,
                "--calib-seed", "3", "--precision", "int8-static", *LOOSE)
    assert "calibration: capturing" in p.stderr and (tmp_path / "other.calib").is_dir()


def test_dynamic_int8_gates_on_a_small_capture(ref_ckpt, tmp_path):
    from flexdit_export.options import ConvertOptions
    from flexdit_export.plan import resolve_plan

    dyn = resolve_plan(ref_ckpt, tmp_path / "d", ConvertOptions(schedule="0:2", num_heads=4, precision="int8"))
    assert (dyn.calibration.settings.images, dyn.calibration.settings.holdout_images) == (2, 8)
    static = resolve_plan(ref_ckpt, tmp_path / "s", ConvertOptions(schedule="0:2", num_heads=4,
                                                                    precision="int8-static"))
    assert (static.calibration.settings.images, static.calibration.settings.holdout_images) == (32, 16)
    mine = resolve_plan(ref_ckpt, tmp_path / "m", ConvertOptions(schedule="0:2", num_heads=4, precision="fp16",
                                                                  calib_settings={"images": 5}))
    assert mine.calibration.settings.images == 5  # what the user asks for wins
