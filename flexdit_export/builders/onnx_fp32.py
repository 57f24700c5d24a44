"""The fp32 ONNX graph of a component: export (dynamo, static shapes), optional offline
optimisation, parity against the PyTorch module. Every other artifact derives from it."""

from __future__ import annotations

from ..export import export_onnx, parity_onnx
from ..optimize import optimize_graph
from .base import Builder, check_parity


class OnnxFp32(Builder):
    backend, precision = "onnx", "fp32"
    measures_parity = True
    _optimization = None  # the optimiser's record, when the component's graph is optimised

    def build(self, comp, ctx):
        plan, w = ctx.plan, ctx.writer
        dst = w.path(f"{comp.stem}.onnx")
        if not comp.optimize:
            return export_onnx(comp.module, comp.make_inputs(-1), dst, comp.input_names, comp.output_names, plan.opset)
        raw = export_onnx(comp.module, comp.make_inputs(-1), ctx.work / dst.name, comp.input_names, comp.output_names,
                          plan.opset)
        files, self._optimization = optimize_graph(raw[0], dst, plan.optimize_level, plan.onnxsim)
        return files

    def check(self, comp, ctx, files):
        p = parity_onnx(files[0], comp.module, comp.make_inputs, comp.input_names, ctx.plan.parity_trials)
        check_parity(f"{comp.what} ONNX graph", p, ctx.plan.parity_tol)
        opt = self._optimization
        ctx.log(f"{comp.summary}, ONNX parity max abs {p['max_abs']:.2e} rel {p['max_rel']:.2e}"
                + (f", optimised ({opt['level']}{' + onnxsim' if opt['onnxsim'] else ''}): "
                   f"{opt['nodes_before']} -> {opt['nodes_after']} nodes" if opt else ""))
        return p

    def describe(self, comp, ctx, files, record):
        extra = {"optimization": self._optimization} if self._optimization else {}
        return ctx.writer.artifact(files, "onnx", "fp32", opset=ctx.plan.opset, **extra)


BUILDERS = (OnnxFp32,)
