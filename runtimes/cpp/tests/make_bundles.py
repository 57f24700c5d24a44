"""ctest fixture: a random tiny FlexDiT checkpoint (tests/factories.py TINY_FLEX, the bad-input
catalogue's fixture) converted by the real compiler CLI into an fp32 bundle and an int8 bundle
(int8-dynamic stage graphs, default precision int8). Usage: make_bundles.py REPO OUTDIR"""

import os
import subprocess
import sys
import time
from pathlib import Path

repo, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
sys.path.insert(0, str(repo / "tests"))
from factories import TINY_FLEX, random_model, save_reference_training  # noqa: E402

out.mkdir(parents=True, exist_ok=True)
ckpt = out / "flex_ref.pt"
if not ckpt.exists():
    save_reference_training(random_model(TINY_FLEX, seed=1), ckpt)
# int8-dynamic graphs + the fp32 ones; a small calibration capture keeps the conversion short
INT8 = ["--precision", "int8", "--calib-images", "4", "--calib-holdout-images", "2", "--calib-steps", "20",
        "--calib-max-rows", "32", "--calib-holdout-rows", "8"]
env = {**os.environ, "PYTHONWARNINGS": "ignore"}
for name, extra in (("fp32", []), ("int8", INT8)):
    target = out / name
    if (target / "manifest.json").exists():
        continue
    t0 = time.time()
    cmd = [sys.executable, "-m", "flexdit_export.cli", "convert", str(ckpt), "-o", str(target),
           "--schedule", "600:2,300:3,0:dense", "--num-heads", "4", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=repo)
    if p.returncode != 0:
        sys.exit(f"make_bundles: {' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    print(f"{name} bundle in {time.time() - t0:.1f}s -> {target}")
