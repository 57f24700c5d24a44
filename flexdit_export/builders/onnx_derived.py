"""What every lower-precision ONNX graph shares: it is made from the component's fp32 graph and
gated against that graph on the stage's held-out trajectory rows (relative RMS error within
the plan's tolerance for its precision)."""

from __future__ import annotations

from abc import abstractmethod

import onnx

from ..errors import UserError
from ..quantize import compare_to_fp32, try_session
from .base import Builder


class DerivedOnnx(Builder):
    backend = "onnx"
    emulated = ""  # how ONNX Runtime runs it, if not natively (recorded in the check)
    may_not_run = False  # True: an ONNX Runtime that cannot load it marks it built-not-run instead of failing

    @abstractmethod
    def make(self, src, dst, comp, ctx) -> dict:
        """Write the graph ``dst`` from the fp32 graph ``src``; -> the artifact's fields that say how."""

    def build(self, comp, ctx):
        dst = ctx.writer.path(f"{comp.stem}.{self.precision}.onnx")
        self.fields = self.make(self.fp32_path(comp), dst, comp, ctx)
        return [dst]

    @staticmethod
    def fp32_path(comp):
        return comp.source("onnx", "fp32")[0][0]

    @staticmethod
    def rows(comp, ctx, split: str) -> list[dict]:
        from flexdit_export.calib.readers import StageBatches

        return list(StageBatches(ctx.calib, comp.stage_id, ctx.plan.batch, split))

    def selection(self, ctx) -> dict:
        q = ctx.plan.quant
        return dict(op_types=q.op_types, include=q.include, exclude=q.exclude)

    def check(self, comp, ctx, files):
        dst, prec = files[0], self.precision
        reason = try_session(dst)
        if reason is None:
            tol = ctx.plan.error_tols[prec]
            err = compare_to_fp32(dst, self.fp32_path(comp), self.rows(comp, ctx, "holdout"))
            if not err["finite"] or err["rel_rms"] > tol:
                raise UserError(f"{comp.what} {prec} graph fails its quality gate: relative RMS error "
                                f"{err['rel_rms']:.3g} against the fp32 graph on {err['samples']} held-out trajectory "
                                "rows" + ("" if err["finite"] else " (non-finite output)")
                                + f" > {tol} (accept with --error-tol {prec}=X, or keep sensitive layers out with "
                                "--quant-exclude / --fp32-islands)")
            ctx.log(f"{comp.what}: {prec} error vs fp32 on {err['samples']} held-out rows: rel RMS "
                    f"{err['rel_rms']:.2e}, max rel {err['max_rel']:.2e}")
            return {"error": err, "check": {"status": "passed",
                                            "by": "onnxruntime CPUExecutionProvider" + self.emulated}}
        if self.may_not_run:
            ctx.log(f"{comp.what}: {prec} graph built but NOT run ({reason}); check it on TensorRT")
            return {"check": {"status": "built-not-run", "reason": f"ONNX Runtime cannot execute it here: {reason}"}}
        raise UserError(f"{comp.what} {prec} graph cannot be loaded by ONNX Runtime: {reason}")

    def describe(self, comp, ctx, files, record):
        model = onnx.load(str(files[0]), load_external_data=False)
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        fp32_artifact = comp.source("onnx", "fp32")[1]
        return ctx.writer.artifact(files, "onnx", self.precision, opset=opset, source_sha256=fp32_artifact["sha256"],
                                   **self.fields, **record)
