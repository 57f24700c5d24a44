"""flexdit-export: convert | inspect | verify | calibrate | engines | doctor.

Every failure a user can cause prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

import click

from flexdit_bundle.cli_support import FLOAT, INT, Choice, output_options
from flexdit_runtime.samplers import SAMPLERS

BACKEND_CHOICES = ("onnx", "tensorrt", "openvino", "aoti")
BACKEND_HELP = ("tensorrt: also build one TensorRT engine per stage (needs TensorRT and a GPU); openvino: also an OpenVINO "
                "int8 model per stage; aoti: also one AOTInductor package per stage for --device, in the --precision "
                "policy's precision (fp32|bf16|fp16)")


def _options(*decorators):
    """Several click options as one decorator: a group of options declared once and shared by
    every command that takes it."""
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


# what convert and calibrate both read: the checkpoint, where to write, and how to read the model
TARGET = _options(
    click.argument("ckpt", type=click.Path()),
    click.option("-o", "--out", required=True, help="directory to write"),
    click.option("--force", is_flag=True, help="replace an existing one (atomically)"))
MODEL = _options(
    click.option("--schedule", help="released | paper4 | dense | 'lo:s,...' (e.g. 750:6,500:7,250:9,0:10) | FILE.json "
                                    "(default: the schedule recorded in a project checkpoint, else released)"),
    click.option("--batch", type=INT, default=2, show_default=True,
                 help="graph batch dimension (cond+uncond rows for CFG)"),
    click.option("--num-heads", type=INT, help="attention heads (checkpoint shapes cannot tell; default from the size; "
                                               "refused when it contradicts a project checkpoint's record)"),
    click.option("--semantic-size", type=INT, help="sparse grid of the 'released' schedule (default: checkpoint's or 8)"),
    click.option("--init-from-dit", metavar="LAYOUT",
                 help="build a FlexDiT from DiT weights with this layout: 256 | 512 | default | P/DxG0,G1,G2,G3/T"),
    click.option("--num-timesteps", type=INT, default=1000, show_default=True, help="diffusion training timesteps T"),
    click.option("--cfg-channels", type=Choice(("first3", "eps")),
                 help="guided channels: first3 (DiT reference) or eps (all eps channels); default first3 when Cin >= 4"))
CAPTURE = _options(
    click.option("--calib-images", type=INT, help="calibration trajectories (images; default 32, 2 when only the "
                                                   "held-out gate needs rows)"),
    click.option("--calib-holdout-images", type=INT, help="held-out trajectories (default 16, 8 gate-only)"),
    click.option("--calib-max-rows", type=INT, help="calibration rows kept per stage (default 512)"),
    click.option("--calib-holdout-rows", type=INT, help="held-out rows kept per stage (default 128)"),
    click.option("--calib-steps", type=INT, help="sampling steps (default: the bundle's)"),
    click.option("--calib-sampler", type=Choice(("ddpm", "ddim")), help="default: the bundle's"),
    click.option("--calib-cfg-scale", type=FLOAT, help="default: the bundle's"),
    click.option("--calib-seed", type=INT, help="default 0"))
ENGINE_CACHE = _options(
    click.option("--engine-cache", help="TensorRT engine cache directory (default ~/.cache/flexdit-export/tensorrt)"),
    click.option("--timing-cache", help="TensorRT timing cache file (default: in the engine cache)"))
PRECISION_HELP = ("per-stage precision policy, the runtime's default: fp32 | fp16 | int8 (int8-dynamic on ONNX Runtime, "
                  "int8-static on TensorRT) | int8-dynamic | int8-static | fp8, or per stage, e.g. "
                  "'int8:stages=0-2,fp16:stages=3' (default fp32)")


def _calib_settings(args) -> dict:
    keys = {"calib_images": "images", "calib_holdout_images": "holdout_images", "calib_max_rows": "max_rows",
            "calib_holdout_rows": "max_holdout_rows", "calib_steps": "steps", "calib_sampler": "sampler",
            "calib_cfg_scale": "cfg_scale", "calib_seed": "seed"}
    return {v: getattr(args, k) for k, v in keys.items() if getattr(args, k, None) is not None}


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
    (Ctrl-C, SIGTERM) cleans up and exits 128 + the signal."""
    from flexdit_bundle.manifest import BundleError
    from flexdit_runtime.prompts import PromptError

    from .errors import UserError

    args = argparse.Namespace(cmd=cmd, **kwargs)
    args.json = kwargs.get("json_out", False)
    try:
        return handler(args)
    except (UserError, BundleError, PromptError) as e:
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
@click.option("--formats", default="onnx", show_default=True, help="comma-separated: onnx[,torchscript]")
@click.option("--opset", type=INT, default=18, show_default=True, help="ONNX opset (>= 18)")
@click.option("--vae", help="local diffusers AutoencoderKL directory (config.json + diffusion_pytorch_model.safetensors)")
@click.option("--class-names", help="text file, one class name per line")
@click.option("--default-sampler", type=Choice(SAMPLERS),
              help="sampler the runtime uses by default (default ddpm; dpmpp-2m, unipc, euler: few-step solvers)")
@click.option("--default-steps", type=INT, help="sampling steps the runtime uses by default (default 250)")
@click.option("--default-cfg-scale", type=FLOAT, help="guidance scale the runtime uses by default (default 4)")
@click.option("--parity-tol", type=FLOAT, default=1e-3, show_default=True, help="max relative error of a graph vs PyTorch")
@click.option("--seed", type=INT, default=0, show_default=True)
@click.option("--optimize", is_flag=True, help="save each stage graph after ONNX Runtime offline optimisation (portable level)")
@click.option("--optimize-level", default="basic", help="basic (standard ONNX ops, default) | extended "
              "(adds ONNX Runtime contrib ops: CPU/CUDA providers only)")
@click.option("--onnxsim", is_flag=True, help="also run onnxsim after ONNX Runtime (optional package)")
@click.option("--precision", help=PRECISION_HELP)
@click.option("--extra-precisions", default="", help="also build these for every stage (for flexdit-run --precision), "
              "e.g. fp16,int8-static")
@click.option("--fp32-islands", help="what fp16 graphs keep in fp32: 'default' (layernorm,softmax,embedders,"
              "final_layer), 'none', or a list of those groups, op:TYPE and layer paths/globs")
@click.option("--quant-ops", default="MatMul,Gemm", show_default=True, help="operator types to quantise")
@click.option("--quant-include", default="", help="quantise only these layers (module paths or globs)")
@click.option("--quant-exclude", default="default", help="never quantise these layers (module paths or globs): "
              "'default' (*.merged_layer2: the SDTM skip path), 'none', or a list, e.g. default,final_layer")
@click.option("--error-tol", default="", help="per-precision gate on the relative RMS error vs the fp32 graph on "
              "held-out calibration rows, e.g. int8-static=0.15,fp16=0.02")
@click.option("--quality-gate", type=INT, default=0, metavar="PER_CLASS",
              help="end-to-end gate (Fashion-MNIST model, needs the optional flexdit_fashion package): sample "
                   "PER_CLASS images per class with the policy and with fp32, compare class accuracy and FD")
@click.option("--backend", type=Choice(BACKEND_CHOICES), default="onnx", show_default=True,
              help=BACKEND_HELP)
@click.option("--device", type=Choice(("cpu", "cuda")), help="--backend aoti: compile the AOTInductor packages for "
              "this device (default: cuda when torch sees a GPU, else cpu)")
@ENGINE_CACHE
@click.option("--calib", help="an existing calibration set (flexdit-export calibrate); default: a matching set found "
              "beside -o, else a capture into OUT.calib")
@click.option("--calib-method", default="minmax", help="int8-static activation ranges: minmax (default) | "
              "percentile | entropy (histograms, calibrated in strides)")
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


def _log(quiet):
    return (lambda *a, **k: None) if quiet else (lambda msg: print(msg, file=sys.stderr))


def _emit(args, summary: dict, text) -> None:
    """The one rule for stdout on every command: --json -> JSON; -q -> nothing; else text."""
    if args.json:
        print(json.dumps(summary, indent=2))
    elif not args.quiet:
        print(text() if callable(text) else text)


def _check_default_sampling(args) -> None:
    """--default-sampler with --default-steps must be a run the runtime accepts (e.g. unipc takes at
    most T-1 steps): refused here, before the export, with the runtime's own line."""
    from flexdit_bundle.manifest import SAMPLING_DEFAULTS, BundleError
    from flexdit_runtime.sampling_params import resolve_params

    from .errors import UserError

    steps = args.default_steps if args.default_steps is not None else SAMPLING_DEFAULTS["steps"]
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= args.num_timesteps:
        return  # --default-steps' own check names it
    try:
        resolve_params(dict(SAMPLING_DEFAULTS), args.num_timesteps, sampler=args.default_sampler, steps=steps)
    except BundleError as e:
        raise UserError(f"--default-sampler {args.default_sampler} with {steps} default steps: {e}") from None


def _convert(args) -> int:
    from .convert import ConvertOptions, convert
    from .inspect_bundle import render, summarise

    defaults = {}
    if args.default_sampler is not None:
        defaults["sampler"] = args.default_sampler
        _check_default_sampling(args)
    if args.default_steps is not None:
        defaults["steps"] = args.default_steps
    if args.default_cfg_scale is not None:
        defaults["cfg_scale"] = args.default_cfg_scale
    opts = ConvertOptions(schedule=args.schedule, batch=args.batch,
                          formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()), opset=args.opset,
                          vae=args.vae, class_names=args.class_names, num_heads=args.num_heads,
                          semantic_size=args.semantic_size, init_from_dit=args.init_from_dit,
                          num_timesteps=args.num_timesteps, cfg_channels=args.cfg_channels,
                          parity_tol=args.parity_tol, seed=args.seed, force=args.force, defaults=defaults,
                          optimize=args.optimize, optimize_level=args.optimize_level, onnxsim=args.onnxsim,
                          precision=args.precision, extra_precisions=tuple(_split(args.extra_precisions)),
                          fp32_islands=args.fp32_islands, quant_ops=tuple(_split(args.quant_ops)),
                          quant_include=tuple(_split(args.quant_include)),
                          quant_exclude=tuple(_split(args.quant_exclude)) or ("none",),
                          calib=args.calib, calib_settings=_calib_settings(args), calib_method=args.calib_method,
                          error_tol=_pairs(args.error_tol, "--error-tol"),
                          backend=args.backend, engine_cache=args.engine_cache, timing_cache=args.timing_cache,
                          device=args.device)
    gates = []
    if args.quality_gate:
        from .quality_gates import load_gate
        gates.append(load_gate("fashion-mnist", per_class=args.quality_gate))
    out = convert(args.ckpt, args.out, opts, log=_log(args.quiet), gates=gates)
    s = summarise(out, verify_checksums=False)
    _emit(args, s, lambda: render(s))
    return 0


def _split(text):
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def _pairs(text, what) -> dict:
    from .errors import UserError

    out = {}
    for item in _split(text):
        k, eq, v = item.partition("=")
        if not eq:
            raise UserError(f"{what}: {item!r} is not KEY=VALUE")
        out[k.strip()] = v.strip()
    return out


def _inspect(args) -> int:
    from pathlib import Path

    from .inspect_bundle import render, render_calib, summarise, summarise_calib

    if (Path(args.bundle) / "calib.json").is_file():
        s = summarise_calib(args.bundle)
        _emit(args, s, lambda: render_calib(s))
        return 0
    s = summarise(args.bundle)
    _emit(args, s, lambda: render(s))
    return 0


def _calibrate(args) -> int:
    from .calibrate import calibrate

    cs = calibrate(args.ckpt, args.out, schedule=args.schedule, batch=args.batch, num_heads=args.num_heads,
                   semantic_size=args.semantic_size, init_from_dit=args.init_from_dit,
                   num_timesteps=args.num_timesteps, cfg_channels=args.cfg_channels, settings=_calib_settings(args),
                   force=args.force, log=_log(args.quiet or args.json))
    from .inspect_bundle import render_calib
    s = cs.summary()
    _emit(args, s, lambda: render_calib(s))
    return 0


def _engines(args) -> int:
    from .tensorrt_build import engines_command

    engines_command(args.bundle, args.precision, args.engine_cache, args.timing_cache, args.force, log=_log(args.quiet))
    from .inspect_bundle import render, summarise
    s = summarise(args.bundle, verify_checksums=False)
    _emit(args, s, lambda: render(s))
    return 0


def _doctor(args) -> int:
    from .doctor import render, report

    r = report()
    _emit(args, r, lambda: render(r))
    return 0


def _verify(args) -> int:
    from .verify import verify

    if args.steps < 1:
        from .errors import UserError
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    report = verify(args.bundle, args.ckpt, steps=args.steps, sampler=args.sampler,
                    init_from_dit=args.init_from_dit, log=_log(args.quiet or args.json))
    if report["ok"] or args.json:
        _emit(args, report, "verify: ok")
    if not report["ok"]:
        if not args.json:
            print("flexdit-export verify: error: the bundle does not match the checkpoint (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
