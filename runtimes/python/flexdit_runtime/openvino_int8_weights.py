"""OpenVINO ``int8-dynamic``: int8 weights, activations quantised at run time, no calibration.

Why a second OpenVINO int8 form: the bundle's NNCF int8 models are calibrated per stage, so
every stage is its own compiled model with its own repacked weights (peak RSS 1.6-2x OpenVINO's
dense model; benchmarks/README.md). This form is derived at load time from the fp32 graph the
stages share, so it goes through the same one-compiled-model-for-all-stages path as fp32 and
bf16: the weights are quantised once, whatever the number of stages, and it needs no calibration
rows. Measured on DiT-B/2 (2 threads): 2.85x ONNX Runtime fp32 against NNCF static int8's 3.8x,
with lower error (rel RMS 1.8e-2 vs 2.3-4.2e-2 on held-out rows) and a third of its peak RSS.

The weights of every MatMul whose second input is a 2-D fp32 constant become int8, symmetric,
one scale per output channel, in the decompression pattern OpenVINO's CPU plugin fuses into its
int8 FullyConnected kernels (int8 constant -> f16 -> x f16 scale -> f32).
``DYNAMIC_QUANTIZATION_GROUP_SIZE`` then quantises each row of activations in groups of
``GROUP_SIZE`` on the fly (VNNI int8 dot products). Every other op stays fp32. The rounding is
NNCF's ``compress_weights(mode=INT8_SYM)`` (the signed scale that maps the channel's largest
magnitude to -128), so each MatMul gets the int8 weights NNCF would write (NNCF also compresses
the patch-embedding convolution and the label table, which stay fp32 here); tests hold the
outputs equal to NNCF's with those two left out. The runtime needs neither NNCF nor calibration.
"""

from __future__ import annotations

import numpy as np

GROUP_SIZE = 128  # activation group (DiT-B/2: 32 -> 2.4x, 64 -> 2.7x, 128 -> 2.9x, 256 -> 2.8x, per row 2.5x)


def quantize_int8(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """fp32 weights -> (int8 weights, fp16 scales, reduced over ``axis``, the input channels)
    with w ~= q * scale: NNCF's signed symmetric scale, (|min| if |min| >= max else -max) / 128."""
    lo = np.abs(w.min(axis=axis, keepdims=True))
    hi = w.max(axis=axis, keepdims=True)
    scale = np.where(lo >= hi, lo, -hi) / np.float32(128)
    eps = np.finfo(np.float32).eps
    scale = np.where(np.abs(scale) < eps, eps, scale).astype(np.float32)
    q = np.clip(np.round(w / scale), -128, 127).astype(np.int8)
    return q, scale.astype(np.float16)


def compress_weights(ov, model) -> int:
    """Rewrite ``model`` in place as above; -> how many MatMuls now have int8 weights."""
    from openvino import opset13 as ops

    made = {}  # (constant, axis) -> its int8 form: a weight several MatMuls read is quantised once
    n = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        src = op.input_value(1).get_node()
        if (src.get_type_name() != "Constant" or src.get_output_element_type(0) != ov.Type.f32
                or len(src.get_output_shape(0)) != 2):
            continue
        # input channels: axis 0 of a [in, out] weight, axis 1 with transpose_b ([out, in])
        axis = 1 if op.get_attributes()["transpose_b"] else 0
        key = (src.get_friendly_name(), axis)
        if key not in made:
            q, scale = quantize_int8(src.get_data(), axis)
            made[key] = ops.convert(ops.multiply(ops.convert(ops.constant(q), ov.Type.f16), ops.constant(scale)),
                                    ov.Type.f32)
        op.input(1).replace_source_output(made[key].output(0))
        n += 1
    model.validate_nodes_and_infer_types()
    return n
