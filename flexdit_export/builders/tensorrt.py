"""TensorRT engines of a stage, one per precision, from the stage's ONNX graph of that
precision (``flexdit_export.tensorrt_build``: engine cache, timing cache, engine header).
int8-dynamic graphs use ONNX Runtime-only operators; the plan refuses them before this runs."""

from __future__ import annotations

from flexdit_bundle.engine_header import read_header

from ..errors import UserError
from .base import Builder


class TensorRTEngine(Builder):
    backend = "tensorrt"

    def build(self, comp, ctx):
        from ..tensorrt_build import copy_engine  # needs the runtime's TensorRT probe: only when asked for

        plan = ctx.plan
        src = comp.source("onnx", self.precision)[1]
        return [copy_engine(ctx.writer, comp.what, src, self.precision, dict(plan.tensorrt_env), plan.engine_cache,
                            plan.timing_cache, ctx.log)]

    def check(self, comp, ctx, files):
        """The engine (from the cache) must be the one of this graph and precision; its numerics
        can only be checked on the target GPU (``flexdit-export verify`` there)."""
        header, _ = read_header(files[0])
        src = comp.source("onnx", self.precision)[1]
        if header.get("source_sha256") != src["sha256"] or header.get("precision") != self.precision:
            raise UserError(f"{comp.what}: the cached TensorRT engine {files[0].name} was built from another graph "
                            "or precision; clear the engine cache")
        return header

    def describe(self, comp, ctx, files, record):
        from ..tensorrt_build import engine_artifact

        return engine_artifact(ctx.writer, files[0], self.precision, comp.source("onnx", self.precision)[1])


def _engine(precision: str) -> type:
    return type(f"TensorRTEngine_{precision.replace('-', '_')}", (TensorRTEngine,), {"precision": precision})


BUILDERS = tuple(_engine(p) for p in ("fp32", "fp16", "int8-static", "fp8"))
