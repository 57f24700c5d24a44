"""Fashion-MNIST from its IDX files (``*-idx?-ubyte.gz``, gzip or plain), numpy only.

The default directory is where the Debian package ``dataset-fashion-mnist`` installs it. The
model and the evaluation classifier see the same representation: 1 x 32 x 32 float32 in
[-1, 1], the 28 x 28 image centred with 2 pixels of background (-1) on every side.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from flexdit_export.errors import UserError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_DIR = "FASHION_MNIST_DIR"  # overrides the default directory when set

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]

FILES = {
    ("train", "images"): "train-images-idx3-ubyte", ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte", ("test", "labels"): "t10k-labels-idx1-ubyte",
}
IMAGE_SIZE = 32  # 28 padded by 2 on each side
_PAD = (IMAGE_SIZE - 28) // 2


def default_dir() -> Path:
    return Path(os.environ.get(ENV_DIR) or DEFAULT_DIR)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        p = directory / name
        if p.is_file():
            return p
    raise UserError(f"Fashion-MNIST file {stem}.gz not found in {directory} "
                    f"(install the Debian package dataset-fashion-mnist, set {ENV_DIR} or pass --data-dir)")


def read_idx(path) -> np.ndarray:
    """One IDX file (gzip or raw) -> uint8 array of the declared shape; any defect -> UserError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise UserError(f"IDX file not found: {path}") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read IDX file {path}: {why}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise UserError(f"{path} is not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise UserError(f"{path}: IDX data type 0x{raw[2]:02x} is not unsigned byte")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise UserError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise UserError(f"{path}: IDX header declares {shape} = {size} bytes of data but the file holds "
                        f"{len(raw) - header} (truncated or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_split(split: str = "train", directory=None) -> tuple[np.ndarray, np.ndarray]:
    """-> (images uint8 (N, 28, 28), labels int64 (N,)) of 'train' (60k) or 'test' (10k)."""
    if split not in ("train", "test"):
        raise UserError(f"unknown Fashion-MNIST split {split!r} (train or test)")
    directory = Path(directory) if directory else default_dir()
    if not directory.is_dir():
        raise UserError(f"Fashion-MNIST directory not found: {directory} "
                        f"(install the Debian package dataset-fashion-mnist, set {ENV_DIR} or pass --data-dir)")
    images = read_idx(_find(directory, FILES[(split, "images")]))
    labels = read_idx(_find(directory, FILES[(split, "labels")]))
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise UserError(f"Fashion-MNIST {split} images have shape {images.shape}, expected (N, 28, 28)")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise UserError(f"Fashion-MNIST {split}: {labels.shape[0] if labels.ndim else 0} labels for "
                        f"{images.shape[0]} images")
    if labels.size and labels.max() >= len(FASHION_CLASSES):
        raise UserError(f"Fashion-MNIST {split}: label {int(labels.max())} is outside 0..9")
    return images, labels.astype(np.int64)


def pad_uint8(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 -> (N, 32, 32) uint8 with background 0 around."""
    return np.pad(images, ((0, 0), (_PAD, _PAD), (_PAD, _PAD)), constant_values=0)


def to_model(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, 28, 28) or (N, 32, 32) [or (N, H, W, 1)] -> float32 (N, 1, 32, 32) in [-1, 1]."""
    x = np.asarray(images)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.shape[1:] == (28, 28):
        x = pad_uint8(x)
    if x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected 28x28 or 32x32 images, got {x.shape}")
    return (x.astype(np.float32) / np.float32(127.5) - np.float32(1.0))[:, None]


def load_model_split(split: str = "train", directory=None) -> tuple[np.ndarray, np.ndarray]:
    """-> (float32 (N, 1, 32, 32) in [-1, 1], labels int64)."""
    images, labels = load_split(split, directory)
    return to_model(images), labels
