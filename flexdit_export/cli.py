"""flexdit-export: convert | inspect | verify | calibrate | engines | doctor.

Every failure a user can cause prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys


def _convert_args(p):
    p.add_argument("ckpt", help="checkpoint: .pt/.pth (reference training dict or state_dict), .safetensors, "
                                "or a project checkpoint directory")
    p.add_argument("-o", "--out", required=True, help="bundle directory to write")
    p.add_argument("--schedule", help="released | paper4 | dense | 'lo:s,...' (e.g. 750:6,500:7,250:9,0:10) | FILE.json "
                                       "(default: the schedule recorded in a project checkpoint, else released)")
    p.add_argument("--batch", type=int, default=2, help="graph batch dimension (cond+uncond rows for CFG; default 2)")
    p.add_argument("--formats", default="onnx", help="comma-separated: onnx[,torchscript]")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18; default 18)")
    p.add_argument("--vae", help="local diffusers AutoencoderKL directory (config.json + diffusion_pytorch_model.safetensors)")
    p.add_argument("--class-names", help="text file, one class name per line")
    p.add_argument("--num-heads", type=int, help="attention heads (checkpoint shapes cannot tell; default from the size)")
    p.add_argument("--semantic-size", type=int, help="sparse grid of the 'released' schedule (default: checkpoint's or 8)")
    p.add_argument("--init-from-dit", metavar="LAYOUT",
                   help="build a FlexDiT from DiT weights with this layout: 256 | 512 | default | P/DxG0,G1,G2,G3/T")
    p.add_argument("--num-timesteps", type=int, default=1000, help="diffusion training timesteps T (default 1000)")
    p.add_argument("--cfg-channels", choices=("first3", "eps"),
                   help="guided channels: first3 (DiT reference) or eps (all eps channels); default first3 when Cin >= 4")
    p.add_argument("--default-steps", type=int, help="sampling steps the runtime uses by default (default 250)")
    p.add_argument("--default-cfg-scale", type=float, help="guidance scale the runtime uses by default (default 4)")
    p.add_argument("--parity-tol", type=float, default=1e-3, help="max relative error of a graph vs PyTorch (default 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    g = p.add_argument_group("optimisation and precision")
    g.add_argument("--optimize", action="store_true",
                   help="save each stage graph after ONNX Runtime offline optimisation (portable level)")
    g.add_argument("--optimize-level", default="basic", help="basic (standard ONNX ops, default) | extended "
                   "(adds ONNX Runtime contrib ops: CPU/CUDA providers only)")
    g.add_argument("--onnxsim", action="store_true", help="also run onnxsim after ONNX Runtime (optional package)")
    g.add_argument("--precision", help="per-stage precision policy, the runtime's default: fp32 | fp16 | int8 "
                   "(int8-dynamic on ONNX Runtime, int8-static on TensorRT) | int8-dynamic | int8-static | fp8, "
                   "or per stage, e.g. 'int8:stages=0-2,fp16:stages=3' (default fp32)")
    g.add_argument("--extra-precisions", default="", help="also build these for every stage (for flexdit-run "
                   "--precision), e.g. fp16,int8-static")
    g.add_argument("--fp32-islands", help="what fp16 graphs keep in fp32: 'default' (layernorm,softmax,embedders,"
                   "final_layer), 'none', or a list of those groups, op:TYPE and layer paths/globs")
    g.add_argument("--quant-ops", default="MatMul,Gemm", help="operator types to quantise (default MatMul,Gemm)")
    g.add_argument("--quant-include", default="", help="quantise only these layers (module paths or globs)")
    g.add_argument("--quant-exclude", default="default", help="never quantise these layers (module paths or globs): "
                   "'default' (*.merged_layer2: the SDTM skip path), 'none', or a list, e.g. default,final_layer")
    g.add_argument("--error-tol", default="", help="per-precision gate on the relative RMS error vs the fp32 graph "
                   "on held-out calibration rows, e.g. int8-static=0.15,fp16=0.02")
    g.add_argument("--quality-gate", type=int, default=0, metavar="PER_CLASS",
                   help="end-to-end gate (Fashion-MNIST model, needs the optional flexdit_fashion package): sample "
                        "PER_CLASS images per class with the policy and with fp32, compare class accuracy and FD")
    g.add_argument("--backend", choices=("onnx", "tensorrt", "aoti"), default="onnx",
                   help="tensorrt: also build one TensorRT engine per stage (needs TensorRT and a GPU); aoti: also one "
                        "AOTInductor package per stage for --device, in the --precision policy's precision (fp32|bf16|fp16)")
    g.add_argument("--device", choices=("cpu", "cuda"), help="--backend aoti: compile the AOTInductor packages for "
                   "this device (default: cuda when torch sees a GPU, else cpu)")
    g.add_argument("--engine-cache", help="TensorRT engine cache directory (default ~/.cache/flexdit-export/tensorrt)")
    g.add_argument("--timing-cache", help="TensorRT timing cache file (default: in the engine cache)")
    c = p.add_argument_group("calibration (static int8/fp8 scales; held-out rows gate every precision)")
    c.add_argument("--calib", help="an existing calibration set (flexdit-export calibrate); default: capture into "
                   "OUT.calib, reused when its settings match")
    c.add_argument("--calib-method", default="minmax", help="int8-static activation ranges: minmax (default) | "
                   "percentile | entropy (histograms, calibrated in strides)")
    _calib_capture_args(c)


def _calib_capture_args(c):
    c.add_argument("--calib-images", type=int, help="calibration trajectories (images; default 32)")
    c.add_argument("--calib-holdout-images", type=int, help="held-out trajectories (default 16)")
    c.add_argument("--calib-max-rows", type=int, help="calibration rows kept per stage (default 512)")
    c.add_argument("--calib-holdout-rows", type=int, help="held-out rows kept per stage (default 128)")
    c.add_argument("--calib-steps", type=int, help="sampling steps (default: the bundle's)")
    c.add_argument("--calib-sampler", choices=("ddpm", "ddim"), help="default: the bundle's")
    c.add_argument("--calib-cfg-scale", type=float, help="default: the bundle's")
    c.add_argument("--calib-seed", type=int, help="default 0")


def _calib_settings(args) -> dict:
    keys = {"calib_images": "images", "calib_holdout_images": "holdout_images", "calib_max_rows": "max_rows",
            "calib_holdout_rows": "max_holdout_rows", "calib_steps": "steps", "calib_sampler": "sampler",
            "calib_cfg_scale": "cfg_scale", "calib_seed": "seed"}
    return {v: getattr(args, k) for k, v in keys.items() if getattr(args, k, None) is not None}


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in the same one-line form as every other failure."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


_SIGNALLED = []


def _terminate(signum, frame):
    """SIGTERM (and SIGINT) unwind like Ctrl-C, so every ``with`` block removes its temporaries;
    a second signal during that clean-up is ignored rather than cutting it short."""
    import signal

    _SIGNALLED.append(signum)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def build_parser():
    ap = OneLineParser(prog="flexdit-export", description="Compile FlexDiT/DiT checkpoints into bundles.")
    from . import __version__
    ap.add_argument("--version", action="version", version=f"flexdit-export {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=OneLineParser)
    # declared once, the same on every command: --json changes what stdout holds, -q silences stderr's log
    common = OneLineParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress log on stderr (errors only)")
    _convert_args(sub.add_parser("convert", help="checkpoint -> bundle (one static graph per schedule stage)",
                                 parents=[common]))
    p = sub.add_parser("inspect", help="stages, token counts, files, sizes, parity, precision (or a calibration set)",
                       parents=[common])
    p.add_argument("bundle", help="a bundle or a calibration set directory")
    p = sub.add_parser("verify", help="checksums and schema; with --ckpt, stage and trajectory parity vs PyTorch",
                       parents=[common])
    p.add_argument("bundle")
    p.add_argument("--ckpt", help="the checkpoint the bundle was built from")
    p.add_argument("--steps", type=int, default=8, help="trajectory length (default 8)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--init-from-dit", metavar="LAYOUT", help="as given to convert")
    p = sub.add_parser("calibrate", help="capture a per-stage calibration set from real sampling trajectories",
                       parents=[common])
    p.add_argument("ckpt")
    p.add_argument("-o", "--out", required=True, help="calibration set directory to write")
    p.add_argument("--schedule", help="as for convert (default: the checkpoint's trained schedule, else released)")
    p.add_argument("--batch", type=int, default=2, help="graph batch of the bundles it will calibrate (default 2)")
    p.add_argument("--num-heads", type=int)
    p.add_argument("--semantic-size", type=int)
    p.add_argument("--init-from-dit", metavar="LAYOUT")
    p.add_argument("--num-timesteps", type=int, default=1000)
    p.add_argument("--cfg-channels", choices=("first3", "eps"))
    p.add_argument("--force", action="store_true", help="replace an existing set")
    _calib_capture_args(p)
    p = sub.add_parser("doctor", help="what is installed, which engines and providers are usable, which extra to add",
                       parents=[common])
    p = sub.add_parser("engines", help="build one TensorRT engine per stage into a bundle (on the target GPU)",
                       parents=[common])
    p.add_argument("bundle")
    p.add_argument("--precision", help="per-stage policy as for convert (default: the bundle's)")
    p.add_argument("--engine-cache", help="engine cache directory (default ~/.cache/flexdit-export/tensorrt)")
    p.add_argument("--timing-cache", help="timing cache file (default: in the engine cache)")
    p.add_argument("--force", action="store_true", help="replace engines already in the bundle")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    from flexdit_bundle.manifest import BundleError
    from flexdit_runtime.prompts import PromptError

    from .errors import UserError

    try:
        return {"convert": _convert, "inspect": _inspect, "verify": _verify, "calibrate": _calibrate,
                "engines": _engines, "doctor": _doctor}[args.cmd](args)
    except (UserError, BundleError, PromptError) as e:
        print(f"flexdit-export {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `flexdit-export inspect B | head`: the reader left; not an error
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"flexdit-export {args.cmd}: error: interrupted; nothing was written", file=sys.stderr)
        return 128 + (_SIGNALLED[0] if _SIGNALLED else 2)


def _log(quiet):
    return (lambda *a, **k: None) if quiet else (lambda msg: print(msg, file=sys.stderr))


def _emit(args, summary: dict, text) -> None:
    """The one rule for stdout on every command: --json -> JSON; -q -> nothing; else text."""
    if args.json:
        print(json.dumps(summary, indent=2))
    elif not args.quiet:
        print(text() if callable(text) else text)


def _convert(args) -> int:
    from .convert import ConvertOptions, convert
    from .inspect_bundle import render, summarise

    defaults = {}
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
