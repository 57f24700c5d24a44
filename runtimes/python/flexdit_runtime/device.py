"""``--device cpu|cuda`` (``Pipeline.from_bundle(..., device=)``): the user's choice of device,
mapped to a stage engine kind and execution providers the bundle and this machine have.

- ``cpu``: the bundle's ONNX graphs on ONNX Runtime's CPU provider (default), its OpenVINO
  models, ``--backend auto`` (CPU engines), or its AOTI packages if they were built for the CPU.
- ``cuda``: AOTI packages built for CUDA when the bundle has them (torch with CUDA needed), else
  the ONNX graphs on ONNX Runtime's CUDA provider (onnxruntime-gpu needed), or the bundle's
  TensorRT engines with ``--backend tensorrt``.

Everything that cannot work is refused before any engine loads, with one line that says what
the bundle has, what this process lacks, and what to do. No GPU was available to this work: the
cuda branch is tested only for its refusals (and its choice, with the availability probes
replaced).
"""

from __future__ import annotations

import dataclasses

from flexdit_bundle.manifest import Bundle, BundleError

from .settings import RuntimeSettings

DEVICES = ("cpu", "cuda")
CPU_ONLY_KINDS = ("openvino", "auto")  # engine kinds that run on the CPU only


def aoti_devices(bundle: Bundle) -> set:
    """The devices the bundle's AOTI packages were compiled for (empty: it has none)."""
    return {(a.get("aoti") or {}).get("device", "cuda") for st in bundle.stages for a in st["artifacts"]
            if a["backend"] == "aoti"}


def has_backend(bundle: Bundle, backend: str) -> bool:
    """Whether every stage has an artifact of ``backend``."""
    return all(any(a["backend"] == backend for a in st["artifacts"]) for st in bundle.stages)


def torch_cuda() -> str | None:
    """None when torch can run CUDA packages here, else why not (without importing torch's CUDA
    state when torch is absent)."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA GPU"
    return None


def ort_cuda() -> str | None:
    """None when ONNX Runtime's CUDA provider can run here, else why not."""
    from .ort_engine import CUDA, _gpu_present, _ort_version

    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return f"this onnxruntime ({_ort_version()}) has no CUDA provider (install onnxruntime-gpu: README, GPU)"
    if not _gpu_present():
        return "no NVIDIA GPU is visible to this process (no /dev/nvidia0)"
    return None


def _rebuild(bundle: Bundle, device: str) -> str:
    src = (bundle.model.get("source") or {}).get("file", "CHECKPOINT")
    return f"flexdit-export convert {src} -o {bundle.root} --force --backend aoti --device {device}"


def resolve(bundle: Bundle, device: str | None, backend: str | None, settings: RuntimeSettings,
            probes: dict | None = None) -> tuple[str, RuntimeSettings]:
    """-> (engine kind, settings) that run ``bundle`` on ``device``. ``device`` None keeps the
    caller's choices (backend None = onnx). ``probes``: {"torch_cuda": fn, "ort_cuda": fn} to
    replace the availability checks (tests)."""
    probes = probes or {}
    torch_probe = probes.get("torch_cuda", torch_cuda)
    ort_probe = probes.get("ort_cuda", ort_cuda)
    if device is None:
        return backend or "onnx", settings
    if device not in DEVICES:
        raise BundleError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    aoti = aoti_devices(bundle)
    named = tuple(p.lower() for p in settings.providers or ())
    gpu_named = [p for p in named if p in ("cuda", "tensorrt", "trt", "cudaexecutionprovider",
                                           "tensorrtexecutionprovider")]
    if device == "cpu":
        if gpu_named:
            raise BundleError(f"--device cpu contradicts --providers {','.join(settings.providers)}")
        backend = backend or "onnx"
        if backend == "tensorrt":
            raise BundleError("--device cpu: TensorRT engines run on a GPU only (use --backend onnx)")
        if backend == "aoti":
            if not aoti:
                raise BundleError(f"--device cpu --backend aoti: the bundle has no AOTI packages; run its ONNX graphs "
                                  f"(--backend onnx) or build them with: {_rebuild(bundle, 'cpu')}")
            if "cpu" not in aoti:
                built = ", ".join(sorted(aoti))
                raise BundleError(f"--device cpu: the bundle's AOTI packages were compiled for {built}; "
                                  f"run its ONNX graphs (--backend onnx) or rebuild with: {_rebuild(bundle, 'cpu')}")
            return backend, settings
        return backend, dataclasses.replace(settings, providers=("cpu",)) if backend in ("onnx", "auto") else settings

    # cuda
    if backend in CPU_ONLY_KINDS:
        raise BundleError(f"--device cuda: --backend {backend} runs on the CPU only "
                          "(leave --backend out, or use onnx, aoti or tensorrt)")
    if named and not gpu_named:
        raise BundleError(f"--device cuda contradicts --providers {','.join(settings.providers)}")
    if backend == "tensorrt":
        return backend, settings
    if backend in (None, "aoti") and "cuda" in aoti:
        why = torch_probe()
        if why is None:
            return "aoti", settings
        if backend == "aoti":
            raise BundleError(f"--device cuda: the bundle's AOTI packages need CUDA, but {why}")
        aoti_why = f"the bundle's AOTI packages need CUDA, but {why}"
    elif backend == "aoti":
        built = f"were compiled for {', '.join(sorted(aoti))}" if aoti else "do not exist"
        raise BundleError(f"--device cuda: the bundle's AOTI packages {built}; "
                          f"rebuild with: {_rebuild(bundle, 'cuda')}")
    else:
        aoti_why = ("the bundle's AOTI packages were compiled for the CPU" if aoti
                    else "the bundle has no AOTI packages")
    # the ONNX graphs on ONNX Runtime's CUDA provider
    if not has_backend(bundle, "onnx"):
        raise BundleError(f"--device cuda: {aoti_why}, and it has no ONNX graphs")
    why = ort_probe()
    if why is not None:
        raise BundleError(f"--device cuda: {aoti_why}, and for its ONNX graphs {why}")
    return "onnx", (settings if gpu_named else dataclasses.replace(settings, providers=("cuda",)))
