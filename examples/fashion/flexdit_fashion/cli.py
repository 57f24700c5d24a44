"""flexdit-fashion: eval | compare, the Fashion-MNIST demo's scoring commands (formerly
``flexdit-export eval`` and ``python -m flexdit_export.quality``).

Every failure a user can cause prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys


def build_parser():
    ap = argparse.ArgumentParser(prog="flexdit-fashion", description="Score Fashion-MNIST bundles with the shipped "
                                 "classifier (class accuracy, classifier-feature FD).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("eval", help="sample N images per class through a bundle and score them: class accuracy and FD")
    p.add_argument("bundle")
    p.add_argument("--per-class", type=int, default=100, help="images per class (default 100)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the bundle's)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), help="default: the bundle's")
    p.add_argument("--cfg-scale", type=float, help="default: the bundle's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt", help="also sample this checkpoint in PyTorch with the same noise and compare")
    p.add_argument("--json", action="store_true")
    _data_args(p)
    p = sub.add_parser("compare", help="sample fp32 and each precision policy from the same noise; judge each "
                                       "against fp32 with the end-to-end bars")
    p.add_argument("bundle", help="a bundle holding the precisions the policies name (convert --extra-precisions)")
    p.add_argument("--policies", nargs="+", required=True,
                   help="precision specs, e.g. fp16 int8 'int8:stages=0-2,fp16:stages=3'")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", help="write the report here")
    _data_args(p)
    return ap


def _data_args(p):
    p.add_argument("--classifier", help="classifier directory (default: $FLEXDIT_FASHION_CLASSIFIER, else the "
                                        "classifier shipped with flexdit_fashion)")
    p.add_argument("--data-dir", help="Fashion-MNIST IDX directory (default: $FASHION_MNIST_DIR, else "
                                      "/usr/share/datasets/fashion-mnist)")


def main(argv=None) -> int:
    from flexdit_bundle.manifest import BundleError
    from flexdit_export.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        return {"eval": _eval, "compare": _compare}[args.cmd](args)
    except (UserError, BundleError) as e:
        print(f"flexdit-fashion {args.cmd}: error: {e}", file=sys.stderr)
        return 2


def _eval(args) -> int:
    from flexdit_export.errors import UserError

    from .evaluate import evaluate_bundle

    if args.per_class < 1:
        raise UserError(f"--per-class must be at least 1, got {args.per_class}")
    report = evaluate_bundle(args.bundle, per_class=args.per_class, steps=args.steps, sampler=args.sampler,
                             cfg_scale=args.cfg_scale, seed=args.seed, classifier_dir=args.classifier,
                             reference_ckpt=args.ckpt, data_dir=args.data_dir)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            if isinstance(value, (int, float, str)):
                print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def _compare(a) -> int:
    from flexdit_runtime import load_bundle

    from .quality import compare_policies

    r = compare_policies(load_bundle(a.bundle), {p: p for p in a.policies}, a.per_class, a.seed, a.steps, a.threads,
                         log=lambda m: print(m, file=sys.stderr, flush=True), classifier_dir=a.classifier,
                         data_dir=a.data_dir)
    print("| policy | class accuracy | FD | accuracy drop (points) | FD ratio | bar | verdict |")
    print("|---|---|---|---|---|---|---|")
    print(f"| fp32 | {r['fp32']['class_accuracy']:.3f} | {r['fp32']['fd']:.2f} | | | | |")
    for name, p in r["policies"].items():
        print(f"| {name} | {p['class_accuracy']:.3f} | {p['fd']:.2f} | {p.get('accuracy_drop', 0) * 100:+.1f} | "
              f"{p.get('fd_ratio', 1):.3f} | {p.get('bar', '')} | {'pass' if p['passed'] else 'FAIL'} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
