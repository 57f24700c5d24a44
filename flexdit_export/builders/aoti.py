"""AOTInductor packages of a stage (``--backend aoti --device cpu|cuda --precision fp32|bf16|fp16``):
``torch.export`` of the stage module, ``torch._inductor.aoti_compile_and_package`` with the
constants kept out of the shared object, and one weight file per precision that every stage
package of the bundle binds (format v2 ``weights``: id ``aoti-<precision>``).

Precision recipes (pinned; the manifest records the one used):

    fp32   the stage module as it is.
    bf16   ``autocast-bf16``: the transformer blocks' weights stored in bfloat16; the patch,
    fp16   timestep and label embedders, the positional table and the final layer stay float32;
           the stage runs under ``torch.autocast(<device>, <dtype>)`` (matrix products and
           attention in the low precision with float32 accumulation, LayerNorm, softmax and the
           sinusoid in float32, by autocast's own op lists) and returns float32. Why not a stage
           cast wholesale to bf16: the AOTInductor compile can crash on it; this recipe keeps
           the graph's inputs, embedders and output float32.

Parity: every package is run at conversion (on its device) against the fp32 PyTorch stage on
the component's fresh random inputs. fp32 must meet ``--parity-tol`` in max relative error, as
the ONNX graph does (tests: within 1e-4 on the CPU). bf16/fp16 must stay within a relative RMS
error of 1e-2 (``--error-tol bf16=X``): bfloat16 keeps 8 significant bits (relative rounding
2^-9 = 2e-3 per operand), and a DiT stage sums ~30 such residual updates whose errors add
roughly in quadrature, so 1e-2 is a few rounding units of the output, well under the sampler's
own noise.
"""

from __future__ import annotations

import copy
import hashlib
import time

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..export import error_stats, merge_stats
from .base import Builder, check_parity

PRECISIONS = ("fp32", "bf16", "fp16")
LOW_TOL = 1e-2  # relative RMS error of bf16/fp16 packages vs the fp32 PyTorch stage
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BLOCK_LISTS = ("blocks", "poolingformer_blocks", "dumbbell_blocks", "normal_blocks")
INDUCTOR_CONFIGS = {"aot_inductor.package_constants_in_so": False}
ALIGNMENT = 64


def recipe(precision: str) -> str:
    return "fp32" if precision == "fp32" else f"autocast-{precision}: blocks {precision}, embedders/final layer fp32"


class AutocastStage(nn.Module):
    """A stage run under autocast, float32 in and out (the low-precision recipe)."""

    def __init__(self, stage: nn.Module, dtype: torch.dtype, device_type: str):
        super().__init__()
        self.stage, self.dtype, self.device_type = stage, dtype, device_type

    def forward(self, x, t, y):
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.stage(x, t, y)
        return out.float()


def prepared_model(model: nn.Module, precision: str, device: str) -> nn.Module:
    """A copy of the model for ``precision`` on ``device`` (the model itself for fp32 on the CPU)."""
    if precision == "fp32" and device == "cpu":
        return model
    m = copy.deepcopy(model).to(device)
    if precision != "fp32":
        for name in BLOCK_LISTS:
            if hasattr(m, name):
                getattr(m, name).to(DTYPES[precision])
    return m.eval()


def runnable(stage_module: nn.Module, precision: str, device: str) -> nn.Module:
    """The module a package is compiled from: the stage itself, or the stage under autocast."""
    if precision == "fp32":
        return stage_module.eval()
    return AutocastStage(stage_module, DTYPES[precision], device).eval()


def constants_of(module: nn.Module) -> dict:
    """What a package compiled from ``module`` needs as constants: its parameters and buffers
    (persistent or not), by fully qualified name."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def compile_package(module: nn.Module, inputs: tuple, path, configs: dict | None = None) -> float:
    """export + AOTInductor compile into ``path``; -> seconds."""
    t0 = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(module, tuple(inputs), strict=False)
        torch._inductor.aoti_compile_and_package(ep, package_path=str(path),
                                                 inductor_configs={**INDUCTOR_CONFIGS, **(configs or {})})
    return time.perf_counter() - t0


def write_weight_file(path, per_stage: list[dict]) -> tuple[list[dict], list[dict]]:
    """Every stage's constants into one file, each distinct tensor once (by dtype, shape and
    bytes), 64-byte aligned -> (tensor table, per stage {constant name: tensor index})."""
    dtypes = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int64: "int64",
              torch.int32: "int32", torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool"}
    index, tensors, bindings, offset = {}, [], [], 0
    with open(path, "wb") as f:
        for consts in per_stage:
            b = {}
            for name, t in sorted(consts.items()):
                t = t.detach().to("cpu").contiguous()
                if t.dtype not in dtypes:
                    raise UserError(f"AOTI constant {name} has dtype {t.dtype}, which a weight file cannot hold")
                raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
                key = (dtypes[t.dtype], tuple(t.shape), hashlib.sha256(raw).hexdigest())
                if key not in index:
                    pad = (-offset) % ALIGNMENT
                    f.write(b"\0" * pad)
                    offset += pad
                    index[key] = len(tensors)
                    tensors.append({"offset": offset, "bytes": len(raw), "dtype": key[0], "shape": list(key[1])})
                    f.write(raw)
                    offset += len(raw)
                b[name] = index[key]
            bindings.append(b)
    return tensors, bindings


def file_id(precision: str) -> str:
    return f"aoti-{precision}"


class _Shared:
    """What the AOTI builders of one conversion share: the prepared model per precision and
    the weight file (written by the first stage's build, for every stage)."""

    def __init__(self):
        self.models, self.files = {}, {}


def _shared(ctx) -> _Shared:
    return ctx.shared.setdefault("aoti", _Shared())


class AotiPackage(Builder):
    backend = "aoti"
    measures_parity = True

    def _stage_modules(self, ctx):
        from ..stages import StageModule

        sh, plan = _shared(ctx), ctx.plan
        key = (self.precision, plan.device)
        if key not in sh.models:
            m = prepared_model(plan.model, self.precision, plan.device)
            sh.models[key] = [runnable(StageModule(m, st).to(plan.device), self.precision, plan.device)
                              for st in plan.stages]
        return sh.models[key]

    def _weights(self, ctx):
        """-> (weight-file manifest entry, per stage bindings); the file is written once."""
        from flexdit_bundle.files import sha256_file

        sh = _shared(ctx)
        if self.precision not in sh.files:
            rel = f"stages/weights.{file_id(self.precision)}.bin"
            path = ctx.writer.path(rel)
            tensors, bindings = write_weight_file(path, [constants_of(m) for m in self._stage_modules(ctx)])
            entry = {"id": file_id(self.precision), "path": rel, "sha256": sha256_file(path),
                     "bytes": path.stat().st_size, "alignment": ALIGNMENT, "tensors": tensors}
            sh.files[self.precision] = (entry, bindings, path)
        return sh.files[self.precision]

    def build(self, comp, ctx):
        from flexdit_runtime.aoti_engine import environment

        plan = ctx.plan
        if comp.stage_id is None:
            raise UserError(f"{comp.what}: the aoti backend builds stage packages only")
        module = self._stage_modules(ctx)[comp.stage_id]
        dst = ctx.writer.path(f"{comp.stem}.aoti.{self.precision}.pt2")
        inputs = tuple(v.to(plan.device) for v in comp.make_inputs(-1))
        self.env = environment(plan.device)
        try:
            self.seconds = compile_package(module, inputs, dst)
        except Exception as e:  # torch.export / Inductor errors are long; the first line says what
            raise UserError(f"{comp.what}: AOTInductor compile ({self.precision}, {plan.device}) failed: "
                            f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__}") from None
        self._weights(ctx)
        ctx.log(f"{comp.what}: AOTI {self.precision} package on {plan.device} compiled in {self.seconds:.1f} s")
        return [dst]

    def check(self, comp, ctx, files):
        from flexdit_runtime.aoti_engine import bind_constants, load_package

        plan = ctx.plan
        entry, bindings, wpath = self._weights(ctx)
        runner = load_package(files[0], plan.device)
        # the constants as the runtime will see them: read back from the weight file
        raw = torch.from_numpy(np.fromfile(wpath, dtype=np.uint8))
        tensors = [raw[t["offset"]:t["offset"] + t["bytes"]].view(getattr(torch, t["dtype"])).reshape(t["shape"])
                   .to(plan.device) for t in entry["tensors"]]
        consts = {n: tensors[i] for n, i in bindings[comp.stage_id].items()}
        missing = [n for n in runner.get_constant_fqns() if n not in consts]
        if missing:
            raise UserError(f"{comp.what}: the AOTI package needs constant {missing[0]!r} that the stage module "
                            "does not hold")
        bind_constants(runner, consts)
        stats, rows = [], 0
        for i in range(plan.parity_trials):
            inputs = comp.make_inputs(i)
            with torch.no_grad():
                ref = comp.module(*inputs).numpy()
                got = runner(*(v.to(plan.device) for v in inputs)).float().cpu().numpy()
            stats.append(error_stats(got, ref))
            rows += inputs[0].shape[0]
        p = merge_stats(stats, rows)
        if self.precision == "fp32":
            check_parity(f"{comp.what} AOTI package", p, plan.parity_tol)
            tol = {"max_rel": plan.parity_tol}
        else:
            limit = plan.error_tols.get(self.precision, LOW_TOL)
            if not p["finite"] or p["rel_rms"] > limit:
                raise UserError(f"{comp.what} AOTI {self.precision} package fails parity: relative RMS error "
                                f"{p['rel_rms']:.3g} against the fp32 PyTorch stage > {limit}"
                                + ("" if p["finite"] else " (non-finite output)")
                                + f" (accept with --error-tol {self.precision}=X)")
            tol = {"rel_rms": limit}
        ctx.log(f"{comp.what}: AOTI {self.precision} parity vs fp32 PyTorch on {plan.device}: max rel "
                f"{p['max_rel']:.2e}, rel RMS {p['rel_rms']:.2e}")
        return {**p, "tolerance": tol, "device": plan.device}

    def describe(self, comp, ctx, files, record):
        entry, bindings, _ = self._weights(ctx)
        info = {"device": ctx.plan.device, "compat": self.env, "recipe": recipe(self.precision),
                "compile_seconds": round(self.seconds, 2), "inductor_configs": dict(INDUCTOR_CONFIGS)}
        return ctx.writer.artifact(files, "aoti", self.precision, aoti=info,
                                   weights={"file": entry["id"], "bindings": bindings[comp.stage_id]})

    def weight_files(self, comp, ctx):
        return [self._weights(ctx)[0]]


def _package(precision: str) -> type:
    return type(f"AotiPackage_{precision}", (AotiPackage,), {"precision": precision})


BUILDERS = tuple(_package(p) for p in PRECISIONS)
