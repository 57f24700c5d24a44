"""flexdit_export/calib/: per-stage calibration sets captured from real trajectories, hashes, readers."""

import json

import numpy as np
import pytest

from flexdit_export.calib import CalibError, CalibSet
from flexdit_export.calib.capture import CaptureSettings, capture
from flexdit_export.calib.readers import OrtCalibrationReader, StageBatches
from conftest import run_cli
from flexdit_export.reference_sampler import ReferenceDiffusion, reference_sample

STAGES = [{"id": 0, "t_min": 600, "t_max": 999, "sparse_grid": 2},
          {"id": 1, "t_min": 300, "t_max": 599, "sparse_grid": 3},
          {"id": 2, "t_min": 0, "t_max": 299, "sparse_grid": None}]
SETTINGS = CaptureSettings(sampler="ddpm", steps=10, cfg_scale=4.0, images=4, holdout_images=2, max_rows=48,
                           max_holdout_rows=16, batch=2, seed=3)


def _capture(model, path, **changes):
    s = CaptureSettings(**{**SETTINGS.__dict__, **changes})
    return capture(model, STAGES, s, path, sample=reference_sample, num_timesteps=1000, cfg_channels="first3",
                   log=lambda *a: None)


@pytest.fixture(scope="module")
def calib_set(tmp_path_factory, tiny_flex_model):
    return _capture(tiny_flex_model, tmp_path_factory.mktemp("calib") / "set")


def test_each_stage_holds_only_its_own_timesteps(calib_set):
    visited = ReferenceDiffusion(1000, SETTINGS.steps).map  # the original timesteps the sampler calls
    for st in STAGES:
        own = {t for t in visited if st["t_min"] <= t <= st["t_max"]}
        for split in ("calib", "holdout"):
            x, t, y = calib_set.arrays(st["id"], split)
            assert len(t) > 0 and len(t) % SETTINGS.batch == 0
            assert ((t >= st["t_min"]) & (t <= st["t_max"])).all()
            assert set(t.astype(int).tolist()) <= own
            assert x.shape[1:] == (4, 16, 16) and x.dtype == np.float32 and y.dtype == np.int64
            assert set(y.tolist()) <= set(range(11))  # the 10 classes and the null (unconditional) label
        # enough calibration rows were kept to see every timestep of the stage
        assert set(calib_set.arrays(st["id"])[1].astype(int).tolist()) == own
    # every row the sampler fed the stage (calls x images x 2 for cond + uncond), up to max_rows
    assert [calib_set.rows(s["id"]) for s in STAGES] == [min(48, 4 * 4 * 2), 3 * 4 * 2, 3 * 4 * 2]


def test_rows_are_the_sampler_states(calib_set):
    """The rows at t=999 are the seeded initial noise itself (the sampler's first call)."""
    x, t, _ = calib_set.arrays(0)
    first = x[t == 999]
    assert len(first)
    z = [np.random.default_rng([SETTINGS.seed, 1, 1, i]).standard_normal((4, 16, 16), dtype=np.float32)
         for i in range(SETTINGS.images)]
    for row in first:
        assert any(np.array_equal(row, zi) for zi in z)
    # later rows are not noise any more: they were produced by the model + sampler
    late = calib_set.arrays(2)[0]
    assert not any(np.array_equal(late[0], zi) for zi in z)


def test_cap_bounds_the_rows(tmp_path, tiny_flex_model):
    cs = _capture(tiny_flex_model, tmp_path / "small", max_rows=6, max_holdout_rows=2)
    assert [cs.rows(s["id"]) for s in STAGES] == [6, 6, 6]
    assert [cs.rows(s["id"], "holdout") for s in STAGES] == [2, 2, 2]


def test_hash_is_reproducible_and_follows_the_settings(tmp_path, tiny_flex_model, calib_set):
    again = _capture(tiny_flex_model, tmp_path / "again")
    assert again.sha256 == calib_set.sha256
    for change in ({"seed": 4}, {"steps": 9}, {"cfg_scale": 2.0}, {"max_rows": 40}):
        other = _capture(tiny_flex_model, tmp_path / f"other{len(list(tmp_path.iterdir()))}", **change)
        assert other.sha256 != calib_set.sha256, change
    from factories import TINY_FLEX, random_model
    other_model = _capture(random_model(TINY_FLEX, seed=5), tmp_path / "othermodel")
    assert other_model.sha256 != calib_set.sha256
    assert other_model.settings["model_sha256"] != calib_set.settings["model_sha256"]


def test_tampering_and_mismatches_are_refused(tmp_path, calib_set):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(calib_set.root, bad)
    f = bad / "stage1.calib.npz"
    data = bytearray(f.read_bytes())
    data[-20] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CalibError, match="modified"):
        CalibSet.open(bad)
    f.unlink()
    with pytest.raises(CalibError, match="incomplete"):
        CalibSet.open(bad)
    with pytest.raises(CalibError, match="no calibration set"):
        CalibSet.open(tmp_path / "nothing")
    idx = json.loads((calib_set.root / "calib.json").read_text())
    (bad / "calib.json").write_text(json.dumps({**idx, "settings": {**idx["settings"], "steps": 99}}))
    shutil.copy(calib_set.root / "stage1.calib.npz", bad / "stage1.calib.npz")
    with pytest.raises(CalibError, match="content hash"):
        CalibSet.open(bad)
    with pytest.raises(CalibError, match="other model weights"):
        calib_set.check_matches("0" * 64, STAGES, 1000)
    other = [dict(s) for s in STAGES]
    other[0]["sparse_grid"] = 3
    with pytest.raises(CalibError, match="schedule"):
        calib_set.check_matches(calib_set.settings["model_sha256"], other, 1000)


def test_ort_reader_feeds_the_stored_rows_in_strides(calib_set):
    reader = OrtCalibrationReader(calib_set, 1, 2)
    n = len(reader)
    assert n == calib_set.rows(1) // 2
    ort_feeds = []
    for lo in range(0, n, 4):  # the strided calibration of quantize_static
        reader.set_range(lo, lo + 4)
        while (f := reader.get_next()) is not None:
            ort_feeds.append(f)
    assert len(ort_feeds) == n
    x, t, y = calib_set.arrays(1)
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in ort_feeds]), x)
    np.testing.assert_array_equal(np.concatenate([f["y"] for f in ort_feeds]), y)
    assert all(f["t"].dtype == np.float32 and f["y"].dtype == np.int64 and f["x"].shape[0] == 2 for f in ort_feeds)

    assert len(StageBatches(calib_set, 1, 5)) == calib_set.rows(1) // 5


def test_calibrate_cli_inspect_and_reuse_in_convert(tmp_path, ref_ckpt):
    d = tmp_path / "cal"
    p = run_cli("flexdit-export", "calibrate", ref_ckpt, "-o", d, "--num-heads", "4", "--schedule", "0:2",
                "--calib-steps", "6", "--calib-images", "2", "--calib-holdout-images", "2", "--json")
    s = json.loads(p.stdout)
    assert len(s["stages"]) == 1 and s["stages"][0]["calib_rows"] > 0
    text = run_cli("flexdit-export", "inspect", d).stdout
    assert "timesteps seen" in text and s["sha256"] in text
    again = run_cli("flexdit-export", "calibrate", ref_ckpt, "-o", d, "--num-heads", "4", check=False)
    assert again.returncode == 2 and "already exists" in again.stderr
    # a set for another schedule is refused by convert, before anything is written
    out = tmp_path / "b"
    bad = run_cli("flexdit-export", "convert", ref_ckpt, "-o", out, "--num-heads", "4", "--schedule", "0:3",
                  "--precision", "int8-static", "--calib", d, check=False)
    assert bad.returncode == 2 and "captured for schedule 0:2, not 0:3" in bad.stderr
    assert "Traceback" not in bad.stderr and not out.exists()
