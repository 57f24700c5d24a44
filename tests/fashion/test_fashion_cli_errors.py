"""flexdit-fashion's user errors: one line on stderr (``flexdit-fashion CMD: error: ...``), exit 2,
no traceback, refused before any image is sampled and without leaving a half-written file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("fashion_data")  # fails, with the install command, where it is missing


def fashion(*args, cwd=None):
    """The real flexdit-fashion CLI in a subprocess (as conftest.run_cli runs the others)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "flexdit_fashion", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("fashion-cli") / "fm"
    run_cli("flexdit-export", "convert", ROOT / "models" / "fashion-flexdit", "-o", out)
    return out


def assert_one_line(p, cmd, message):
    """Exit 2, exactly one stderr line naming the command and carrying ``message``, no traceback,
    nothing on stdout; one line also means no sampling started (eval says 'sampling N images',
    compare 'end-to-end: fp32 ...' on stderr first)."""
    lines = p.stderr.splitlines()
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"flexdit-fashion {cmd}: error: "), lines[0]
    assert message in lines[0], lines[0]
    assert p.stdout == "", p.stdout


def argv(cmd, bundle, **options):
    """A fast command line (1 image per class, 1 step; compare: fp32 only, 1 thread); ``options``
    (per_class="0", ...) override those defaults or add more, None leaves one out."""
    opts = {"per_class": "1", "steps": "1"}
    if cmd == "compare":
        opts.update(policies="fp32", threads="1")
    opts.update(options)
    out = [cmd, bundle]
    for k, v in opts.items():
        if v is not None:
            out += [f"--{k.replace('_', '-')}", v]
    return out


# 1. a negative seed: numpy's ValueError traceback before
@pytest.mark.parametrize("cmd", ["eval", "compare"])
def test_negative_seed(bundle, cmd):
    p = fashion(*argv(cmd, bundle, seed="-1"))
    assert_one_line(p, cmd, "--seed must be at least 0, got -1")


# 2. an unwritable --json: checked before sampling, nothing left behind
def test_json_in_a_missing_directory(bundle, tmp_path):
    target = tmp_path / "no" / "such" / "out.json"
    p = fashion(*argv("compare", bundle, json=target))
    assert_one_line(p, "compare", f"cannot write --json {target}: ")
    assert "No such file or directory" in p.stderr
    assert not (tmp_path / "no").exists()


def test_json_under_a_regular_file(bundle, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    p = fashion(*argv("compare", bundle, json=afile / "out.json"))
    assert_one_line(p, "compare", f"cannot write --json {afile / 'out.json'}: ")
    assert "Not a directory" in p.stderr
    assert afile.read_text() == "keep"


def test_json_in_proc(bundle):
    p = fashion(*argv("compare", bundle, json="/proc/x/out.json"))
    assert_one_line(p, "compare", "cannot write --json /proc/x/out.json: ")


def test_json_naming_a_directory(bundle, tmp_path):
    p = fashion(*argv("compare", bundle, json=tmp_path))
    assert_one_line(p, "compare", f"cannot write --json {tmp_path}: ")
    assert os.listdir(tmp_path) == []


def test_json_is_written_whole(bundle, tmp_path):
    """The report is published in one rename: the file, and no temporary beside it."""
    target = tmp_path / "report.json"
    p = fashion(*argv("compare", bundle, json=target))
    assert p.returncode == 0, p.stderr
    assert json.loads(target.read_text())["images"] == 10
    assert os.listdir(tmp_path) == ["report.json"]


# 3. --steps outside 1..T (flexdit-run's rule and words): 0 used to run the bundle's 100 steps
@pytest.mark.parametrize("cmd", ["eval", "compare"])
@pytest.mark.parametrize("steps", ["0", "-3", "1001"])
def test_steps_out_of_range(bundle, cmd, steps):
    p = fashion(*argv(cmd, bundle, steps=steps))
    assert_one_line(p, cmd, f"--steps must be in 1..1000, got {steps}")


# 4. --ckpt and --policies: refused before the bundle is sampled
def test_missing_reference_checkpoint(bundle, tmp_path):
    p = fashion(*argv("eval", bundle, ckpt=tmp_path / "nonexist"))
    assert_one_line(p, "eval", f"checkpoint not found: {tmp_path / 'nonexist'}")


@pytest.mark.parametrize("policy,message", [
    ("fp7", "unknown precision 'fp7'"),
    ("openvino/fp7", "unknown precision 'fp7'"),
    ("fp16", "bundle has no onnx/fp16 artifact for stage 0"),  # converted without --extra-precisions
    ("int8:stages=9", "names stage 9"),
])
def test_bad_policy(bundle, policy, message):
    p = fashion(*argv("compare", bundle, policies=None), "--policies", "fp32", policy)
    assert_one_line(p, "compare", message)


# 5. usage errors: one line (the wording flexdit-run / flexdit-export use), not argparse's usage block
@pytest.mark.parametrize("args,line", [
    ([], "flexdit-fashion: error: the following arguments are required: command (see --help)"),
    (["nosuch"], "flexdit-fashion: error: argument command: invalid choice: 'nosuch' (choose from 'eval', "
                 "'compare') (see --help)"),
    (["eval"], "flexdit-fashion eval: error: the following arguments are required: bundle (see --help)"),
    (["eval", "B", "--per-class", "x"],
     "flexdit-fashion eval: error: argument --per-class: invalid int value: 'x' (see --help)"),
    (["eval", "B", "--sampler", "heun"],
     "flexdit-fashion eval: error: argument --sampler: invalid choice: 'heun' (choose from 'ddpm', 'ddim', "
     "'dpmpp-2m', 'unipc', 'euler') (see --help)"),
    (["compare", "B", "--policies", "int8", "--sampler", "heun"],
     "flexdit-fashion compare: error: argument --sampler: invalid choice: 'heun' (choose from 'ddpm', 'ddim', "
     "'dpmpp-2m', 'unipc', 'euler') (see --help)"),
    (["eval", "B", "--threads", "2"], "flexdit-fashion eval: error: unrecognized arguments: --threads 2 (see --help)"),
    (["compare", "B"], "flexdit-fashion compare: error: the following arguments are required: --policies "
                       "(see --help)"),
    (["compare", "B", "--policies", "fp16", "--json"],
     "flexdit-fashion compare: error: argument --json: expected one argument (see --help)"),
])
def test_usage_errors_are_one_line(args, line):
    p = fashion(*args)
    assert p.returncode == 2 and p.stderr.splitlines() == [line] and p.stdout == "", p.stderr


def test_help_still_exits_zero():
    p = fashion("compare", "--help")
    assert p.returncode == 0 and "--policies" in p.stdout and p.stderr == ""


# 6. a guidance scale that is no finite number: refused before the first progress line
@pytest.mark.parametrize("scale", ["nan", "inf", "-1"])
def test_bad_cfg_scale(bundle, scale):
    p = fashion(*argv("eval", bundle, cfg_scale=scale))
    assert_one_line(p, "eval", "--cfg-scale must be ")


# and the rest of what the runtime checks, before sampling too
def test_zero_threads(bundle):
    p = fashion(*argv("compare", bundle, threads="0"))
    assert_one_line(p, "compare", "--threads must be a positive integer, got 0")


@pytest.mark.parametrize("cmd", ["eval", "compare"])
def test_zero_per_class(bundle, cmd):
    p = fashion(*argv(cmd, bundle, per_class="0"))
    assert_one_line(p, cmd, "--per-class must be at least 1, got 0")
