"""Issue 13, the compiler's file safety: exclusive and atomic publication, clean-up on SIGTERM and
SIGINT, stale temporaries of dead processes, directory modes from the umask, and the recorded
checkpoint configuration winning over flags (also in verify). Issue 19: what flexdit-run's -o
and --force may replace (the catalogue's output cases), mount points and full disks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CLIS, run_cli
from output_cases import OUTPUT_CASES, can_mount, check_case, check_full_disk, check_mount_point, in_tmpfs
from flexdit_bundle.files import StagingDirectory, remove_stale, umask_mode

FAST = ["--schedule", "0:2", "--num-heads", "4"]


def _popen(*args, env=None):
    cmd = [sys.executable, "-m", CLIS["flexdit-export"], *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _leftovers(parent: Path) -> list:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_staging_publish_is_exclusive_and_replace_is_atomic(tmp_path):
    target = tmp_path / "b"
    s = StagingDirectory(target)
    assert s.path.name.startswith(f".b.tmp-{os.getpid()}-")
    assert s.path.stat().st_mode & 0o777 == umask_mode()
    (s.path / "new").write_text("new")
    target.mkdir()  # another writer published first
    (target / "theirs").write_text("theirs")
    with pytest.raises(FileExistsError):
        s.publish(replace=False)
    assert sorted(os.listdir(target)) == ["theirs"]
    s.publish(replace=True)
    assert sorted(os.listdir(target)) == ["new"] and _leftovers(tmp_path) == []


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    for name in (f".b.tmp-{dead}-x1", f".b.tmp-{alive}-x2", ".b.tmp-nopid", f".b.old-{dead}"):
        (tmp_path / name).mkdir()
    removed = remove_stale(tmp_path, ".b.tmp-") + remove_stale(tmp_path, ".b.old-")
    assert sorted(p.name for p in removed) == sorted([f".b.tmp-{dead}-x1", f".b.old-{dead}"])
    assert sorted(os.listdir(tmp_path)) == sorted([".b.tmp-nopid", f".b.tmp-{alive}-x2"])


def test_two_converts_to_one_out_one_wins_and_force_replaces(ref_ckpt, tmp_path):
    out = tmp_path / "bundle"
    procs = [_popen("convert", ref_ckpt, "-o", out, *FAST, "--seed", str(i)) for i in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    err = next(e for c, e in results if c == 2).strip().splitlines()  # progress lines, then one error
    assert [ln for ln in err if "error:" in ln] == err[-1:] and "Traceback" not in "".join(err), err
    assert "already exists" in err[-1] or "was created by another process" in err[-1], err
    first = json.loads((out / "manifest.json").read_text())
    assert out.stat().st_mode & 0o777 == umask_mode()  # not mkdtemp's 0700
    run_cli("flexdit-export", "convert", ref_ckpt, "-o", out, *FAST, "--seed", "7", "--force")
    assert json.loads((out / "manifest.json").read_text()) != first
    assert _leftovers(tmp_path) == []
    run_cli("flexdit-export", "verify", out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_convert_leaves_nothing(ref_ckpt, tmp_path, sig):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    dead = _dead_pid()
    (tmpdir / f"flexdit-export-{dead}-old").mkdir()  # a killed run's scratch: removed by the next run
    (tmp_path / f".bundle.tmp-{dead}-old").mkdir()
    out = tmp_path / "bundle"
    p = _popen("convert", ref_ckpt, "-o", out, "--schedule", "600:2,300:3,0:dense", "--num-heads", "4",
               "--formats", "onnx,torchscript", env={"TMPDIR": str(tmpdir)})
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob(f".bundle.tmp-{p.pid}-*")):
        time.sleep(0.05)
    assert p.poll() is None, p.stderr.read()
    time.sleep(0.5)
    p.send_signal(sig)
    code = p.wait(timeout=300)
    err = p.stderr.read()
    assert code == 128 + sig, err
    assert err.strip().splitlines()[-1] == "flexdit-export convert: error: interrupted; nothing was written", err
    assert not out.exists()
    assert _leftovers(tmp_path) == [] and os.listdir(tmpdir) == [], (os.listdir(tmp_path), os.listdir(tmpdir))


def test_bundle_and_calibration_dirs_take_the_umask(ref_ckpt, tmp_path):
    from flexdit_export.calib.store import write_set
    import numpy as np

    stages = [{"id": 0, "t_min": 0, "t_max": 999, "sparse_grid": 2}]
    x = np.zeros((2, 4, 16, 16), np.float32)
    arrays = {(0, s): (x, np.zeros(2, np.float32), np.zeros(2, np.int64)) for s in ("calib", "holdout")}
    old = os.umask(0o022)
    try:
        write_set(tmp_path / "c", {"k": 1}, stages, arrays)
    finally:
        os.umask(old)
    assert (tmp_path / "c").stat().st_mode & 0o777 == 0o755


# ---- the checkpoint's own record wins --------------------------------------------------------

@pytest.fixture(scope="module")
def project_bundle(tmp_path_factory, tiny_flex_model):
    from flexdit_export.checkpoints import save_checkpoint
    root = tmp_path_factory.mktemp("proj")
    ck = save_checkpoint(tiny_flex_model, root / "ck", extra={"schedule": "500:2,0:3"})
    out = root / "bundle"
    p = run_cli("flexdit-export", "convert", ck, "-o", out, "--schedule", "500:2,0:1")
    return ck, out, p.stderr


def test_schedule_outside_the_trained_grids_warns(project_bundle):
    _, out, stderr = project_bundle
    assert "sparse grid(s) s=1, but the checkpoint was trained with s=2,3 (500:2,0:3)" in stderr


def test_paper4_on_the_fashion_model_warns():
    from flexdit_export.checkpoints import load_checkpoint
    from flexdit_export.plan import resolve_schedule, schedule_warnings

    ck = load_checkpoint(Path(__file__).resolve().parents[2] / "models" / "fashion-flexdit")
    stages = resolve_schedule(ck, "paper4", 1000)
    assert [s.sparse_grid for s in stages] == [3, 4, 5, 5]
    (w,) = schedule_warnings(ck, stages, 1000)
    assert "s=3" in w and "s=4,5,6,7" in w
    assert schedule_warnings(ck, resolve_schedule(ck, None, 1000), 1000) == []


def test_verify_compares_against_the_checkpoint_as_recorded(project_bundle, tmp_path):
    import shutil
    ck, out, _ = project_bundle
    assert json.loads(run_cli("flexdit-export", "verify", out, "--ckpt", ck, "--json").stdout)["ok"]
    bad = tmp_path / "bundle"
    shutil.copytree(out, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["model"]["config"]["num_heads"] = 8  # a bundle that claims another function
    (bad / "manifest.json").write_text(json.dumps(m))
    p = run_cli("flexdit-export", "verify", bad, "--ckpt", ck, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].endswith(
        "does not match the bundle's model configuration: num_heads 8 in the bundle, 4 in the checkpoint"), p.stderr


# ---- issue 19: output directories of flexdit-run (the C++ CLI: runtimes/cpp/tests/output_dir_cli.py) ----

RUN = [sys.executable, "-m", CLIS["flexdit-run"]]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
needs_mount = pytest.mark.skipif(not can_mount(), reason="needs root and unshare -m to mount a tmpfs")


@pytest.mark.parametrize("case", OUTPUT_CASES, ids=[c["id"] for c in OUTPUT_CASES])
def test_output_case_stops_with_one_line_and_changes_nothing(case, flex_bundle, tmp_path):
    problems, _ = check_case(case, RUN, flex_bundle, tmp_path, "flexdit-run", env=ENV)
    assert problems == []


@needs_mount
def test_run_into_a_mount_point_writes_into_it(flex_bundle, tmp_path):
    """(Was "Device or resource busy" after sampling.)"""
    assert check_mount_point(RUN, flex_bundle, tmp_path, env=ENV) == []


@needs_mount
def test_read_only_mount_point_is_refused_before_work(flex_bundle, tmp_path):
    vol = tmp_path / "vol"
    vol.mkdir()
    (tmp_path / "p.txt").write_text("1\n")
    (result,), listing = in_tmpfs(vol, [[*RUN, tmp_path / "p.txt", "--bundle", flex_bundle, "-o", vol]],
                                  options="ro,size=1m", env=ENV)
    assert result == (2, f"flexdit-run: error: cannot write the output directory {vol}: cannot create anything in "
                         f"{vol} (Read-only file system)\n"), result  # no progress: refused before sampling
    assert listing == {}


@needs_mount
def test_full_disk_leaves_nothing_not_even_the_parents_it_made(flex_bundle, tmp_path):
    problems, _ = check_full_disk(RUN, flex_bundle, tmp_path, "flexdit-run", env=ENV)
    assert problems == []


@needs_mount
def test_convert_force_into_a_mount_point(ref_ckpt, tmp_path):
    vol = tmp_path / "vol"
    vol.mkdir()
    export = [sys.executable, "-m", CLIS["flexdit-export"]]
    results, listing = in_tmpfs(vol, [[*export, "convert", ref_ckpt, "-o", vol, *FAST, "--force", "-q"],
                                      [*export, "verify", vol]], options="size=64m", env=ENV)
    assert [r[0] for r in results] == [0, 0], results  # was "device or resource busy" after the conversion
    assert "manifest.json" in listing and not [p for p in listing if ".tmp-" in p], listing
