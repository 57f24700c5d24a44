"""int8 graphs: dynamic (weights int8, activations quantised at run time; ONNX Runtime only)
and static QDQ (activation scales from the stage's own calibration rows; TensorRT too)."""

from __future__ import annotations

from ..quantize import int8_dynamic, int8_static
from .onnx_derived import DerivedOnnx


class OnnxInt8Dynamic(DerivedOnnx):
    precision = "int8-dynamic"

    def make(self, src, dst, comp, ctx):
        return {"quantization": int8_dynamic(src, dst, **self.selection(ctx))}


class OnnxInt8Static(DerivedOnnx):
    precision = "int8-static"

    def make(self, src, dst, comp, ctx):
        from flexdit_export.calib.readers import OrtCalibrationReader

        reader = OrtCalibrationReader(ctx.calib, comp.stage_id, ctx.plan.batch)
        return {"quantization": {**int8_static(src, dst, reader, method=ctx.plan.quant.calib_method,
                                               **self.selection(ctx)), "calibration_sha256": ctx.calib.sha256}}


BUILDERS = (OnnxInt8Dynamic, OnnxInt8Static)
