"""Per-stage precision policy: which artifact precision each stage graph runs in.

One grammar for the compiler (``flexdit-export convert --precision``: what to build and what
the runtime loads by default) and the runtime (``flexdit-run --precision``: override):

    fp16                              every stage
    int8:stages=0-2,fp16:stages=3     stages 0..2 int8, stage 3 fp16
    fp16,int8:stages=0,1              stages 0 and 1 int8, every other stage fp16

Items are comma-separated ``PRECISION[:stages=LIST]``; LIST holds stage ids and ranges
``a-b`` (a bare number or range after a comma continues the previous item's list). An item
without ``stages=`` covers every stage no other item names. ``int8`` is an alias: the
backend's default int8 form (``int8-dynamic`` for ONNX Runtime on CPU, ``int8-static``, a
QDQ graph, for TensorRT, and an NNCF-quantised model for OpenVINO; for ``auto``, any int8 form).
``bf16`` is no graph of its own: OpenVINO's inference precision over the fp32 graph, so only
the openvino backend (and ``auto``) accepts it. OpenVINO also runs ``int8-dynamic`` without an
artifact of its own (the fp32 graph with its weights quantised at load; ONNX Runtime's
``int8-dynamic`` is a graph the compiler builds).
"""

from __future__ import annotations

import re

PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-static", "fp8")  # of artifacts
ALIASES = {"int8": {"onnx": "int8-dynamic", "tensorrt": "int8-static", "openvino": "int8-static"}}
RUN_TIME_ONLY = {"bf16": ("openvino", "auto")}  # no artifact: precision -> the backends that offer it
BACKEND_ARTIFACTS = {"bf16": ("aoti",)}  # ...except these backends, which compile artifacts of it
# Quality tiers of the end-to-end bars: a policy allows any precision of its tier or better
# (bf16 passes the fp16 bar); ``--backend auto`` picks only among allowed ones.
TIERS = {"fp32": 0, "bf16": 1, "fp16": 1, "int8": 2, "int8-dynamic": 2, "int8-static": 2, "fp8": 2}
STATIC = ("int8-static", "fp8")  # need calibration data


class PrecisionError(ValueError):
    """A bad precision spec; the message is one line for the user."""


def canonical(name: str, backend: str = "onnx") -> str:
    n = name.strip().lower()
    if n in ALIASES:
        return ALIASES[n].get(backend, n)  # auto: "int8" stays "any int8 form"
    if n not in PRECISIONS and n not in RUN_TIME_ONLY:
        raise PrecisionError(f"unknown precision {name!r} (choose from "
                             f"{', '.join(PRECISIONS + tuple(RUN_TIME_ONLY) + tuple(ALIASES))})")
    if n in RUN_TIME_ONLY and backend not in RUN_TIME_ONLY[n] + BACKEND_ARTIFACTS.get(n, ()):
        raise PrecisionError(f"{n} is OpenVINO's inference precision over the fp32 graph: it runs with "
                             f"--backend {' or '.join(RUN_TIME_ONLY[n])}, not {backend}")
    return n


def allowed_by(policy_precision: str) -> tuple:
    """The precisions a stage whose policy is ``policy_precision`` may run (same tier or better)."""
    tier = TIERS[policy_precision]
    return tuple(p for p in PRECISIONS + tuple(RUN_TIME_ONLY) if TIERS[p] <= tier)


def _stage_ids(text: str, item: str) -> list[int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not m:
        raise PrecisionError(f"precision item {item!r}: {text!r} is not a stage id or a range a-b")
    lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
    if hi < lo:
        raise PrecisionError(f"precision item {item!r}: empty range {text!r}")
    return list(range(lo, hi + 1))


def parse_items(spec: str, backend: str = "onnx") -> list[tuple[str, list[int] | None]]:
    """'int8:stages=0-2,fp16' -> [('int8-dynamic', [0, 1, 2]), ('fp16', None)] (None: the rest)."""
    if spec is None or not spec.strip():
        raise PrecisionError("empty precision spec")
    items: list[tuple[str, list[int] | None]] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            raise PrecisionError(f"precision spec {spec!r} has an empty item")
        if re.fullmatch(r"\d+\s*(-\s*\d+)?", token):
            if not items or items[-1][1] is None:
                raise PrecisionError(f"precision spec {spec!r}: stage list {token!r} does not follow a 'stages=' item")
            items[-1][1].extend(_stage_ids(token, token))
            continue
        name, _, rest = token.partition(":")
        prec = canonical(name, backend)
        if not rest:
            items.append((prec, None))
            continue
        key, eq, ids = rest.partition("=")
        if key.strip() != "stages" or not eq:
            raise PrecisionError(f"precision item {token!r}: expected PRECISION or PRECISION:stages=LIST")
        items.append((prec, _stage_ids(ids, token)))
    if sum(1 for _, ids in items if ids is None) > 1:
        raise PrecisionError(f"precision spec {spec!r} has more than one item without stages=")
    return items


def parse_policy(spec: str | None, num_stages: int, backend: str = "onnx", default: str | None = "fp32") -> dict:
    """Spec -> {stage id: precision} for every stage. Stages no item names get the item without
    ``stages=``, else ``default`` (None: leave them out of the result)."""
    if spec is None:
        return {sid: default for sid in range(num_stages)} if default else {}
    items = parse_items(spec, backend)
    policy, rest = {}, default
    for prec, ids in items:
        if ids is None:
            rest = prec
            continue
        for sid in ids:
            if not 0 <= sid < num_stages:
                raise PrecisionError(f"precision spec {spec!r} names stage {sid}, but the bundle has stages "
                                     f"0..{num_stages - 1}")
            if sid in policy:
                raise PrecisionError(f"precision spec {spec!r} assigns stage {sid} twice")
            policy[sid] = prec
    if rest:
        for sid in range(num_stages):
            policy.setdefault(sid, rest)
    return dict(sorted(policy.items()))


def describe(policy: dict) -> str:
    """{0: 'int8-dynamic', 1: 'int8-dynamic', 2: 'fp16'} -> 'int8-dynamic:stages=0-1,fp16:stages=2'."""
    by_prec: dict[str, list[int]] = {}
    for sid, prec in sorted(policy.items()):
        by_prec.setdefault(prec, []).append(sid)
    parts = []
    for prec, ids in by_prec.items():
        runs, start = [], ids[0]
        for a, b in zip(ids, ids[1:] + [None]):
            if b != a + 1:
                runs.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        parts.append(f"{prec}:stages={','.join(runs)}")
    return ",".join(parts)


def cpu_optimization_level(precision: str) -> str:
    """The ONNX Runtime graph optimisation level at which the runtimes run a stage graph of this
    precision on the CPU provider (and at which a shared graph is checked, docs/bundle-format.md
    4.5): ``basic`` for fp32/fp16, where the higher levels cost load time and measured no faster
    steps; ``all`` for the quantised forms, whose fused quantised MatMuls are ~20% faster."""
    return "basic" if precision in ("fp32", "fp16") else "all"
