"""OpenVINO int8 models: NNCF post-training quantisation of the stage's fp32 graph, calibrated
on the stage's own calibration rows (the same per-stage sets as ONNX Runtime's static int8),
written as OpenVINO IR (.xml + .bin). NNCF places the quantisers where OpenVINO's CPU kernels
fuse them, which an ONNX QDQ graph made for ONNX Runtime does not promise. Gated like every
derived variant: relative RMS error against the fp32 graph (OpenVINO f32) on held-out rows.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from .base import Builder
from .onnx_derived import DerivedOnnx


def _modules():
    try:
        import nncf
        import openvino as ov
    except ImportError:
        raise UserError('OpenVINO int8 models need openvino and nncf: pip install "flexdit-export[openvino-int8]"') from None
    return ov, nncf


class OpenVINOInt8(Builder):
    backend, precision = "openvino", "int8-static"

    def build(self, comp, ctx):
        ov, nncf = _modules()
        src = DerivedOnnx.fp32_path(comp)
        rows = DerivedOnnx.rows(comp, ctx, "calib")
        if not rows:
            raise UserError(f"{comp.what}: no calibration rows for the OpenVINO int8 model; capture more images")
        model = ov.Core().read_model(str(src))
        quantized = nncf.quantize(model, nncf.Dataset(rows), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(rows))
        dst = ctx.writer.path(f"{comp.stem}.openvino-int8.xml")
        ov.save_model(quantized, str(dst), compress_to_fp16=False)
        self.fields = {"quantization": {"tool": f"nncf {nncf.__version__}", "mode": "static-nncf",
                                        "model_type": "transformer", "calibration_rows": len(rows) * ctx.plan.batch,
                                        "calibration_sha256": ctx.calib.sha256},
                       "runtime": f"openvino {ov.__version__}"}
        return [dst, dst.with_suffix(".bin")]

    def check(self, comp, ctx, files):
        ov, _ = _modules()
        core = ov.Core()
        feeds = DerivedOnnx.rows(comp, ctx, "holdout")
        if not feeds:
            raise UserError("no held-out calibration rows to check against; capture more images (--calib-holdout-images)")
        ref_m = core.compile_model(str(DerivedOnnx.fp32_path(comp)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        var_m = core.compile_model(str(files[0]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        from flexdit_bundle.cpu import measured_on

        from ..quantize import error_stats

        ref = np.concatenate([ref_m(f)[0] for f in feeds])
        got = np.concatenate([var_m(f)[0] for f in feeds])
        err = {**error_stats(got, ref), "samples": int(len(ref)), "measured_on": measured_on()}
        tol = ctx.plan.error_tols[self.precision]
        if not err["finite"] or err["rel_rms"] > tol:
            raise UserError(f"{comp.what} OpenVINO int8 model fails its quality gate: relative RMS error "
                            f"{err['rel_rms']:.3g} against the fp32 graph on {err['samples']} held-out trajectory rows"
                            + ("" if err["finite"] else " (non-finite output)")
                            + f" > {tol} (accept with --error-tol int8-static=X)")
        ctx.log(f"{comp.what}: OpenVINO int8 error vs fp32 on {err['samples']} held-out rows: rel RMS "
                f"{err['rel_rms']:.2e}, max rel {err['max_rel']:.2e}")
        return {"error": err, "check": {"status": "passed", "by": "openvino CPU"}}

    def describe(self, comp, ctx, files, record):
        fp32_artifact = comp.source("onnx", "fp32")[1]
        return ctx.writer.artifact(files, "openvino", self.precision, source_sha256=fp32_artifact["sha256"],
                                   **self.fields, **record)


BUILDERS = (OpenVINOInt8,)
