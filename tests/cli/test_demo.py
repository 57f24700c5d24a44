"""The README's main command, short: convert the shipped checkpoint and draw the shipped prompts; a
re-run reuses the bundle while nothing it was made from changed."""

import os
import subprocess
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def test_demo_script_writes_a_grid(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "imgs"), "BUNDLE": str(tmp_path / "bundle"), "STEPS": "4"}
    p = subprocess.run(["bash", str(ROOT / "examples" / "fashion" / "demo.sh")], capture_output=True, text=True,
                       env=env, timeout=900)
    assert p.returncode == 0, p.stderr
    assert f"images: {tmp_path / 'imgs'}/" in p.stdout
    pngs = sorted((tmp_path / "imgs").glob("*.png"))
    prompts = [ln for ln in (ROOT / "examples/fashion/prompts.txt").read_text().splitlines()
               if ln.split("#")[0].strip()]
    assert len(pngs) == len(prompts) + 1  # one per prompt + grid.png
    assert Image.open(tmp_path / "imgs" / "000_T-shirt_top.png").size == (32, 32)
    assert Image.open(tmp_path / "imgs" / "grid.png").size[0] > 32
    # a second run reuses the bundle (same checkpoint and options) and replaces the images
    (tmp_path / "imgs" / "000_T-shirt_top.png").unlink()
    again = subprocess.run(["bash", str(ROOT / "examples" / "fashion" / "demo.sh")], capture_output=True, text=True,
                           env=env, timeout=900)
    assert again.returncode == 0, again.stderr
    assert f"bundle: reusing {tmp_path / 'bundle'}" in again.stdout and "model:" not in again.stderr
    assert len(list((tmp_path / "imgs").glob("*.png"))) == len(prompts) + 1
    # a changed key (another checkpoint, options or compiler) converts again
    (tmp_path / "bundle.key").write_text("stale\n")
    third = subprocess.run(["bash", str(ROOT / "examples" / "fashion" / "demo.sh")], capture_output=True, text=True,
                           env=env, timeout=900)
    assert third.returncode == 0 and "bundle: reusing" not in third.stdout and "model:" in third.stderr
