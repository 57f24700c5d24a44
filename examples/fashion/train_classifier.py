#!/usr/bin/env python
"""Train the Fashion-MNIST classifier that judges generated images (flexdit_fashion.evaluate).

It sees exactly what the generator produces: 1 x 32 x 32 in [-1, 1], the 28 x 28 image
padded with background. Augmentation: random horizontal flips and shifts of up to 2 px.
Writes ``classifier.safetensors`` and ``metrics.json`` (test accuracy on all 10,000 test
images, measured with the same code path the evaluator uses) into ``--out``.

    python examples/fashion/train_classifier.py --out examples/fashion/flexdit_fashion/classifier
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flexdit_export.errors import UserError
from flexdit_fashion.datasets import FASHION_CLASSES, load_model_split
from flexdit_fashion.evaluate import (CLASSIFIER_METRICS, CLASSIFIER_WEIGHTS, PACKAGED_CLASSIFIER_DIR,
                                      FashionClassifier, class_accuracy)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))  # the 2 px border is background, so rolling is a shift
    return x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(PACKAGED_CLASSIFIER_DIR),
                    help="default: the classifier shipped with flexdit_fashion (package data)")
    ap.add_argument("--data-dir")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, help="train on the first N images only (smoke tests)")
    a = ap.parse_args(argv)
    command = "python " + " ".join(shlex.quote(x) for x in [sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed + 1)
    x_train, y_train = load_model_split("train", a.data_dir)
    x_test, y_test = load_model_split("test", a.data_dir)
    if a.limit:
        x_train, y_train = x_train[:a.limit], y_train[:a.limit]
    x_train, y_train = torch.from_numpy(x_train), torch.from_numpy(y_train)
    arch = {"num_classes": len(FASHION_CLASSES), "width": a.width}
    model = FashionClassifier(**arch)
    steps_per_epoch = (len(x_train) + a.batch - 1) // a.batch
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.epochs * steps_per_epoch)
    start = time.perf_counter()
    from tqdm import tqdm

    for epoch in range(a.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{a.epochs}", dynamic_ncols=True)
        for i in bar:
            idx = perm[i * a.batch:(i + 1) * a.batch]
            logits = model(augment(x_train[idx], gen))
            loss = F.cross_entropy(logits, y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if i % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        model.eval()
        acc = class_accuracy(x_test, y_test, model)
        print(f"epoch {epoch + 1}: test accuracy {acc:.4f}", file=sys.stderr)
    wall = time.perf_counter() - start
    model.eval()
    test_acc, per_class = class_accuracy(x_test, y_test, model, per_class=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / CLASSIFIER_WEIGHTS))
    metrics = {"test_accuracy": test_acc, "test_images": int(len(y_test)), "per_class_test_accuracy": per_class,
               "architecture": arch, "input": "1x32x32 float in [-1, 1], 28x28 padded by 2 px of background (-1)",
               "feature_dim": 128, "class_names": FASHION_CLASSES,
               "training": {"command": command, "seed": a.seed, "epochs": a.epochs, "batch": a.batch, "lr": a.lr,
                            "train_images": int(len(x_train)), "wall_time_s": round(wall, 1), "threads": a.threads,
                            "torch": torch.__version__,
                            "recipe": "AdamW (wd 5e-4) + one-cycle LR, cross-entropy with label smoothing 0.05, "
                                      "random horizontal flips and +-2 px shifts"}}
    (out / CLASSIFIER_METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "README.md").write_text(
        "# fashion-classifier: the judge of generated Fashion-MNIST images\n\n"
        "A small CNN (3 conv blocks -> 128-d features -> 10 logits, `flexdit_fashion.evaluate.FashionClassifier`) on "
        "the 1x32x32 [-1, 1] representation the generator uses (28x28 padded by 2 px of background). "
        "`flexdit_fashion.evaluate` uses its predictions for class accuracy and its 128-d penultimate features for "
        "the Frechet distance (FD; not Inception FID).\n\n"
        f"Test accuracy: **{test_acc:.4f}** on all {len(y_test)} Fashion-MNIST test images "
        f"(per class in metrics.json).\n\n"
        f"Trained with (from the repository root, {wall / 60:.1f} min on {a.threads} CPU threads, seed {a.seed}):\n\n"
        f"    {command}\n\n"
        f"{metrics['training']['recipe']}; {a.epochs} epochs of batch {a.batch}, peak LR {a.lr}.\n")
    print(f"saved {out}: test accuracy {test_acc:.4f} ({wall / 60:.1f} min)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"train_classifier: error: {e}", file=sys.stderr)
        sys.exit(2)
