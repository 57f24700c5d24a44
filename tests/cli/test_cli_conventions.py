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


def _parsed(*argv):
    """convert's click parameters for this command line, parsed as the CLI parses them."""
    from flexdit_export.cli import cli

    return cli.commands["convert"].make_context("convert", ["ck.pt", "-o", "out", *argv]).params


def test_convert_options_declare_every_convert_flag_once():
    """Each ConvertOptions field's declared flag is a convert option, and the object the CLI builds
    from a bare command line is the library's default (but for --quant-exclude's spelled default)."""
    from dataclasses import fields, replace

    from flexdit_export.export import MIN_OPSET
    from flexdit_export.options import ConvertOptions
    from flexdit_export.quantize import DEFAULT_OP_TYPES

    assert ConvertOptions().opset == MIN_OPSET and ConvertOptions().quant_ops == DEFAULT_OP_TYPES
    declared = ConvertOptions.flags(*[f.name for f in fields(ConvertOptions) if f.metadata])
    params = _parsed()
    assert {p for p, _ in declared} <= set(params), sorted({p for p, _ in declared} - set(params))
    assert len({flag.name for _, flag in declared}) == len(declared)
    assert ConvertOptions.from_flags(params) == replace(ConvertOptions(), quant_exclude=("default",))
    opts = ConvertOptions.from_flags(_parsed("--formats", "onnx, torchscript", "--calib-steps", "5",
                                             "--default-cfg-scale", "2", "--error-tol", "fp16=0.1",
                                             "--quant-exclude", "", "--optimize"), force=True)
    assert (opts.formats, opts.calib_settings, opts.defaults, opts.error_tol, opts.quant_exclude, opts.optimize,
            opts.force) == (("onnx", "torchscript"), {"steps": 5}, {"cfg_scale": 2.0}, {"fp16": "0.1"}, ("none",),
                            True, True)


def test_argument_errors_name_the_library_parameter(tmp_path):
    """The library refuses a value by its keyword; the CLIs say the flag (the default spelling, or
    their own)."""
    from flexdit_bundle.errors import ArgumentError, BundleError, FlexditError
    from flexdit_export.errors import OptionError, UserError
    from flexdit_export.options import ConvertOptions
    from flexdit_export.plan import resolve_plan

    with pytest.raises(OptionError) as e:
        resolve_plan(tmp_path / "none.pt", tmp_path / "out", ConvertOptions(batch=0))
    assert isinstance(e.value, (UserError, ArgumentError, BundleError, FlexditError))
    assert e.value.param == "batch" and str(e.value) == "--batch must be between 1 and 4096, got 0"
    assert e.value.message({"batch": "--graph-batch"}) == "--graph-batch must be between 1 and 4096, got 0"
    assert ArgumentError("error_tol", ": x is not PRECISION=NUMBER").message() == "--error-tol: x is not PRECISION=NUMBER"
    p = run_cli("flexdit-export", "convert", tmp_path / "none.pt", "-o", tmp_path / "out", "--batch", "0", check=False)
    assert p.returncode == 2 and p.stderr.splitlines() == [
        "flexdit-export convert: error: --batch must be between 1 and 4096, got 0"], p.stderr
