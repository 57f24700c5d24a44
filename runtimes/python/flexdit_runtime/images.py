"""Model output -> uint8 images, PNG files and a labelled-free grid."""

from __future__ import annotations

import math

import numpy as np


def to_uint8(x: np.ndarray, value_range=(-1.0, 1.0)) -> np.ndarray:
    """(B, C, H, W) float in value_range -> (B, H, W, C) uint8; C in (1, 3) kept, else the
    first three channels min-max scaled (a preview of latents)."""
    lo, hi = value_range
    if x.shape[1] not in (1, 3):
        x = x[:, :3]
        mn = x.min(axis=(1, 2, 3), keepdims=True)
        mx = x.max(axis=(1, 2, 3), keepdims=True)
        x = (x - mn) / np.maximum(mx - mn, 1e-8) * (hi - lo) + lo
    img = np.clip((x - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return img.transpose(0, 2, 3, 1)


def png_bytes(img: np.ndarray) -> bytes:
    """One (H, W, C) uint8 image as PNG bytes: what ``save_png`` writes (and the server sends)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
    return buf.getvalue()


def save_png(img: np.ndarray, path) -> None:
    with open(path, "wb") as f:
        f.write(png_bytes(img))


GRID_TILE = 128  # the default grid.png upscaling makes each image at least this many pixels wide and high
GRID_SCALES = range(1, 17)


def grid_scale(h: int, w: int) -> int:
    """The default integer upscaling of grid.png: small models' images (e.g. 32x32: 4) become
    viewable, images of GRID_TILE pixels or more keep their size."""
    return max(1, -(-GRID_TILE // max(h, w)))


def grid(imgs: np.ndarray, cols: int | None = None, pad: int = 2, scale: int | None = None) -> np.ndarray:
    """The images in rows of ``cols`` on white, ``pad`` pixels apart, each pixel then a
    ``scale`` x ``scale`` block (nearest neighbour: every runtime draws the same bytes; default
    ``grid_scale``)."""
    n, h, w, c = imgs.shape
    cols = cols or min(n, max(1, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, im in enumerate(imgs):
        r, q = divmod(i, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = im
    scale = scale or grid_scale(h, w)
    return out.repeat(scale, axis=0).repeat(scale, axis=1)
