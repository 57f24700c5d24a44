"""flexdit-fashion: eval | compare, the Fashion-MNIST demo's scoring commands (formerly
``flexdit-export eval`` and ``python -m flexdit_export.quality``).

Every failure a user can cause prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from flexdit_runtime.samplers import SAMPLERS


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line usage error of ``flexdit-run`` / ``flexdit-export``
    (``flexdit_bundle.cli_support.run``): ``PROG CMD: error: MESSAGE (see --help)``, status 2,
    instead of the multi-line usage block. Subcommand parsers inherit the class."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    ap = _Parser(prog="flexdit-fashion", description="Score Fashion-MNIST bundles with the shipped "
                                 "classifier (class accuracy, classifier-feature FD).")
    ap.commands = {}
    sub = ap.add_subparsers(dest="cmd", metavar="command", required=True)
    p = ap.commands["eval"] = sub.add_parser(
        "eval", help="sample N images per class through a bundle and score them: class accuracy and FD")
    p.add_argument("bundle")
    p.add_argument("--per-class", type=int, default=100, help="images per class (default 100)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the bundle's)")
    p.add_argument("--sampler", choices=SAMPLERS, help="default: the bundle's")
    p.add_argument("--cfg-scale", type=float, help="default: the bundle's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt", help="also sample this checkpoint in PyTorch with the same noise and compare")
    p.add_argument("--json", action="store_true")
    _data_args(p)
    p = ap.commands["compare"] = sub.add_parser(
        "compare", help="sample fp32 and each precision policy from the same noise; judge each against fp32 with the "
                        "end-to-end bars")
    p.add_argument("bundle", help="a bundle holding the precisions the policies name (convert --extra-precisions)")
    p.add_argument("--policies", nargs="+", required=True,
                   help="precision specs, e.g. fp16 int8 'int8:stages=0-2,fp16:stages=3'")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--steps", type=int)
    p.add_argument("--sampler", choices=SAMPLERS, help="default: the bundle's")
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

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the subcommand, as its other usage errors are
        parser.commands[args.cmd].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return {"eval": _eval, "compare": _compare}[args.cmd](args)
    except (UserError, BundleError) as e:
        print(f"flexdit-fashion {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flexdit-fashion {args.cmd}: error: interrupted; nothing was written", file=sys.stderr)
        return 130


def _check_common(args) -> None:
    """What needs no bundle, refused before anything is loaded (the rest, --seed, --steps,
    --cfg-scale, --threads, --ckpt, --policies, is checked by evaluate_bundle / compare_policies
    before they sample)."""
    from flexdit_export.errors import UserError

    if args.per_class < 1:
        raise UserError(f"--per-class must be at least 1, got {args.per_class}")


def _check_writable(option: str, path: str) -> None:
    """Refuse, before any sampling, an output file that could not be written: its directory must
    exist and take a new file (probed with an empty temporary file, removed at once: permission
    bits do not tell, e.g. for root in /proc), and the path must not be a directory."""
    from flexdit_export.errors import UserError

    parent = os.path.dirname(os.path.abspath(path))
    why = None
    if os.path.isdir(path) or path.endswith(os.sep):
        why = "it names a directory, not a file"
    else:
        try:
            fd, probe = tempfile.mkstemp(prefix=".flexdit-fashion-probe-", dir=parent)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            why = f"cannot create a file in {parent} ({e.strerror or e})"
    if why:
        raise UserError(f"cannot write {option} {path}: {why}")


def _write_atomically(option: str, path: str, text: str) -> None:
    """``text`` into ``path`` through a temporary sibling renamed over it: a reader (or a failure
    midway) never sees half a file."""
    from flexdit_bundle.files import umask_mode
    from flexdit_export.errors import UserError

    parent = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, umask_mode("file"))
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise UserError(f"cannot write {option} {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _eval(args) -> int:
    from .evaluate import evaluate_bundle

    _check_common(args)
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

    _check_common(a)
    if a.json:
        _check_writable("--json", a.json)
    r = compare_policies(load_bundle(a.bundle), {p: p for p in a.policies}, a.per_class, a.seed, a.steps, a.threads,
                         sampler=a.sampler,
                         log=lambda m: print(m, file=sys.stderr, flush=True), classifier_dir=a.classifier,
                         data_dir=a.data_dir)
    print("| policy | class accuracy | FD | accuracy drop (points) | FD ratio | bar | verdict |")
    print("|---|---|---|---|---|---|---|")
    print(f"| fp32 | {r['fp32']['class_accuracy']:.3f} | {r['fp32']['fd']:.2f} | | | | |")
    for name, p in r["policies"].items():
        print(f"| {name} | {p['class_accuracy']:.3f} | {p['fd']:.2f} | {p.get('accuracy_drop', 0) * 100:+.1f} | "
              f"{p.get('fd_ratio', 1):.3f} | {p.get('bar', '')} | {'pass' if p['passed'] else 'FAIL'} |")
    if a.json:
        _write_atomically("--json", a.json, json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
