"""ctest fixture: a random tiny FlexDiT checkpoint (tests/factories.py TINY_FLEX, the bad-input
catalogue's fixture) converted by the real compiler CLI into an fp32 bundle and an int8 bundle
(int8-dynamic stage graphs, default precision int8). Usage: make_bundles.py REPO OUTDIR

The bundles are reused while they are current: OUTDIR/sources.sha256 records the compiler and
bundle-format sources, the checkpoint factory, this script and the versions of the packages that
write the graphs; when any of it changed (e.g. the compiler learned to write shared graphs) the
checkpoint and bundles are made again, so the tests never run on bundles of an older compiler."""

import hashlib
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

repo, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
sys.path.insert(0, str(repo / "tests"))
from factories import TINY_FLEX, random_model, save_reference_training  # noqa: E402


def sources_digest() -> str:
    h = hashlib.sha256()
    files = [Path(__file__).resolve(), repo / "tests" / "factories.py"]
    for pkg in ("flexdit_export", "flexdit_bundle"):
        files += sorted(p for p in (repo / pkg).rglob("*") if p.suffix in (".py", ".json") and "conformance" not in p.parts)
    for f in files:
        h.update(str(f.relative_to(repo) if f.is_relative_to(repo) else f.name).encode() + b"\0" + f.read_bytes() + b"\0")
    for dist in ("torch", "onnx", "onnxruntime", "onnxscript", "numpy"):
        try:
            h.update(f"{dist}={metadata.version(dist)}\0".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist}=none\0".encode())
    return h.hexdigest()


out.mkdir(parents=True, exist_ok=True)
stamp, digest = out / "sources.sha256", sources_digest()
if not stamp.exists() or stamp.read_text().strip() != digest:
    for old in ("flex_ref.pt", "fp32", "int8", "int8.calib"):
        p = out / old
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    stamp.unlink(missing_ok=True)
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
    if target.exists():  # an interrupted conversion
        shutil.rmtree(target)
    t0 = time.time()
    cmd = [sys.executable, "-m", "flexdit_export.cli", "convert", str(ckpt), "-o", str(target),
           "--schedule", "600:2,300:3,0:dense", "--num-heads", "4", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=repo)
    if p.returncode != 0:
        sys.exit(f"make_bundles: {' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    print(f"{name} bundle in {time.time() - t0:.1f}s -> {target}")
stamp.write_text(digest + "\n")
