"""The README's walk-through, run as written (shorter step counts): what a new user pastes must
work on the shipped model, from convert to the Python API."""

import os
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def walkthrough_blocks() -> dict:
    """{'bash': text, 'python': text}: the fenced blocks after ``<!-- walkthrough:KIND -->``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = dict(re.findall(r"<!-- walkthrough:(\w+) -->\n```\w+\n(.*?)```", text, re.S))
    assert set(blocks) == {"bash", "python"}, sorted(blocks)
    return blocks


def shorten(script: str) -> str:
    """Fewer sampling steps and a smaller calibration capture; nothing else changes."""
    script = re.sub(r"--steps \d+", "--steps 2", script)
    script = re.sub(r"steps=\d+", "steps=2", script)
    return re.sub(r"(convert .*--precision \S+)", r"\1 --calib-steps 4", script)


def test_readme_walkthrough_runs(tmp_path):
    blocks = walkthrough_blocks()
    assert "flexdit-export convert models/fashion-flexdit" in blocks["bash"] and "--precision" in blocks["bash"]
    for word in ("Model", "RuntimeSettings", "start(", "step(", "finish("):
        assert word in blocks["python"]
    (tmp_path / "models").symlink_to(ROOT / "models")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    bin_dir = Path(sys.executable).parent  # the CLIs of this environment
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '')}"
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", shorten(blocks["bash"])], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "verify: ok" in p.stdout
    names = sorted(os.listdir(tmp_path / "images" / "fashion"))
    assert names == ["000_Sneaker.png", "001_T-shirt_top.png", "002_Ankle_boot.png", "grid.png"]
    assert Image.open(tmp_path / "images" / "fashion" / "000_Sneaker.png").size == (32, 32)
    assert len(os.listdir(tmp_path / "images" / "fashion-int8")) == 4
    assert "int8" in p.stdout  # inspect shows the policy
    q = subprocess.run([sys.executable, "-c", shorten(blocks["python"])], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert q.returncode == 0, q.stderr[-3000:]
    assert q.stdout.splitlines() == ["['Sneaker', 'Ankle boot', 'Bag'] (3, 32, 32, 1)", "['Trouser', 'Dress'] uint8"]
