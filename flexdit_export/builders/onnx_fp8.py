"""float8 e4m3 QDQ graphs for TensorRT (``quantize.fp8_static``); checked where ONNX Runtime
can run them (its CPU provider emulates float8 Q/DQ), else recorded as built-not-run."""

from __future__ import annotations

from ..quantize import fp8_static
from .onnx_derived import DerivedOnnx


class OnnxFp8(DerivedOnnx):
    precision = "fp8"
    emulated = " (float8 Q/DQ emulated in fp32)"
    may_not_run = True

    def make(self, src, dst, comp, ctx):
        from flexdit_export.calib.readers import OrtCalibrationReader

        reader = OrtCalibrationReader(ctx.calib, comp.stage_id, ctx.plan.batch)
        return {"quantization": {**fp8_static(src, dst, reader, **self.selection(ctx)),
                                 "calibration_sha256": ctx.calib.sha256}}


BUILDERS = (OnnxFp8,)
