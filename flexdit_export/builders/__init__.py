"""Artifact builders, keyed by (backend, precision). Each module holds one family and lists its
builder classes in ``BUILDERS``; a new backend is a new module added to ``_FAMILIES``, never a
branch in ``convert``. The contract is in ``base``."""

from __future__ import annotations

from ..errors import UserError
from . import aoti, onnx_fp8, onnx_fp16, onnx_fp32, onnx_int8, openvino_int8, tensorrt, torchscript
from .base import BuildContext, Builder, Component

_FAMILIES = (onnx_fp32, torchscript, onnx_fp16, onnx_int8, onnx_fp8, tensorrt, openvino_int8, aoti)
REGISTRY: dict[tuple[str, str], type[Builder]] = {(b.backend, b.precision): b for m in _FAMILIES for b in m.BUILDERS}


def builder_for(backend: str, precision: str) -> type[Builder]:
    try:
        return REGISTRY[(backend, precision)]
    except KeyError:
        where = "" if backend == "onnx" else f" on {backend}"
        raise UserError(f"no builder for precision {precision}{where}") from None


__all__ = ["BuildContext", "Builder", "Component", "REGISTRY", "builder_for"]
