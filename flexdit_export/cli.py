"""flexdit-export: convert | inspect | verify.

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
    p.add_argument("--json", action="store_true", help="print the written manifest summary as JSON")


def build_parser():
    ap = argparse.ArgumentParser(prog="flexdit-export", description="Compile FlexDiT/DiT checkpoints into bundles.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _convert_args(sub.add_parser("convert", help="checkpoint -> bundle (one static graph per schedule stage)"))
    p = sub.add_parser("inspect", help="stages, token counts, files, sizes, parity, precision")
    p.add_argument("bundle")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("verify", help="checksums and schema; with --ckpt, stage and trajectory parity vs PyTorch")
    p.add_argument("bundle")
    p.add_argument("--ckpt", help="the checkpoint the bundle was built from")
    p.add_argument("--steps", type=int, default=8, help="trajectory length (default 8)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--init-from-dit", metavar="LAYOUT", help="as given to convert")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("eval", help="sample N images per class through a bundle and score them with the shipped "
                                    "Fashion-MNIST classifier: class accuracy and classifier-feature FD")
    p.add_argument("bundle")
    p.add_argument("--per-class", type=int, default=100, help="images per class (default 100)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the bundle's)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), help="default: the bundle's")
    p.add_argument("--cfg-scale", type=float, help="default: the bundle's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classifier", help="classifier directory (default: models/fashion-classifier)")
    p.add_argument("--ckpt", help="also sample this checkpoint in PyTorch with the same noise and compare")
    p.add_argument("--json", action="store_true")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from flexdit_runtime.manifest import BundleError
    from flexdit_runtime.prompts import PromptError

    from .errors import UserError

    try:
        return {"convert": _convert, "inspect": _inspect, "verify": _verify, "eval": _eval}[args.cmd](args)
    except (UserError, BundleError, PromptError) as e:
        print(f"flexdit-export {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flexdit-export: interrupted", file=sys.stderr)
        return 130


def _log(quiet):
    return (lambda *a, **k: None) if quiet else (lambda msg: print(msg, file=sys.stderr))


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
                          parity_tol=args.parity_tol, seed=args.seed, force=args.force, defaults=defaults)
    out = convert(args.ckpt, args.out, opts, log=_log(False))
    s = summarise(out, verify_checksums=False)
    print(json.dumps(s, indent=2) if args.json else render(s))
    return 0


def _inspect(args) -> int:
    from .inspect_bundle import render, summarise

    s = summarise(args.bundle)
    print(json.dumps(s, indent=2) if args.json else render(s))
    return 0


def _verify(args) -> int:
    from .verify import verify

    if args.steps < 1:
        from .errors import UserError
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    report = verify(args.bundle, args.ckpt, steps=args.steps, sampler=args.sampler,
                    init_from_dit=args.init_from_dit, log=_log(args.json))
    if args.json:
        print(json.dumps(report, indent=2))
    elif report["ok"]:
        print("verify: ok")
    if not report["ok"]:
        if not args.json:
            print("flexdit-export verify: error: the bundle does not match the checkpoint (see above)", file=sys.stderr)
        return 1
    return 0


def _eval(args) -> int:
    from .errors import UserError
    from .evaluate import evaluate_bundle

    if args.per_class < 1:
        raise UserError(f"--per-class must be at least 1, got {args.per_class}")
    report = evaluate_bundle(args.bundle, per_class=args.per_class, steps=args.steps, sampler=args.sampler,
                             cfg_scale=args.cfg_scale, seed=args.seed, classifier_dir=args.classifier,
                             reference_ckpt=args.ckpt)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            if isinstance(value, (int, float, str)):
                print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
