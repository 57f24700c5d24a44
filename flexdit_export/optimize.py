"""Offline graph optimisation of a stage graph: ONNX Runtime's graph optimiser at a portable
level, then (optionally) onnxsim.

Levels (ONNX Runtime's own terms):
- ``basic`` (default): constant folding, redundant-node elimination and fusions that keep to
  standard ONNX operators, so the saved graph still runs on every ONNX Runtime execution
  provider, in TensorRT and in the C++ runtime.
- ``extended``: also fuses into ``com.microsoft`` contrib operators (FusedMatMul, fused
  LayerNorm/GELU), which only ONNX Runtime's CPU/CUDA providers execute.
The hardware-specific level (``all``: NCHWc layouts for this CPU) is never saved; sessions
apply it at load time.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

LEVELS = ("basic", "extended")


def count_nodes(model) -> int:
    return len(model.graph.node)


def _strip_unused_domains(model) -> None:
    """ONNX Runtime's optimiser declares every domain it knows; keep the ones the graph uses."""
    used = {n.domain for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def optimize_graph(src, dst, level: str = "basic", onnxsim: bool = False) -> tuple[list[Path], dict]:
    """Optimise ``src`` into ``dst``; -> (files written, record for the manifest)."""
    import onnx
    import onnxruntime as ort

    if level not in LEVELS:
        raise UserError(f"unknown optimisation level {level!r} (choose from {', '.join(LEVELS)})")
    src, dst = Path(src), Path(dst)
    before = count_nodes(onnx.load(str(src), load_external_data=False))
    external = src.with_name(src.name + ".data").exists()
    so = ort.SessionOptions()
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]
    so.log_severity_level = 3
    so.optimized_model_filepath = str(dst)
    if external:
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise UserError(f"ONNX Runtime could not optimise {src.name}: {str(e).splitlines()[0][:300]}") from None
    model = onnx.load(str(dst), load_external_data=False)
    _strip_unused_domains(model)
    if onnxsim:
        if external:
            raise UserError("--onnxsim cannot simplify graphs whose weights live in an external file (> 2 GB)")
        model = _simplify(onnx.load(str(dst)), src.name)
    onnx.save(model, str(dst))
    files = [dst] + ([dst.with_name(dst.name + ".data")] if external else [])
    return files, {"level": level, "onnxsim": bool(onnxsim), "nodes_before": before, "nodes_after": count_nodes(model)}


def _simplify(model, name: str):
    try:
        import onnxsim
    except ImportError:
        raise UserError("--onnxsim needs the onnxsim package (pip install onnxsim); it is optional") from None
    try:
        simplified, ok = onnxsim.simplify(model)
    except Exception as e:
        raise UserError(f"onnxsim failed on {name}: {str(e).splitlines()[0][:300]}") from None
    if not ok:
        raise UserError(f"onnxsim could not validate its simplification of {name}")
    return simplified
