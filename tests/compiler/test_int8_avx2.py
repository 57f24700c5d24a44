"""The int8-dynamic gate on the AVX2 code path (x86 without AVX-512 or VNNI), where ONNX Runtime's
u8 x s8 kernels add pairs of products in int16: the README's int8 conversion of the shipped model,
made here, must meet its gate there as it does on the CPU that converted it. The int8 graphs run
under qemu's Haswell user emulation (`.ci/run` installs qemu-user) on the gate's held-out rows and
are judged by the gate's statistic against the fp32 graph's outputs, computed here (emulating the
fp32 graph too would only add minutes: its output does not depend on the integer kernels)."""

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flexdit_export.calib import CalibSet
from flexdit_export.calib.readers import StageBatches
from conftest import run_cli
from flexdit_bundle.cpu import measured_on
from flexdit_export.export import error_stats
from flexdit_export.quantize import DEFAULT_ERROR_TOL, graph_outputs

ROOT = Path(__file__).resolve().parents[2]

# Run on the emulated CPU (numpy and ONNX Runtime only): argv = rows.npz out.npz, then per stage
# "id:batch:graph"; writes each stage's outputs and prints the CPU's features.
EMULATED = r"""
import json, sys
import numpy as np, onnxruntime as ort
from flexdit_bundle.cpu import measured_on

rows, out = np.load(sys.argv[1]), {}
so = ort.SessionOptions()
so.log_severity_level = 3
for item in sys.argv[3:]:
    sid, batch, graph = item.split(":", 2)
    s, b = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"]), int(batch)
    x, t, y = (rows[f"{k}{sid}"] for k in "xty")
    out[sid] = np.concatenate([s.run(None, {"x": x[i:i + b], "t": t[i:i + b], "y": y[i:i + b]})[0]
                               for i in range(0, len(t), b)])
np.savez(sys.argv[2], **out)
print(json.dumps(measured_on()))
"""


def _qemu() -> str:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the AVX2 code path exists on x86-64 only")
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.fail("qemu-x86_64 is missing: apt-get install qemu-user (see README, set-up)")
    return qemu


def test_int8_gate_holds_on_the_avx2_path(tmp_path):
    qemu = _qemu()
    bundle = tmp_path / "fashion-int8"
    run_cli("flexdit-export", "convert", ROOT / "models" / "fashion-flexdit", "-o", bundle, "--precision", "int8",
            "--calib-steps", "4")  # the README's step 5 as test_walkthrough.py runs it
    m = json.loads((bundle / "manifest.json").read_text())
    native = {str(st["id"]): (a["path"], a["error"]) for st in m["stages"] for a in st["artifacts"]
              if a["precision"] == "int8-dynamic"}
    assert len(native) == 4 and all(e["measured_on"] == measured_on() for _, e in native.values())

    feeds = {sid: list(StageBatches(CalibSet.open(bundle.parent / m["calibration"]["path"]), int(sid),
                                    m["stages"][int(sid)]["batch"], "holdout")) for sid in native}
    np.savez(tmp_path / "rows.npz", **{f"{k}{sid}": np.concatenate([f[k] for f in fs]) for sid, fs in feeds.items()
                                        for k in "xty"})
    graphs = [f"{sid}:{m['stages'][int(sid)]['batch']}:{bundle / path}" for sid, (path, _) in native.items()]
    p = subprocess.run([qemu, "-cpu", "Haswell", os.path.realpath(sys.executable), "-c", EMULATED,
                        tmp_path / "rows.npz", tmp_path / "out.npz", *graphs],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stderr[-3000:]
    features = json.loads(p.stdout.splitlines()[-1])["features"]
    assert "AVX2" in features and not {"AVX512F", "AVX512VNNI", "AVXVNNI"} & set(features)  # really the AVX2 path
    got = np.load(tmp_path / "out.npz")
    fp32 = {st["id"]: a["path"] for st in m["stages"] for a in st["artifacts"] if a["precision"] == "fp32"}
    avx2 = {sid: error_stats(got[sid], graph_outputs(bundle / fp32[int(sid)], feeds[sid]))["rel_rms"] for sid in native}
    for sid, (_, e) in native.items():
        # the gate holds there, and measures what it measured here: the integer sums are exact on both paths
        assert avx2[sid] <= DEFAULT_ERROR_TOL["int8-dynamic"], (avx2, native)
        assert avx2[sid] == pytest.approx(e["rel_rms"], rel=0.02), (avx2, native)
