"""The runtime installs and draws on its own: the README's runtime-only block, run as written in a
fresh virtual environment (no system site packages), gives a ``flexdit-run`` that samples a bundle
the compiler wrote, with neither torch nor onnx importable there. The block is read from the
README, so the documented install cannot drift from the one tested."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
MARK = "<!-- runtime-only-install -->"
# what the block installs from, copied so the build's egg-info and build/ land in the scratch tree
SOURCES = ("flexdit_bundle", "runtimes/python")


def install_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(re.escape(MARK) + r"\n```bash\n(.*?)```", text, re.S)
    assert len(blocks) == 1, f"the README needs exactly one bash block right after {MARK}"
    return blocks[0]


def venv_env(venv: Path) -> dict:
    """The environment of a shell with ``venv`` activated: its bin first, nothing of this one's
    Python set-up leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "CONDA"))}
    env.update(PATH=f"{venv / 'bin'}:{env.get('PATH', '')}", VIRTUAL_ENV=str(venv), PYTHONWARNINGS="ignore",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def test_readme_block_installs_a_runtime_without_torch_or_onnx(tmp_path, flex_bundle):
    block = install_block()
    assert "./runtimes/python" in block and "pip install" in block
    repo = tmp_path / "repo"
    for rel in SOURCES:
        shutil.copytree(ROOT / rel, repo / rel, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    env = venv_env(venv)

    p = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=repo, env=env, capture_output=True,
                       encoding="utf-8", errors="replace", timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert re.match(r"flexdit-run 0\.1\.0; onnxruntime ", p.stdout.splitlines()[-1]), p.stdout[-500:]

    python = venv / "bin" / "python"
    for module in ("torch", "onnx", "flexdit_export"):
        q = subprocess.run([python, "-c", f"import {module}"], cwd=tmp_path, env=env, capture_output=True, encoding="utf-8", errors="replace",
                           timeout=120)
        assert q.returncode != 0 and "ModuleNotFoundError" in q.stderr, (module, q.stderr[-500:])
    # the runtime came from the venv, not from the development tree
    q = subprocess.run([python, "-c", "import flexdit_runtime, flexdit_bundle; print(flexdit_runtime.__file__); "
                        "print(flexdit_bundle.__file__)"], cwd=tmp_path, env=env, capture_output=True, encoding="utf-8", errors="replace",
                       timeout=120)
    assert q.returncode == 0 and all(line.startswith(str(venv)) for line in q.stdout.split()), q.stdout + q.stderr

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("0\n3\n")
    out = tmp_path / "images"
    r = subprocess.run([venv / "bin" / "flexdit-run", prompts, "--bundle", flex_bundle, "-o", out, "--steps", "3",
                        "--seed", "1"], cwd=tmp_path, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    pngs = sorted(n for n in os.listdir(out) if n != "grid.png")
    assert len(pngs) == 2, os.listdir(out)
    img = Image.open(out / pngs[0])
    assert img.size[0] > 0 and len(set(img.getdata())) > 1  # drawn, not a blank canvas
