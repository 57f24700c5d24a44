"""Class names for the manifest: from a file, the checkpoint, or ImageNet's 1000 names
(WordNet lemmas in synset order, the label order DiT was trained with)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import UserError


def imagenet_names() -> list[str]:
    return resources.files("flexdit_export.data").joinpath("imagenet_classes.txt").read_text().splitlines()


def read_class_names(path) -> list[str]:
    try:
        names = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise UserError(f"class-names file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read class-names file {path}: {e}") from None
    return [n for n in names if n and not n.startswith("#")]


def choose_class_names(num_classes: int, file=None, from_checkpoint=None) -> list[str] | None:
    if file:
        names = read_class_names(file)
        if len(names) != num_classes:
            raise UserError(f"class-names file {file} has {len(names)} names but the model has {num_classes} classes")
        return names
    if from_checkpoint:
        if len(from_checkpoint) != num_classes:
            raise UserError(f"checkpoint lists {len(from_checkpoint)} class names for {num_classes} classes")
        return list(from_checkpoint)
    if num_classes == 1000:
        return imagenet_names()
    return None
