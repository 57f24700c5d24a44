"""A TorchScript module of a component (traced, fp32), checked against PyTorch."""

from __future__ import annotations

from ..export import export_torchscript, parity_torchscript
from .base import Builder, check_parity


class TorchScriptFp32(Builder):
    backend, precision = "torchscript", "fp32"
    measures_parity = True

    def build(self, comp, ctx):
        return export_torchscript(comp.module, comp.make_inputs(-1), ctx.writer.path(f"{comp.stem}.torchscript.pt"))

    def check(self, comp, ctx, files):
        p = parity_torchscript(files[0], comp.module, comp.make_inputs, ctx.plan.parity_trials)
        check_parity(f"{comp.what} TorchScript module", p, ctx.plan.parity_tol)
        return p

    def describe(self, comp, ctx, files, record):
        return ctx.writer.artifact(files, "torchscript", "fp32")


BUILDERS = (TorchScriptFp32,)
