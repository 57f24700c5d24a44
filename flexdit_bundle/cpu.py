"""The CPU a conversion's quality gates ran on (``error.measured_on`` of an artifact): ONNX
Runtime and OpenVINO pick their integer, fp16 and bf16 kernels by instruction set, so a gate's
error is a fact about that machine's kernels (docs/bundle-format.md, "Quality gates and the CPU")."""

from __future__ import annotations

import platform

# Instruction-set features (numpy's names) that choose those kernels.
KERNEL_FEATURES = ("AVX2", "AVX512F", "AVX512BW", "AVX512VNNI", "AVXVNNI", "AVX512BF16", "AVX512FP16",
                   "ASIMD", "ASIMDHP", "ASIMDDP", "ASIMDFHM", "SVE")


def measured_on() -> dict:
    """This CPU's architecture and kernel-choosing features, from numpy's CPUID probe (an emulated
    CPU, such as qemu -cpu Haswell, reports what it emulates)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as found
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as found
    return {"arch": platform.machine().lower(), "features": [f for f in KERNEL_FEATURES if found.get(f)]}
