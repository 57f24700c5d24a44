"""Lower-precision variants of a stage graph, each checked against the stage's fp32 graph on
real trajectory inputs (the held-out rows of the stage's calibration set).

- ``fp16``: ONNX Runtime's float16 converter with fp32 islands (configurable, on by default
  where diffusion transformers overflow: LayerNorm and its adaLN modulation, softmax, the
  timestep/label embedders, the final layer); graph inputs and outputs stay fp32. Every
  calibration and held-out row is run through it: a NaN/Inf fails the conversion.
- ``int8-dynamic``: weights int8 (per channel, 7-bit range), activations quantised at run time
  (``quantize_dynamic``); ONNX Runtime's CPU default, no calibration needed. The 7-bit range
  keeps the integer sums exact on every instruction set (``int8_dynamic``), so the gate
  measured on one CPU holds on another.
- ``int8-static``: a QDQ graph (``quantize_static``), weights int8 per-channel symmetric,
  activations int8 symmetric (zero point 0, as TensorRT requires) from the stage's own
  calibration rows, MinMax by default, calibrated in strides so memory stays bounded.
- ``fp8``: a float8 e4m3 QDQ graph (opset 19) for TensorRT from the same calibration rows:
  activation scales amax/448 from MinMax ranges, weights per output channel; checked
  numerically where ONNX Runtime can execute it (its CPU provider emulates float8 Q/DQ), else
  marked ``built-not-run``.

Layers are addressed by module path (``blocks.3.mlp.fc2``, globs like ``blocks.*.attn.*``):
export names every node after its module (``export.name_nodes_by_layer``).
"""

from __future__ import annotations

import fnmatch
import tempfile
from pathlib import Path

import numpy as np

from flexdit_bundle.cpu import measured_on

from .errors import UserError
from .export import error_stats, layer_of, onnx_session
from .quiet import quiet

ISLAND_GROUPS = {
    "layernorm": "LayerNormalization nodes, the adaLN modulation (x * (1 + scale) + shift) that follows them "
                 "and the adaLN_modulation linears",
    "softmax": "Softmax nodes (attention)",
    "embedders": "the timestep and label embedders (t_embedder, y_embedder)",
    "final_layer": "the final layer (norm, modulation, output linear)",
}
DEFAULT_ISLANDS = "layernorm,softmax,embedders,final_layer"
DEFAULT_OP_TYPES = ("MatMul", "Gemm")
# Kept out of int8/fp8 by default: the SDTM token-recovery linear on the dense skip path carries
# the whole dense residual stream (it starts as the identity); on the Fashion-MNIST model it alone
# causes two thirds of the int8 error of the clean-end stage. Applied where the model has it.
DEFAULT_QUANT_EXCLUDE = ("*.merged_layer2",)
CALIB_METHODS = ("minmax", "percentile", "entropy")
CALIB_STRIDE = 4  # batches of intermediate tensors ONNX Runtime holds at once while calibrating
DEFAULT_ERROR_TOL = {"fp16": 0.01, "int8-dynamic": 0.1, "int8-static": 0.1, "fp8": 0.25}


# ---------------------------------------------------------------- layers
def layer_matches(layer: str, pattern: str) -> bool:
    """A layer matches a module path (and everything under it) or a glob."""
    return layer == pattern or layer.startswith(pattern + ".") or fnmatch.fnmatchcase(layer, pattern)


def check_layer_patterns(patterns, module_names, what: str) -> None:
    """Every pattern must name at least one module of the model (checked before any export)."""
    names = [n for n in module_names if n]
    for p in patterns:
        if not any(layer_matches(n, p) for n in names):
            close = sorted({n.split(".")[0] for n in names})
            raise UserError(f"{what}: {p!r} matches no layer of the model (top-level modules: {', '.join(close)}; "
                            "use module paths like blocks.0.attn.qkv or globs like 'blocks.*.mlp.*')")


def split_list(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def resolve_exclude(items, module_names) -> tuple[list[str], list[str]]:
    """``--quant-exclude`` items ('default', 'none', patterns) -> (all patterns, the user's own).
    The default patterns apply only where the model has such layers; the user's must match."""
    items = list(items) if items is not None else ["default"]
    if items == ["none"]:
        return [], []
    mine = [it for it in items if it != "default"]
    defaults = [p for p in DEFAULT_QUANT_EXCLUDE if "default" in items
                and any(layer_matches(n, p) for n in module_names if n)]
    return defaults + mine, mine


def parse_islands(spec: str | None) -> list[str]:
    """'default', 'none', or comma-separated group names, 'op:TYPE' and layer patterns."""
    if spec is None or spec.strip() == "default":
        return split_list(DEFAULT_ISLANDS)
    items = split_list(spec)
    if items == ["none"]:
        return []
    out = []
    for it in items:
        out.extend(split_list(DEFAULT_ISLANDS) if it == "default" else [it])
    return out


def island_layer_patterns(items: list[str]) -> list[str]:
    """The items of an island spec that are layer patterns (to check against the model)."""
    return [it for it in items if it not in ISLAND_GROUPS and not it.startswith("op:")]


def _consumers(graph) -> dict:
    out = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def island_nodes(model, items: list[str]) -> set:
    """Names of the nodes an island spec keeps in fp32."""
    g = model.graph
    keep = set()
    cons = _consumers(g)
    for it in items:
        if it == "layernorm":
            for n in g.node:
                if n.op_type == "LayerNormalization":
                    keep.add(n.name)
                    for m in cons.get(n.output[0], []):  # modulate: LN(x) * (1 + scale) + shift
                        if m.op_type == "Mul":
                            keep.add(m.name)
                            keep.update(k.name for k in g.node if k.op_type == "Add" and k.output[0] in m.input)
                            keep.update(a.name for a in cons.get(m.output[0], []) if a.op_type == "Add")
                elif "adaLN_modulation" in layer_of(n.name):
                    keep.add(n.name)
        elif it == "softmax":
            keep.update(n.name for n in g.node if n.op_type == "Softmax")
        elif it == "embedders":
            keep.update(n.name for n in g.node if layer_matches(layer_of(n.name), "t_embedder")
                        or layer_matches(layer_of(n.name), "y_embedder"))
        elif it == "final_layer":
            keep.update(n.name for n in g.node if layer_matches(layer_of(n.name), "final_layer"))
        elif it.startswith("op:"):
            keep.update(n.name for n in g.node if n.op_type == it[3:])
        else:
            keep.update(n.name for n in g.node if layer_matches(layer_of(n.name), it))
    return keep


def _nodes_for(model, patterns, op_types) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in op_types
            and any(layer_matches(layer_of(n.name), p) for p in patterns)]


# ---------------------------------------------------------------- variants
def to_fp16(src, dst, islands: list[str]) -> dict:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    keep = island_nodes(model, islands)
    with quiet():
        m16 = convert_float_to_float16(model, keep_io_types=True, node_block_list=sorted(keep))
    onnx.save(m16, str(dst))
    return {"spec": islands, "fp32_nodes": len(keep), "total_nodes": len(model.graph.node)}


def _preprocess(src, tmpdir) -> Path:
    """ONNX Runtime's recommended pre-processing (shape inference) before quantisation."""
    from onnxruntime.quantization import quant_pre_process

    out = Path(tmpdir) / "pre.onnx"
    try:
        with quiet():
            quant_pre_process(str(src), str(out), skip_optimization=True)
    except Exception as e:
        raise UserError(f"quantisation pre-processing failed on {Path(src).name}: {str(e).splitlines()[0][:300]}") from None
    return out


def _selection(model, op_types, include, exclude) -> dict:
    kw = {}
    if include:
        kw["nodes_to_quantize"] = _nodes_for(model, include, op_types)
        if not kw["nodes_to_quantize"]:  # an empty list would mean "everything" to ONNX Runtime
            raise UserError(f"--quant-include {','.join(include)} selects no {'/'.join(op_types)} node to quantise")
    if exclude:
        kw["nodes_to_exclude"] = _nodes_for(model, exclude, op_types)
    return kw


# Operator types ONNX Runtime's quantisers handle (its dynamic, QOperator and QDQ registries,
# onnxruntime 1.32), plus Gemm, which quantize_dynamic rewrites into MatMul first. A list, not a
# look-up: importing onnxruntime while the plan is checked would drop its session file (.ses) in
# $TMPDIR before the run's scratch directory exists. tests/compiler/test_quantize.py checks it against them.
QUANTISABLE_OP_TYPES = frozenset((
    "Add", "ArgMax", "Attention", "AveragePool", "BatchNormalization", "Clip", "Concat", "Conv", "ConvTranspose",
    "CumSum", "EmbedLayerNormalization", "Flatten", "Gather", "GatherElements", "Gemm", "GlobalAveragePool",
    "InstanceNormalization", "LSTM", "LayerNormalization", "LeakyRelu", "MatMul", "MaxPool", "Mul", "Pad", "Relu",
    "Reshape", "Resize", "Sigmoid", "Slice", "Softmax", "Split", "Squeeze", "TopK", "Transpose", "Unsqueeze", "Where"))


def _quantised(src, dst, op_types) -> int:
    """How many nodes of ``dst`` are quantised; none is a selection error, not an int8 graph."""
    n = _count_quantized(dst)
    if n == 0:
        raise UserError(f"quantising {Path(src).name} changed no node: --quant-ops {','.join(op_types)} with the "
                        "--quant-include/--quant-exclude selection matches nothing in the graph")
    return n


def int8_dynamic(src, dst, op_types=DEFAULT_OP_TYPES, include=(), exclude=()) -> dict:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        pre = _preprocess(src, tmp)
        model = onnx.load(str(pre))
        sel = _selection(model, op_types, include, exclude)
        # quantize_dynamic first rewrites every Gemm into MatMul (+ Add) named "<gemm>_MatMul" and
        # matches the node lists against the new names: list both
        gemms = {n.name for n in model.graph.node if n.op_type == "Gemm"}
        sel = {k: v + [n + "_MatMul" for n in v if n in gemms] for k, v in sel.items()}
        # reduce_range: weights in [-64, 64]. ONNX Runtime's u8 x s8 kernels on x86 without VNNI
        # (AVX2, AVX-512 without VNNI) add pairs of products in int16 (vpmaddubsw), which saturates
        # with full-range weights (2 x 255 x 127 > 32767) and cannot with these (2 x 255 x 64 <=
        # 32767): the sums are then exact everywhere, at the VNNI kernels' speed. (u8 weights would
        # be exact too, but ONNX Runtime runs u8 x u8 GEMMs several times slower on VNNI CPUs.)
        with quiet():
            quantize_dynamic(str(pre), str(dst), op_types_to_quantize=list(op_types), per_channel=True,
                             reduce_range=True, weight_type=QuantType.QInt8,
                             extra_options={"MatMulConstBOnly": True}, **sel)
    return {"mode": "dynamic", "weights": "int8 per-channel symmetric, 7-bit range [-64, 64] (exact integer sums "
                                          "on every instruction set)",
            "activations": "uint8 per-tensor, at run time",
            "op_types": list(op_types), "include": list(include), "exclude": list(exclude),
            "quantized_nodes": _quantised(src, dst, op_types)}


def _static(src, dst, reader, fp8: bool, op_types, include, exclude, method: str) -> dict:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    qtype = QuantType.QFLOAT8E4M3FN if fp8 else QuantType.QInt8
    cm = CalibrationMethod.Distribution if fp8 else {"minmax": CalibrationMethod.MinMax,
                                                     "percentile": CalibrationMethod.Percentile,
                                                     "entropy": CalibrationMethod.Entropy}[method]
    n = len(reader)
    stride = max(d for d in range(1, CALIB_STRIDE + 1) if n % d == 0)  # quantize_static needs a divisor
    with tempfile.TemporaryDirectory() as tmp:
        pre = _preprocess(src, tmp)
        sel = _selection(onnx.load(str(pre)), op_types, include, exclude)
        try:
            with quiet():
                quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=qtype, weight_type=qtype, op_types_to_quantize=list(op_types),
                                calibrate_method=cm,
                                extra_options={"WeightSymmetric": True, "ActivationSymmetric": True,
                                               "MatMulConstBOnly": True, "CalibStridedMinMax": stride,
                                               # an excluded layer reads the fp32 tensor, not a shared Q/DQ pair
                                               "DedicatedQDQPair": True,
                                               # fp8: biases stay fp32 (TensorRT adds them in high precision)
                                               "QuantizeBias": not fp8}, **sel)
        except Exception as e:
            raise UserError(f"static quantisation of {Path(src).name} failed: {str(e).splitlines()[0][:300]}") from None
    return {"mode": "static-qdq", "format": "QDQ", "weights": f"{'float8 e4m3' if fp8 else 'int8'} per-channel symmetric",
            "bias": "fp32" if fp8 else "int32 (input scale x weight scale)",
            "activations": f"{'float8 e4m3' if fp8 else 'int8'} per-tensor symmetric",
            "calibration_method": "distribution" if fp8 else method, "calibration_batches": n,
            "op_types": list(op_types), "include": list(include), "exclude": list(exclude),
            "quantized_nodes": _quantised(src, dst, op_types)}


def int8_static(src, dst, reader, op_types=DEFAULT_OP_TYPES, include=(), exclude=(), method="minmax") -> dict:
    return _static(src, dst, reader, False, op_types, include, exclude, method)


FP8_MAX = 448.0  # largest finite float8 e4m3fn


def activation_ranges(src, reader, op_types) -> dict:
    """(min, max) of the inputs/outputs of ``op_types`` nodes over the reader's batches:
    ONNX Runtime's MinMax calibrator, fed in strides so memory stays bounded."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    n = len(reader)
    with tempfile.TemporaryDirectory() as tmp, quiet():
        cal = create_calibrator(Path(src), list(op_types), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                calibrate_method=CalibrationMethod.MinMax)
        for lo in range(0, n, CALIB_STRIDE):
            reader.set_range(lo, lo + CALIB_STRIDE)
            cal.collect_data(reader)
        data = cal.compute_data()
    return {k: tuple(float(np.asarray(v).reshape(-1)[0]) for v in data[k].range_value) for k in data}


def _fp8(a: np.ndarray) -> np.ndarray:
    import ml_dtypes

    return np.clip(a, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)  # the cast alone overflows to NaN


def fp8_static(src, dst, reader, op_types=DEFAULT_OP_TYPES, include=(), exclude=()) -> dict:
    """A float8 e4m3 QDQ graph in TensorRT's recipe: for every selected MatMul/Gemm with a
    constant weight, the activation input goes through Q/DQ with a per-tensor scale amax/448
    (amax from the stage's calibration rows, MinMax), the weight is stored in float8 with a
    per-output-channel scale amax/448 and dequantised; biases stay fp32; opset 19.

    (ONNX Runtime's own float8 path scales from the standard deviation of each tensor, which
    clips the outliers of transformer activations: several times the error on these graphs.)"""
    import onnx
    from onnx import helper, numpy_helper, version_converter

    with tempfile.TemporaryDirectory() as tmp:
        pre = _preprocess(src, tmp)
        ranges = activation_ranges(pre, reader, op_types)
        model = onnx.load(str(pre))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    chosen = set(_nodes_for(model, include, op_types) if include else (n.name for n in g.node))
    chosen -= set(_nodes_for(model, exclude, op_types))
    zero = numpy_helper.from_array(_fp8(np.zeros((), np.float32)), "fp8_zero")
    new_inits, nodes, count = [zero], [], 0
    for node in g.node:
        w = node.input[1] if len(node.input) > 1 else ""
        ok = (node.op_type in op_types and node.name in chosen and w in inits and len(inits[w].dims) == 2
              and node.input[0] in ranges and not (node.op_type == "Gemm" and _attr(node, "transA", 0)))
        if ok:
            lo, hi = ranges[node.input[0]]
            a_scale = max(abs(lo), abs(hi), 1e-12) / FP8_MAX
            W = numpy_helper.to_array(inits[w]).astype(np.float32)
            axis = 0 if node.op_type == "Gemm" and _attr(node, "transB", 0) else 1  # the output-channel axis
            w_scale = np.maximum(np.abs(W).max(axis=1 - axis), 1e-12) / FP8_MAX
            Wq = _fp8(W / (w_scale[None, :] if axis == 1 else w_scale[:, None]))
            tag = node.name
            new_inits += [numpy_helper.from_array(np.array(a_scale, np.float32), f"{tag}/x_scale"),
                          numpy_helper.from_array(Wq, f"{tag}/w_fp8"),
                          numpy_helper.from_array(w_scale.astype(np.float32), f"{tag}/w_scale"),
                          numpy_helper.from_array(_fp8(np.zeros(w_scale.shape, np.float32)), f"{tag}/w_zero")]
            nodes += [helper.make_node("QuantizeLinear", [node.input[0], f"{tag}/x_scale", "fp8_zero"], [f"{tag}/x_q"],
                                       name=f"{tag}/QuantizeLinear"),
                      helper.make_node("DequantizeLinear", [f"{tag}/x_q", f"{tag}/x_scale", "fp8_zero"], [f"{tag}/x_dq"],
                                       name=f"{tag}/DequantizeLinear"),
                      helper.make_node("DequantizeLinear", [f"{tag}/w_fp8", f"{tag}/w_scale", f"{tag}/w_zero"],
                                       [f"{tag}/w_dq"], name=f"{tag}/w_DequantizeLinear", axis=axis)]
            node.input[0], node.input[1] = f"{tag}/x_dq", f"{tag}/w_dq"
            count += 1
        nodes.append(node)
    used = {i for n in nodes for i in n.input}
    kept = [i for i in g.initializer if i.name in used]
    del g.node[:], g.initializer[:]
    g.node.extend(nodes)
    g.initializer.extend(kept + new_inits)
    del g.value_info[:]  # shapes are re-inferred below
    model = version_converter.convert_version(model, max(19, _opset(model)))
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise UserError(f"the fp8 graph of {Path(src).name} is invalid: {str(e).splitlines()[0][:300]}") from None
    onnx.save(model, str(dst))
    return {"mode": "static-qdq", "format": "QDQ", "weights": "float8 e4m3 per-channel symmetric, scale amax/448",
            "activations": "float8 e4m3 per-tensor symmetric, scale = calibrated amax/448", "bias": "fp32",
            "calibration_method": "minmax", "calibration_batches": len(reader), "op_types": list(op_types),
            "include": list(include), "exclude": list(exclude), "quantized_nodes": count}


def _attr(node, name, default):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _count_quantized(path) -> int:
    """Nodes that consume a dequantised weight or run an integer kernel."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    return sum(1 for n in g.node if n.op_type in ("DequantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul",
                                                  "ConvInteger", "QLinearMatMul")
               and (n.op_type != "DequantizeLinear" or n.input[0].endswith("_quantized")))


# ---------------------------------------------------------------- checks
def compare_to_fp32(variant, fp32, feeds) -> dict:
    """Run both graphs on the same feeds; error stats of the variant against fp32, and the
    machine they were measured on."""
    if not feeds:
        raise UserError("no held-out calibration rows to check against; capture more images (--calib-holdout-images)")
    ref, got = graph_outputs(fp32, feeds), graph_outputs(variant, feeds)
    return {**error_stats(got, ref), "samples": int(len(ref)), "measured_on": measured_on()}


def graph_outputs(path, feeds) -> np.ndarray:
    """The graph's first output over ``feeds``, concatenated (ONNX Runtime, CPU)."""
    s = onnx_session(path)
    return np.concatenate([s.run(None, f)[0] for f in feeds])


def all_finite(path, feeds) -> bool:
    s = onnx_session(path)
    return all(bool(np.isfinite(s.run(None, f)[0]).all()) for f in feeds)


def try_session(path) -> str | None:
    """None if ONNX Runtime (CPU) can load the graph, else why not."""
    try:
        onnx_session(path)
    except Exception as e:
        return str(e).strip().splitlines()[0][:300]
    return None
