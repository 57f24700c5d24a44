import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from factories import TINY_DIT, TINY_FLEX, random_model, save_reference_training, save_state_dict  # noqa: E402

CLIS = {"flexdit-export": "flexdit_export.cli", "flexdit-run": "flexdit_runtime.cli", "flexdit-serve": "flexdit_serve.cli"}


def run_cli(name, *args, cwd=None, check=True):
    """Run a real CLI in a subprocess; returns CompletedProcess with text output."""
    cmd = [sys.executable, "-m", CLIS[name], *map(str, args)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{name} {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr}")
    return p


@pytest.fixture(scope="session")
def tiny_flex_model():
    return random_model(TINY_FLEX, seed=1)


@pytest.fixture(scope="session")
def ref_ckpt(tmp_path_factory, tiny_flex_model):
    return save_reference_training(tiny_flex_model, tmp_path_factory.mktemp("ck") / "flex_ref.pt")


@pytest.fixture(scope="session")
def dit_ckpt(tmp_path_factory):
    return save_state_dict(random_model(TINY_DIT, seed=2), tmp_path_factory.mktemp("ck") / "DiT-tiny.pt")


@pytest.fixture(scope="session")
def flex_bundle(tmp_path_factory, ref_ckpt):
    """A 3-stage bundle (sparse, sparse, dense) with ONNX + TorchScript, built by the real CLI."""
    out = tmp_path_factory.mktemp("bundles") / "flex"
    run_cli("flexdit-export", "convert", ref_ckpt, "-o", out, "--schedule", "600:2,300:3,0:dense",
            "--formats", "onnx,torchscript", "--num-heads", "4")
    return out


@pytest.fixture(scope="session")
def serve_bundle(tmp_path_factory, ref_ckpt):
    """3 stages (sparse, sparse, dense), static batch 8: room to pack several requests' images
    into one engine call (the serving tests)."""
    out = tmp_path_factory.mktemp("serve") / "b8"
    run_cli("flexdit-export", "convert", ref_ckpt, "-o", out, "--schedule", "600:2,300:3,0:dense", "--num-heads", "4",
            "--batch", "8")
    return out


@pytest.fixture(scope="session")
def fashion_data():
    """The Fashion-MNIST test set and the shipped classifier, which `.ci/run` installs: a test that
    needs them fails with the install command when they are missing (never a silent skip)."""
    from flexdit_fashion.datasets import default_dir
    from flexdit_fashion.evaluate import find_classifier_dir

    missing = [str(p) for p in (default_dir() / "t10k-images-idx3-ubyte.gz",
                                find_classifier_dir() / "classifier.safetensors") if not p.exists()]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: apt-get install dataset-fashion-mnist (see README, set-up)")
