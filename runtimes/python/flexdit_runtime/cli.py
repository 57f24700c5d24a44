"""flexdit-run: prompts.txt -> one PNG per prompt plus a grid, from a bundle.

Every failure a user can cause ends with one line on stderr and exit code 2; the output
directory only receives files once all images are done.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import sys
import time
from pathlib import Path

import numpy as np

import click

from flexdit_bundle.files import ForeignEntries, StagingDirectory, entry_label, os_error_message, write_problem
from flexdit_bundle.manifest import BundleError

from flexdit_bundle.cli_support import FLOAT, INT, Choice, output_options, run
from .device import DEVICES
from .images import GRID_SCALES, GRID_TILE, grid, save_png
from .pipeline import Pipeline
from .prompts import PromptError, read_prompts
from .samplers import SAMPLERS
from .sampling_params import read_init_noise
from .sampling_params import SPACINGS
from .settings import RuntimeSettings


class Progress:
    """A dependency-free progress bar on stderr. When stderr is not a terminal (a log file, a
    CI job) it writes no carriage returns: one plain line every ``every`` seconds, with the
    estimated time left, and a final line."""

    def __init__(self, total: int, label: str, enabled: bool = True, every: float = 30.0):
        self.total, self.done, self.label = total, 0, label
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.perf_counter()
        self.every = every

    def __call__(self, n: int = 1):
        self.done += n
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = self.done / max(1e-9, now - self.start)
        if self.tty:
            bar = "#" * int(self.done / max(1, self.total) * 30)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {self.done}/{self.total} steps {rate:.1f} it/s")
            sys.stderr.flush()
        elif now - self.last >= self.every and self.done < self.total:
            self.last = now
            left = (self.total - self.done) / max(rate, 1e-9)
            sys.stderr.write(f"{self.label}: {self.done}/{self.total} steps ({self.done / self.total:.0%}), "
                             f"{rate:.1f} it/s, about {left:.0f} s left\n")
            sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write(("\n" if self.tty else "") + f"{self.label}: {self.done} steps in "
                             f"{time.perf_counter() - self.start:.1f}s\n")


DEFAULT_OUT = "flexdit-images"
OUR_FILES = re.compile(r"(\d{3,}_[A-Za-z0-9_-]*\.png|grid\.png|samples\.npy)")


def _backend_choices() -> tuple:
    """The engine kinds this runtime has (``stage_engine.backend_choices()`` where it exists)."""
    from . import stage_engine

    fn = getattr(stage_engine, "backend_choices", None)
    return tuple(fn()) if fn else tuple(sorted(stage_engine.ENGINE_KINDS))


def version_text() -> str:
    from importlib import metadata

    v = "unknown (not installed)"
    for dist in ("flexdit-runtime", "flexdit-export"):  # the runtime alone, or the development install
        try:
            v = metadata.version(dist)
            break
        except metadata.PackageNotFoundError:
            pass
    try:
        import onnxruntime as ort
        ort_v = f"onnxruntime {ort.__version__} (providers: {', '.join(ort.get_available_providers())})"
    except ImportError:
        ort_v = "onnxruntime missing"
    return f"flexdit-run {v}; {ort_v}; numpy {np.__version__}; engines: {', '.join(_backend_choices())}"


def _version(ctx, param, value):
    if value and not ctx.resilient_parsing:
        click.echo(version_text())
        ctx.exit(0)


@click.command(name="flexdit-run", help=__doc__.splitlines()[0], context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("prompts", type=click.Path())
@click.option("--bundle", required=True, type=click.Path(), help="bundle directory written by flexdit-export convert")
@click.option("-o", "--out", help="output directory, new or empty (default: a fresh flexdit-images/run-DATE-TIME per run)")
@click.option("--force", is_flag=True, help="replace the files of an earlier run in a non-empty -o (its PNGs and "
                                            "samples.npy; anything else there stops the run)")
@click.option("--steps", type=INT, help="sampling steps (default: the bundle's)")
@click.option("--sampler", type=Choice(SAMPLERS), help="default: the bundle's (ddpm); dpmpp-2m, unipc and euler "
                                                        "are few-step solvers (e.g. 20 steps)")
@click.option("--eta", type=FLOAT, help="DDIM eta in [0, 1] (0 = deterministic)")
@click.option("--cfg-scale", type=FLOAT, help="classifier-free guidance scale; <= 1 disables guidance")
@click.option("--clip-denoised/--no-clip-denoised", default=None,
              help="clip the predicted x0 to [-1, 1] each step (default: the bundle's; pixel-space models)")
@click.option("--spacing", type=Choice(SPACINGS), default=None,
              help="timestep placement: equal sections (ddpm/ddim default), DDIM striding, or linspace "
                   "(dpmpp-2m/unipc/euler default, as diffusers; euler takes only linspace)")
@click.option("--seed", type=INT, default=0, help="noise seed (image i uses default_rng([seed, i]))")
@click.option("--init-noise", type=click.Path(), help=".npy of x_T, shape (N, C, H, W) or (C, H, W)")
@click.option("--batch", type=INT, help="images denoised together (default: what one graph call holds)")
@click.option("--providers", help="comma-separated ONNX Runtime providers, e.g. cuda,cpu (default: best available)")
@click.option("--threads", type=INT, help="intra-op threads (capped at the usable cores)")
@click.option("--precision", help="override the bundle's per-stage precision policy: one precision for every stage "
                                  "(fp32, fp16, int8, int8-dynamic, int8-static, fp8) or per stage, e.g. "
                                  "'int8:stages=0-2,fp16:stages=3' (unnamed stages keep the bundle's default)")
@click.option("--backend", type=Choice(_backend_choices()), default=None,
              help="stage engine kind: onnx (ONNX Runtime, default), openvino (OpenVINO CPU engines from the "
                   "fp32 graphs: fp32, bf16, int8), aoti (the bundle's AOTInductor packages), tensorrt (the "
                   "bundle's TensorRT engines), auto (per stage, the fastest installed CPU engine, timed here)")
@click.option("--device", type=Choice(DEVICES), default=None,
              help="run on this device: cpu (ONNX Runtime's CPU provider, or AOTI packages built for the CPU) or "
                   "cuda (the bundle's AOTI packages for CUDA, else ONNX Runtime's CUDA provider); "
                   "default: --backend/--providers decide")
@click.option("--save-npy", is_flag=True, help="also write the final samples as samples.npy")
@click.option("--grid-scale", type=INT, help=f"draw grid.png this many times larger ({GRID_SCALES[0]}.."
                                              f"{GRID_SCALES[-1]}, nearest neighbour; default: enough for "
                                              f"{GRID_TILE}-pixel images, e.g. 4 for 32x32, 1 keeps the size)")
@output_options
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_version,
              help="versions of the runtime, ONNX Runtime (and its providers) and the engine kinds")
def command(**kwargs) -> int:
    args = argparse.Namespace(**kwargs)
    args.json = args.json_out
    try:
        return _run(args)
    except (BundleError, PromptError) as e:
        print(f"flexdit-run: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print("flexdit-run: error: out of memory (try a smaller --batch)", file=sys.stderr)
        return 2
    except OSError as e:  # a path the system refuses (too long, a loop, no space): the user's to fix
        print(f"flexdit-run: error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flexdit-run: interrupted", file=sys.stderr)
        return 130


def main(argv=None) -> int:
    return run(command, "flexdit-run", argv)


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", label).strip("_")[:40] or "class"


def fresh_output_dir(root: Path = Path(DEFAULT_OUT)) -> Path:
    """``root/run-YYYYmmdd-HHMMSS`` (``-2``, ``-3``... when taken): every run its own directory."""
    base = root / time.strftime("run-%Y%m%d-%H%M%S")
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _ours(entry: Path) -> bool:
    """An earlier run's output, which --force may replace: a regular file named as flexdit-run
    names them (a directory or link named grid.png is the user's)."""
    return bool(OUR_FILES.fullmatch(entry.name)) and stat.S_ISREG(entry.lstat().st_mode)


def _foreign_message(out: Path, labels: list, end: str) -> str:
    return (f"output directory {out} holds files flexdit-run did not write "
            f"({', '.join(labels[:3])}{', ...' if len(labels) > 3 else ''}); {end}")


def check_output_dir(out: Path, force: bool = False) -> None:
    """Refuse, before any work, an output path we could not write: it must be a directory (not a
    symbolic link: replacing it would cut the link, writing through it is not what -o says) or
    not exist, and the place it is written must take a new directory (``write_problem``). A
    non-empty directory needs ``force`` (stale PNGs of an earlier run must not sit beside new
    ones), and even then may hold only an earlier run's files (checked again when publishing)."""
    if out.is_symlink():
        raise BundleError(f"output path {out} is a symbolic link; refusing to replace or write through it")
    if out.exists() and not out.is_dir():
        raise BundleError(f"output path {out} exists and is not a directory")
    if out.is_dir():
        try:
            entries = sorted(out.iterdir())
        except OSError as e:
            raise BundleError(f"cannot write the output directory {out}: {e.strerror or e}") from None
        if entries and not force:
            raise BundleError(f"output directory {out} is not empty (use --force to replace its images, "
                              "or give a new -o)")
        foreign = [entry_label(e) for e in entries if not _ours(e)]
        if foreign:
            raise BundleError(_foreign_message(out, foreign, "refusing to replace it"))
    problem = write_problem(out)
    if problem:
        raise BundleError(problem)


def write_outputs(out: Path, res, save_npy: bool, replace: bool = False, grid_scale: int | None = None) -> None:
    """PNGs, grid and samples into a staging directory, then published in one rename (``replace``:
    swapped with the earlier run's directory, so no stale image survives; where ``out`` cannot be
    replaced, e.g. a mount point, moved into it file by file). Only an earlier run's files are
    ever replaced: anything else found when publishing stops the run with nothing changed. On
    any failure nothing is left behind, not even the parent directories this call created."""
    created = [a for a in [out.absolute(), *out.absolute().parents] if not a.exists()]
    staging = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = StagingDirectory(out)
        tmp = staging.path
        for i, (img, label) in enumerate(zip(res.images, res.labels)):
            save_png(img, tmp / f"{i:03d}_{_safe(label)}.png")
        save_png(grid(res.images, scale=grid_scale), tmp / "grid.png")
        if save_npy:
            np.save(tmp / "samples.npy", res.samples)
        empty = out.is_dir() and not any(e != tmp for e in out.iterdir())
        staging.publish(replace=replace or empty, replaceable=_ours if replace else lambda e: False)
    except (FileExistsError, ForeignEntries) as e:
        if isinstance(e, ForeignEntries) and replace:
            raise BundleError(_foreign_message(out, e.labels, "nothing was written")) from None
        raise BundleError(f"output directory {out} was created by another process meanwhile; nothing was "
                          "written (use --force to replace it)") from None
    except OSError as e:
        raise BundleError(f"cannot write the output directory {out}: {e.strerror or e}") from None
    finally:
        if staging is not None:
            staging.discard()
        if not out.exists():
            for d in created[1:]:  # deepest first; only directories this call made, and only if empty
                try:
                    d.rmdir()
                except OSError:
                    break


def _run(args) -> int:
    if args.grid_scale is not None and args.grid_scale not in GRID_SCALES:
        raise BundleError(f"--grid-scale must be in {GRID_SCALES[0]}..{GRID_SCALES[-1]}, got {args.grid_scale}")
    prompts = read_prompts(args.prompts)
    out = Path(args.out) if args.out is not None else fresh_output_dir()
    check_output_dir(out, args.force)
    # this process makes all its sessions through the runtime: they share one thread pool
    settings = RuntimeSettings(providers=args.providers, threads=args.threads, shared_thread_pool=True)
    for note in settings.notes:
        if not args.quiet:
            print(f"flexdit-run: note: {note}", file=sys.stderr)
    pipe = Pipeline.from_bundle(args.bundle, precision=args.precision, backend=args.backend, settings=settings,
                                device=args.device)
    ids = [pipe.classes.resolve(p, f"{args.prompts}: ") for p in prompts]
    # read once the bundle says how large x_T is: no more bytes than that are read
    init = read_init_noise(args.init_noise, len(ids), pipe.model.latent_shape) if args.init_noise else None
    # the checks Pipeline makes anyway, before the progress bar
    params = pipe.model.params(steps=args.steps, sampler=args.sampler, cfg_scale=args.cfg_scale, eta=args.eta,
                               spacing=args.spacing, clip_denoised=args.clip_denoised)
    groups = -(-len(ids) // (args.batch if args.batch and args.batch > 0 else pipe.capacity(params.cfg_scale)))
    bar = Progress(params.steps * groups, "sampling", not args.quiet)
    res = pipe(ids, steps=params.steps, sampler=params.sampler, cfg_scale=params.cfg_scale, eta=args.eta,
               seed=args.seed, init_noise=init, batch=args.batch, spacing=params.spacing, progress=bar,
               clip_denoised=params.clip_denoised)
    bar.close()
    write_outputs(out, res, args.save_npy, replace=args.force, grid_scale=args.grid_scale)
    engines = pipe.runner.describe()
    total = res.seconds
    if args.json:
        print(json.dumps({"out": str(out), "images": len(res.images), "labels": list(res.labels), "device": args.device,
                          "seconds": total, "stage_seconds": {str(k): v for k, v in sorted(res.stage_seconds.items())},
                          "decoder_seconds": res.decoder_seconds,
                          "engines": [{k: d.get(k) for k in ("stage", "kind", "precision", "batch", "path")}
                                      for d in engines]}, indent=2))
    elif not args.quiet:
        shares = ", ".join(f"stage {sid}: {sec / total:.0%}" for sid, sec in sorted(res.stage_seconds.items()))
        if res.decoder_seconds:
            shares += f", decoder: {res.decoder_seconds / total:.0%}"
        print(f"wrote {len(res.images)} images and grid.png to {out}/")
        print("precision per stage: " + ", ".join(f"{i}: {p}" for i, p in enumerate(pipe.runner.precisions)))
        print("engine per stage: " + ", ".join(f"{d.get('stage', i)}: {d.get('kind')} {d.get('precision')}"
                                               for i, d in enumerate(engines)))
        print(f"{total / len(res.images):.2f} s per image ({total:.1f} s total; {shares})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
