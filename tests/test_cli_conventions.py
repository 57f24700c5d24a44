"""Both CLIs on click: shell completion, the same one-line usage errors (argparse's wording, which
the C++ runtime's ctest matches) and exit codes, --json and -q on every command."""

import os
import subprocess
import sys

import pytest

from conftest import CLIS, run_cli


@pytest.mark.parametrize("prog", ["flexdit-run", "flexdit-export"])
def test_shell_completion_script(prog):
    var = "_" + prog.upper().replace("-", "_") + "_COMPLETE"
    code = f"import sys; from {CLIS[prog]} import main; sys.argv[0] = {prog!r}; sys.exit(main())"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, var: "bash_source"}, timeout=120)
    assert p.returncode == 0 and "complete " in p.stdout and prog.replace("-", "_") in p.stdout, p.stderr


@pytest.mark.parametrize("args,message", [
    (["convert"], "flexdit-export convert: error: the following arguments are required: ckpt (see --help)"),
    (["convert", "x.pt"], "flexdit-export convert: error: the following arguments are required: -o/--out (see --help)"),
    (["convert", "x.pt", "-o", "y", "--num-heads", "abc"],
     "flexdit-export convert: error: argument --num-heads: invalid int value: 'abc' (see --help)"),
    (["convert", "x.pt", "-o", "y", "--cfg-channels", "all"],
     "flexdit-export convert: error: argument --cfg-channels: invalid choice: 'all' (choose from 'first3', 'eps') (see --help)"),
    (["verify", "b", "--steps"], "flexdit-export verify: error: argument --steps: expected one argument (see --help)"),
    (["inspect", "b", "--no-such-flag"], "flexdit-export inspect: error: unrecognized arguments: --no-such-flag (see --help)"),
    (["nosuch"], "flexdit-export: error: argument command: invalid choice: 'nosuch' (see --help)"),
    ([], "flexdit-export: error: the following arguments are required: command (see --help)"),
])
def test_export_usage_errors_are_one_line(args, message):
    p = run_cli("flexdit-export", *args, check=False)
    assert p.returncode == 2 and p.stderr.splitlines() == [message] and p.stdout == "", p.stderr


def test_help_and_version_exit_zero():
    for prog, args in (("flexdit-run", ["--help"]), ("flexdit-export", ["--help"]), ("flexdit-export", ["convert", "-h"])):
        p = run_cli(prog, *args)
        assert p.stdout.startswith("Usage: ") and p.stderr == ""
    assert run_cli("flexdit-export", "--version").stdout.startswith("flexdit-export ")


def test_run_json_and_quiet(flex_bundle, tmp_path):
    import json
    prompts = tmp_path / "p.txt"
    prompts.write_text("1\n")
    q = run_cli("flexdit-run", prompts, "--bundle", flex_bundle, "-o", tmp_path / "a", "--steps", "2", "-q")
    assert q.stdout == "" and q.stderr == ""
    j = run_cli("flexdit-run", prompts, "--bundle", flex_bundle, "-o", tmp_path / "b", "--steps", "2", "--json")
    assert json.loads(j.stdout)["images"] == 1
