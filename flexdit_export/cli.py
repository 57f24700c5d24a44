"""flexdit-export: convert | inspect | verify | calibrate | engines | doctor.

Every failure a user can cause prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import click

from flexdit_bundle.cli_support import FLOAT, INT, Choice, output_options

from .options import ConvertOptions, Flag


def _options(*decorators):
    """Several click options as one decorator: a group of options declared once and shared by
    every command that takes it."""
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


def _click_option(param: str, flag: Flag):
    """The click option a ConvertOptions field declares (options.Flag): one declaration, two users."""
    if flag.kind is bool:
        return click.option(flag.name, param, is_flag=True, help=flag.help)
    kind = Choice(flag.kind) if isinstance(flag.kind, tuple) else {int: INT, float: FLOAT, str: None}[flag.kind]
    extra = {"metavar": flag.metavar} if flag.metavar else {}
    return click.option(flag.name, param, type=kind, default=flag.default, show_default=flag.show_default,
                        help=flag.help, **extra)


def convert_options(*fields: str):
    """The flags of these ConvertOptions fields, in this order, as one decorator."""
    return _options(*(_click_option(param, flag) for param, flag in ConvertOptions.flags(*fields)))


# what convert and calibrate both read: the checkpoint, where to write, and how to read the model
TARGET = _options(
    click.argument("ckpt", type=click.Path()),
    click.option("-o", "--out", required=True, help="directory to write"),
    click.option("--force", is_flag=True, help="replace an existing one (atomically)"))
MODEL = convert_options("schedule", "batch", "num_heads", "semantic_size", "init_from_dit", "num_timesteps",
                        "cfg_channels")
CAPTURE = convert_options("calib_settings")
ENGINE_CACHE = convert_options("engine_cache", "timing_cache")


@dataclass(frozen=True)
class Output:
    """What every command prints to stdout: --json -> the summary as JSON; -q -> nothing; else text."""

    json: bool = False
    quiet: bool = False

    def emit(self, summary: dict, text) -> None:
        if self.json:
            print(json.dumps(summary, indent=2))
        elif not self.quiet:
            print(text() if callable(text) else text)

    def log(self, also_quiet: bool = False):
        """Progress on stderr, unless -q (``also_quiet``: --json silences it too)."""
        if self.quiet or (also_quiet and self.json):
            return lambda *a, **k: None
        return lambda msg: print(msg, file=sys.stderr)


_SIGNALLED = []


def _terminate(signum, frame):
    """SIGTERM (and SIGINT) unwind like Ctrl-C, so every ``with`` block removes its temporaries;
    a second signal during that clean-up is ignored rather than cutting it short."""
    import signal

    _SIGNALLED.append(signum)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _dispatch(cmd: str, handler, kwargs: dict) -> int:
    """Every command's one exit rule: a user error is one line and status 2; an interrupt
    (Ctrl-C, SIGTERM) cleans up and exits 128 + the signal. The handler gets the command's
    parameters as keywords and ``show``, the --json / -q choice."""
    from flexdit_bundle.errors import ArgumentError, FlexditError

    from .options import flag_names

    show = Output(json=kwargs.pop("json_out", False), quiet=kwargs.pop("quiet", False))
    try:
        return handler(show, **kwargs)
    except ArgumentError as e:  # the library names its parameter; say it as the flag the user typed
        print(f"flexdit-export {cmd}: error: {e.message(flag_names())}", file=sys.stderr)
        return 2
    except FlexditError as e:
        print(f"flexdit-export {cmd}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `flexdit-export inspect B | head`: the reader left; not an error
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # a path the system refuses (too long, a loop, no space): the user's to fix
        from flexdit_bundle.files import os_error_message

        print(f"flexdit-export {cmd}: error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flexdit-export {cmd}: error: interrupted; nothing was written", file=sys.stderr)
        return 128 + (_SIGNALLED[0] if _SIGNALLED else 2)


def _version(ctx, param, value):
    if value and not ctx.resilient_parsing:
        from . import __version__
        click.echo(f"flexdit-export {__version__}")
        ctx.exit(0)


@click.group(name="flexdit-export", help="Compile FlexDiT/DiT checkpoints into bundles.",
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_version,
              help="print the version and exit")
def cli():
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)


@cli.command(help="checkpoint -> bundle (one static graph per schedule stage)")
@TARGET
@MODEL
@convert_options("formats", "opset", "vae", "class_names", "defaults", "parity_tol", "seed", "optimize",
                 "optimize_level", "onnxsim", "precision", "extra_precisions", "fp32_islands", "quant_ops",
                 "quant_include", "quant_exclude", "error_tol")
@click.option("--quality-gate", type=INT, default=0, metavar="PER_CLASS",
              help="end-to-end gate (Fashion-MNIST model, needs the optional flexdit_fashion package): sample "
                   "PER_CLASS images per class with the policy and with fp32, compare class accuracy and FD")
@convert_options("backend", "device")
@ENGINE_CACHE
@convert_options("calib", "calib_method")
@CAPTURE
@output_options
def convert(**kw):
    return _dispatch("convert", _convert, kw)


@cli.command(help="stages, token counts, files, sizes, parity, precision (or a calibration set)")
@click.argument("bundle", type=click.Path())
@output_options
def inspect(**kw):
    return _dispatch("inspect", _inspect, kw)


@cli.command(help="checksums and schema; with --ckpt, stage and trajectory parity vs PyTorch")
@click.argument("bundle", type=click.Path())
@click.option("--ckpt", help="the checkpoint the bundle was built from")
@click.option("--steps", type=INT, default=8, show_default=True, help="trajectory length")
@click.option("--sampler", type=Choice(("ddim", "ddpm")), default="ddim", show_default=True)
@click.option("--init-from-dit", metavar="LAYOUT", help="as given to convert")
@output_options
def verify(**kw):
    return _dispatch("verify", _verify, kw)


@cli.command(help="capture a per-stage calibration set from real sampling trajectories")
@TARGET
@MODEL
@CAPTURE
@output_options
def calibrate(**kw):
    return _dispatch("calibrate", _calibrate, kw)


@cli.command(help="build one TensorRT engine per stage into a bundle (on the target GPU)")
@click.argument("bundle", type=click.Path())
@click.option("--precision", help="per-stage policy as for convert (default: the bundle's)")
@ENGINE_CACHE
@click.option("--force", is_flag=True, help="replace engines already in the bundle")
@output_options
def engines(**kw):
    return _dispatch("engines", _engines, kw)


@cli.command(help="what is installed, which engines and providers are usable, which extra to add")
@output_options
def doctor(**kw):
    return _dispatch("doctor", _doctor, kw)


def main(argv=None) -> int:
    from flexdit_bundle.cli_support import run

    return run(cli, "flexdit-export", argv)


def _check_default_sampling(opts: ConvertOptions) -> None:
    """--default-sampler with --default-steps must be a run the runtime accepts (e.g. unipc takes at
    most T-1 steps): refused here, before the export, with the runtime's own line."""
    from flexdit_bundle.manifest import SAMPLING_DEFAULTS, BundleError
    from flexdit_runtime.sampling_params import resolve_params

    from .errors import UserError

    sampler = opts.defaults["sampler"]
    steps = opts.defaults.get("steps", SAMPLING_DEFAULTS["steps"])
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= opts.num_timesteps:
        return  # --default-steps' own check names it
    try:
        resolve_params(dict(SAMPLING_DEFAULTS), opts.num_timesteps, sampler=sampler, steps=steps)
    except BundleError as e:
        raise UserError(f"--default-sampler {sampler} with {steps} default steps: {e}") from None


def _convert(show: Output, ckpt, out, force, quality_gate, **flags) -> int:
    from .convert import convert
    from .inspect_bundle import render, summarise

    if flags.get("default_sampler") is not None:  # before the other flags' checks, as it always came first
        _check_default_sampling(ConvertOptions.from_flags(
            {k: v for k, v in flags.items() if k in ("default_sampler", "default_steps", "num_timesteps")}))
    opts = ConvertOptions.from_flags(flags, force=force)
    gates = []
    if quality_gate:
        from .quality_gates import load_gate
        gates.append(load_gate("fashion-mnist", per_class=quality_gate))
    written = convert(ckpt, out, opts, log=show.log(), gates=gates)
    s = summarise(written, verify_checksums=False)
    show.emit(s, lambda: render(s))
    return 0


def _inspect(show: Output, bundle) -> int:
    from pathlib import Path

    from .inspect_bundle import render, render_calib, summarise, summarise_calib

    if (Path(bundle) / "calib.json").is_file():
        s = summarise_calib(bundle)
        show.emit(s, lambda: render_calib(s))
        return 0
    s = summarise(bundle)
    show.emit(s, lambda: render(s))
    return 0


def _calibrate(show: Output, ckpt, out, force, **flags) -> int:
    from .calibrate import calibrate

    opts = ConvertOptions.from_flags(flags)
    cs = calibrate(ckpt, out, schedule=opts.schedule, batch=opts.batch, num_heads=opts.num_heads,
                   semantic_size=opts.semantic_size, init_from_dit=opts.init_from_dit,
                   num_timesteps=opts.num_timesteps, cfg_channels=opts.cfg_channels, settings=opts.calib_settings,
                   force=force, log=show.log(also_quiet=True))
    from .inspect_bundle import render_calib
    s = cs.summary()
    show.emit(s, lambda: render_calib(s))
    return 0


def _engines(show: Output, bundle, precision, engine_cache, timing_cache, force) -> int:
    from .tensorrt_build import engines_command

    engines_command(bundle, precision, engine_cache, timing_cache, force, log=show.log())
    from .inspect_bundle import render, summarise
    s = summarise(bundle, verify_checksums=False)
    show.emit(s, lambda: render(s))
    return 0


def _doctor(show: Output) -> int:
    from .doctor import render, report

    r = report()
    show.emit(r, lambda: render(r))
    return 0


def _verify(show: Output, bundle, ckpt, steps, sampler, init_from_dit) -> int:
    from .verify import verify

    if steps < 1:
        from .errors import UserError
        raise UserError(f"--steps must be at least 1, got {steps}")
    report = verify(bundle, ckpt, steps=steps, sampler=sampler, init_from_dit=init_from_dit,
                    log=show.log(also_quiet=True))
    if report["ok"] or show.json:
        show.emit(report, "verify: ok")
    if not report["ok"]:
        if not show.json:
            print("flexdit-export verify: error: the bundle does not match the checkpoint (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
