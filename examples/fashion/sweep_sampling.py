#!/usr/bin/env python
"""Pick the runtime defaults (sampler, steps, CFG scale) of a Fashion-MNIST checkpoint.

Samples ``--per-class`` images per class in PyTorch (flexdit_export.reference_sampler, the
same arithmetic the runtime uses) under the checkpoint's trained schedule for every setting
and prints class accuracy and classifier-feature FD (not Inception FID) for each, with the
real-vs-real baseline at the same sample size.

    python examples/fashion/sweep_sampling.py models/fashion-flexdit --per-class 20 \\
        --settings ddim:50:1.5,ddim:50:3,ddpm:100:1.5,ddpm:100:3
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from flexdit_runtime.images import to_uint8

from flexdit_export.checkpoints import load_checkpoint
from flexdit_export.reference_sampler import reference_sample
from flexdit_export.schedule import parse_schedule
from flexdit_fashion.evaluate import (_initial_noise, _noise_source, _test_reference, class_accuracy, features,
                                      frechet_distance, load_classifier, real_baseline)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--settings", default="ddim:50:1.5,ddim:50:3,ddpm:100:1.5,ddpm:100:3",
                    help="comma-separated sampler:steps:cfg_scale")
    ap.add_argument("--schedule", help="default: the checkpoint's trained schedule (config.json 'schedule')")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    ck = load_checkpoint(a.ckpt)
    cfg = ck.config
    meta = json.loads((__import__("pathlib").Path(a.ckpt) / "config.json").read_text())
    spec = a.schedule or meta.get("schedule", "released")
    stages = [(s.t_min, s.t_max, s.sparse_grid) for s in
              parse_schedule(spec, T=1000, grid=cfg.grid, family=cfg.family, semantic_size=cfg.semantic_size)]
    model = ck.build()
    classifier = load_classifier()[0]
    test_feats, _ = _test_reference(None, None)
    labels = np.repeat(np.arange(10), a.per_class)
    n, shape = len(labels), (cfg.in_channels, cfg.input_size, cfg.input_size)
    base = real_baseline(n, a.seed)
    print(f"schedule {spec}; {n} images; real-vs-real baseline: acc {base['class_accuracy']:.3f} FD {base['fd']:.3f}")
    rows = []
    for item in a.settings.split(","):
        sampler, steps, scale = item.split(":")
        t0 = time.perf_counter()
        out = reference_sample(model, stages, _initial_noise(a.seed, n, shape), labels, steps=int(steps),
                               sampler=sampler,
                               cfg_scale=float(scale), cfg_channels="eps" if cfg.in_channels < 4 else "first3",
                               noise_fn=_noise_source(a.seed, n, shape))
        imgs = to_uint8(out)
        row = {"sampler": sampler, "steps": int(steps), "cfg_scale": float(scale),
               "class_accuracy": class_accuracy(imgs, labels, classifier),
               "fd": frechet_distance(features(imgs, classifier), test_feats), "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{sampler:5} {steps:>4} steps cfg {float(scale):4.1f}: acc {row['class_accuracy']:.3f} "
              f"FD {row['fd']:.3f} ({row['seconds']:.0f}s)", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"schedule": spec, "n_images": n, "real_baseline": base, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
