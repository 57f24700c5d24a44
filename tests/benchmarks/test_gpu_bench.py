"""benchmarks/gpu_bench.py, the prepared GPU benchmark of issue 9 (benchmarks/GPU_CHECK.md), run
the quick way on the CPU: tiny model, no compiles (--skip-compile: AOTI packages and
torch.compile are listed as skipped), the runtime's device loop on eager stage modules. What
this proves: the script runs end to end here, within its budget, and writes a JSON and a
Markdown table that hold every row it timed. The GPU run itself has not happened."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_bench_tiny_cpu_run(tmp_path):
    out = tmp_path / "bench"
    t0 = time.time()
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--device", "cpu", "--tiny",
                        "--skip-compile", "--rounds", "1", "--budget-s", "50", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    wall = time.time() - t0
    assert p.returncode == 0, p.stderr[-2000:]
    assert wall < 60, f"the suite's gpu_bench run took {wall:.0f} s"
    r = json.loads((out / "gpu_bench.json").read_text())
    assert r["environment"]["device"] == "cpu" and r["bf16_matmul_tflops"] > 0 and r["steps"] == 50
    assert r["compiles"] and all(v == {"status": "skipped", "reason": "--skip-compile"} for v in r["compiles"].values())
    assert any("--skip-compile" in s for s in r["skipped"])
    c = r["configs"]["tiny-256"]
    stages = sorted({int(k.split("=")[1].split()[0]) for k in c["ms_per_call"] if k.startswith("FlexDiT s=")})
    assert len(stages) >= 1 and set(c["stage_of_step"]) <= set(stages) and len(c["stage_of_step"]) == 50
    want_calls = {f"DiT eager {p}" for p in ("fp32", "bf16")} | {f"FlexDiT s={s} eager {p}" for s in stages
                                                                for p in ("fp32", "bf16")}
    assert set(c["ms_per_call"]) == want_calls
    want_images = {f"{m} eager {p}" for m in ("DiT", "FlexDiT paper4", "FlexDiT released") for p in ("fp32", "bf16")}
    want_images.add("FlexDiT paper4 eager fp32 trajectory (runtime device loop)")
    assert set(c["ms_per_image"]) == want_images
    for v in [*c["ms_per_call"].values(), *c["ms_per_image"].values(), *c["mfu_vs_measured_bf16_matmul"].values()]:
        assert math.isfinite(v) and v > 0
    t = c["trajectory"]
    assert t["finite"] and t["images"] == 1 and t["engines"] == "eager fp32" and 0 <= t["outside_engines_fraction"] < 1
    assert t["ms_per_image"] == c["ms_per_image"]["FlexDiT paper4 eager fp32 trajectory (runtime device loop)"]

    md = (out / "gpu_bench.md").read_text()
    assert md.startswith("# gpu_bench: CPU") and "## tiny-256 (batch 2)" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| ")]
    # every timed candidate and per-image figure is a row of its table, with the header's cell count
    for name in want_calls | want_images:
        assert any(ln.startswith(f"| {name} |") for ln in rows), name
    assert all(ln.count("|") in (4, 5) for ln in rows)
    assert sum(ln.startswith("| ") and ln.count("|") == 4 for ln in rows) == len(want_calls) + 1  # + header
    assert sum(ln.startswith("| ") and ln.count("|") == 5 for ln in rows) == len(want_images) + 1
    assert "skipped (--skip-compile)" in md and "Runtime device loop (eager fp32)" in md
