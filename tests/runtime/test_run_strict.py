"""Issue 13, the runtime's side: the Python API checks what the CLI checks, non-finite samples
are errors, echoed input is capped, BOM prompt files, the threads cap, fresh output directories
and re-runs without stale images."""

import json
import os

import numpy as np
import pytest

from conftest import run_cli
from flexdit_bundle.manifest import BundleError
from flexdit_runtime import Pipeline, RuntimeSettings
from flexdit_runtime.prompts import PromptError


@pytest.fixture(scope="module")
def pipe(flex_bundle):
    return Pipeline.from_bundle(flex_bundle, providers=["cpu"])


@pytest.mark.parametrize("prompts,kwargs,message", [
    ([-1], {}, r"class id -1 is outside 0\.\.9"),
    ([10], {}, r"class id 10 is outside 0\.\.9"),
    ([360], {}, r"class id 360 is outside 0\.\.9"),
    ([1], {"steps": 0}, r"--steps must be in 1\.\.1000, got 0"),
    ([1], {"batch": 0}, r"--batch must be at least 1, got 0"),
    ([1], {"spacing": "foo"}, r"unknown spacing 'foo'"),
    ([1], {"seed": -1}, r"--seed must be at least 0, got -1"),
    ([1], {"seed": None}, r"--seed must be an integer, got None"),
    ([1], {"steps": 2.5}, r"--steps must be an integer, got 2\.5"),
    ([1], {"sampler": "x" * 10_000}, r"unknown sampler 'x{60}\.\.\.' \(10000 characters\)"),
    ("12", {}, r"prompts must be a list of class names or ids, got str \(for one image: \['12'\]\)"),
    (["9" * 5000], {}, r"class id '9{60}\.\.\.' \(5000 characters\) is outside 0\.\.9"),
])
def test_api_checks_every_argument_up_front(pipe, prompts, kwargs, message):
    import re
    with pytest.raises((BundleError, PromptError)) as e:
        pipe(prompts, **{"steps": 2, **kwargs})
    assert re.search(message, str(e.value)) and len(str(e.value)) < 300, str(e.value)


def test_non_finite_samples_are_an_error_naming_the_cause(pipe):
    def inf_noise(k, idx):
        return np.full((len(idx), 4, 16, 16), np.inf, np.float32)

    with pytest.raises(BundleError, match=r"image\(s\) 0, 1 at step 1 of 3 \(stage \d, t=\d+\): the step's noise "
                                          r"held NaN or infinite values"):
        pipe([1, 2], steps=3, noise_fn=inf_noise, batch=2)
    with pytest.raises(BundleError, match=r"cfg-scale 1e\+38\) overflowed float32"):
        pipe([1], steps=2, cfg_scale=1e38)
    # the step-wise API: the request stops early, finish() says why
    m = pipe.model
    req = m.start([3], m.params(steps=4, cfg_scale=1e38))
    while not req.done:
        m.step([req])
    with pytest.raises(BundleError, match="NaN or infinite"):
        m.finish(req)


def test_ten_megabyte_prompt_line_is_not_echoed(flex_bundle, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("y" * 10_000_000 + "\n")
    p = run_cli("flexdit-run", prompts, "--bundle", flex_bundle, "-o", tmp_path / "o", check=False)
    assert p.returncode == 2 and len(p.stderr) < 400, p.stderr[:400]
    assert "(10000000 characters) is not a class id" in p.stderr


def test_prompt_file_with_a_byte_order_mark(flex_bundle, tmp_path):
    prompts = tmp_path / "bom.txt"
    prompts.write_bytes(b"\xef\xbb\xbf3\r\n4\r\n")
    run_cli("flexdit-run", prompts, "--bundle", flex_bundle, "-o", tmp_path / "o", "--steps", "2", "-q")
    assert sorted(os.listdir(tmp_path / "o")) == ["000_3.png", "001_4.png", "grid.png"]


def test_threads_are_capped_at_the_cores(flex_bundle, tmp_path):
    from flexdit_runtime.settings import usable_cores
    s = RuntimeSettings(threads=1000)
    assert s.threads == usable_cores() and "--threads 1000 capped at the" in s.notes[0]
    assert RuntimeSettings(threads=1).notes == ()
    prompts = tmp_path / "p.txt"
    prompts.write_text("1\n")
    p = run_cli("flexdit-run", prompts, "--bundle", flex_bundle, "-o", tmp_path / "o", "--steps", "2",
                "--threads", "1000")
    assert f"flexdit-run: note: --threads 1000 capped at the {usable_cores()} usable cores" in p.stderr


def test_default_output_is_a_fresh_directory_and_reruns_leave_no_stale_images(flex_bundle, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("1\n2\n3\n")
    outs = []
    for _ in range(2):
        p = run_cli("flexdit-run", prompts, "--bundle", flex_bundle, "--steps", "2", "--json", cwd=tmp_path)
        outs.append(json.loads(p.stdout)["out"])
    assert outs[0] != outs[1] and all(o.startswith("flexdit-images/run-") for o in outs)
    assert [e["kind"] for e in json.loads(p.stdout)["engines"]] == ["onnx"] * 3
    out = tmp_path / "mine"
    run_cli("flexdit-run", prompts, "--bundle", flex_bundle, "-o", out, "--steps", "2", "-q")
    prompts.write_text("4\n")
    again = run_cli("flexdit-run", prompts, "--bundle", flex_bundle, "-o", out, "--steps", "2", check=False)
    assert again.returncode == 2 and "is not empty (use --force" in again.stderr
    p = run_cli("flexdit-run", prompts, "--bundle", flex_bundle, "-o", out, "--steps", "2", "--force")
    assert sorted(os.listdir(out)) == ["000_4.png", "grid.png"]  # the three earlier images are gone
    assert "engine per stage: 0: onnx fp32, 1: onnx fp32, 2: onnx fp32" in p.stdout
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []


def test_version_names_the_engines():
    p = run_cli("flexdit-run", "--version")
    assert p.stdout.startswith("flexdit-run ") and "onnxruntime" in p.stdout and "engines: onnx" in p.stdout


def test_progress_is_log_friendly_when_stderr_is_not_a_terminal(capsys):
    from flexdit_runtime.cli import Progress
    bar = Progress(10, "sampling", every=0.0)
    assert not bar.tty  # pytest captures stderr
    for _ in range(10):
        bar(1)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err and "sampling: 1/10 steps (10%)" in err and "s left" in err
    assert err.splitlines()[-1].startswith("sampling: 10 steps in ")
