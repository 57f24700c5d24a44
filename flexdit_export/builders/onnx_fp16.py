"""fp16 graphs with fp32 islands (``quantize.to_fp16``); every calibration and held-out row
must stay finite before the error gate is even measured."""

from __future__ import annotations

from ..errors import UserError
from ..quantize import all_finite, to_fp16
from .onnx_derived import DerivedOnnx


class OnnxFp16(DerivedOnnx):
    precision = "fp16"

    def make(self, src, dst, comp, ctx):
        return {"fp32_islands": to_fp16(src, dst, list(ctx.plan.quant.islands))}

    def check(self, comp, ctx, files):
        if not all_finite(files[0], self.rows(comp, ctx, "calib") + self.rows(comp, ctx, "holdout")):
            raise UserError(f"{comp.what} fp16 graph produces NaN/Inf on real trajectory inputs; keep more of it in "
                            "fp32 with --fp32-islands")
        return super().check(comp, ctx, files)


BUILDERS = (OnnxFp16,)
