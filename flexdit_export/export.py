"""Static-shape export of one module (a stage or the decoder) and its parity check.

ONNX goes through ``torch.onnx.export(dynamo=True)`` at opset >= 18 (the dynamo exporter
writes an invalid Split at opset 17) and must pass ``onnx.checker`` with full shape
inference. Graphs over 1.5 GB keep their weights in an external ``.data`` file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .quiet import quiet

MIN_OPSET = 18
EXTERNAL_DATA_BYTES = 1_500_000_000


def max_opset() -> int:
    import onnx
    return onnx.defs.onnx_opset_version()


def check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise UserError(f"opset {opset} is not supported: the dynamo exporter needs opset {MIN_OPSET} or later "
                        "(opset 17 writes an invalid Split)")
    if opset > max_opset():
        raise UserError(f"opset {opset} is newer than the installed onnx supports ({max_opset()})")


def _quiet():
    """The exporter narrates its passes on stdout and warns about optional packages."""
    return quiet("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "torch.fx")


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_onnx(module, inputs, path: Path, input_names, output_names, opset: int = MIN_OPSET) -> list[Path]:
    """Export and check; returns the files written (graph, and external data if any)."""
    import onnx

    check_opset(opset)
    path = Path(path)
    external = param_bytes(module) > EXTERNAL_DATA_BYTES
    with _quiet(), torch.no_grad():
        try:
            prog = torch.onnx.export(module, tuple(inputs), dynamo=True, opset_version=opset,
                                     input_names=list(input_names), output_names=list(output_names),
                                     external_data=external, verbose=False)
        except Exception as e:
            raise UserError(f"ONNX export failed for {path.name}: {str(e).strip().splitlines()[0][:300]}") from None
        prog.save(str(path), external_data=external)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise UserError(f"exported graph {path.name} fails onnx.checker: {str(e).splitlines()[0][:300]}") from None
    name_nodes_by_layer(path)
    files = [path]
    data = path.with_name(path.name + ".data")
    if data.exists():
        files.append(data)
    return files


LAYER_SEP = "::"


def _innermost_module(node) -> str:
    """The module a node of a dynamo-exported graph came from, from its name-scope metadata
    ("model.blocks.0.attn.qkv" -> "blocks.0.attn.qkv"); "" for ops of the top module."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return ""
            mods = [m for m in scopes[1:-1] if m]  # drop the root scope and the op itself
            if not mods:
                return ""
            m = mods[-1]
            return m[len("model."):] if m.startswith("model.") else m
    return ""


def name_nodes_by_layer(path) -> None:
    """Prefix every node name with the module (layer) it computes, ``blocks.0.attn.qkv::node_MatMul_7``,
    so optimisation passes (which drop metadata but keep names) leave graphs addressable by
    layer: the fp32 islands of fp16 graphs and the quantisation include/exclude lists use it."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        layer = _innermost_module(node)
        if layer and LAYER_SEP not in node.name:
            node.name = f"{layer}{LAYER_SEP}{node.name}"
    onnx.save(model, str(path))


def layer_of(node_name: str) -> str:
    """The layer a node was named after by ``name_nodes_by_layer`` ("" if none)."""
    return node_name.split(LAYER_SEP, 1)[0] if LAYER_SEP in node_name else ""


def export_torchscript(module, inputs, path: Path) -> list[Path]:
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(module, tuple(inputs), check_trace=False)
        traced.save(str(path))
    return [Path(path)]


def error_stats(got: np.ndarray, ref: np.ndarray) -> dict:
    """max abs error, max abs error relative to max |ref|, relative RMS error, finiteness."""
    g, r = got.astype(np.float64), ref.astype(np.float64)
    diff = np.abs(g - r)
    scale = float(np.abs(r).max()) or 1.0
    return {"max_abs": float(diff.max()), "max_rel": float(diff.max() / scale),
            "rel_rms": float(np.sqrt(np.mean(diff ** 2) / (np.mean(r ** 2) or 1.0))),
            "finite": bool(np.isfinite(got).all())}


def merge_stats(stats: list[dict], samples: int) -> dict:
    """Worst case over draws; rel_rms as the root of the mean square over draws."""
    return {"max_abs": max(s["max_abs"] for s in stats), "max_rel": max(s["max_rel"] for s in stats),
            "rel_rms": float(np.sqrt(np.mean([s["rel_rms"] ** 2 for s in stats]))),
            "finite": all(s["finite"] for s in stats), "samples": samples}


def onnx_session(path, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def parity_onnx(path, module, make_inputs, input_names, trials: int = 2) -> dict:
    """Graph vs PyTorch on ``trials`` fresh input draws (``make_inputs(i)`` -> tensors)."""
    sess = onnx_session(path)
    stats, rows = [], 0
    for i in range(trials):
        inputs = make_inputs(i)
        with torch.no_grad():
            ref = module(*inputs).numpy()
        got = sess.run(None, {n: v.numpy() for n, v in zip(input_names, inputs)})[0]
        stats.append(error_stats(got, ref))
        rows += inputs[0].shape[0]
    return merge_stats(stats, rows)


def parity_torchscript(path, module, make_inputs, trials: int = 2) -> dict:
    ts = torch.jit.load(str(path))
    stats, rows = [], 0
    for i in range(trials):
        inputs = make_inputs(i)
        with torch.no_grad():
            stats.append(error_stats(ts(*inputs).numpy(), module(*inputs).numpy()))
        rows += inputs[0].shape[0]
    return merge_stats(stats, rows)
