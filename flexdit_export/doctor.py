"""``flexdit-export doctor``: what is installed and what can run here, so a user can tell which
extra to install (``.[compiler]``, ``.[gpu]``, ``.[tensorrt]``, ``.[openvino]``, ``.[serve]``) before a
conversion fails half-way. Imports nothing heavy unless it is there; never fails."""

from __future__ import annotations

import importlib
import os
import platform
import sys
from importlib import metadata

# distribution -> (what needs it, the extra that installs it)
PACKAGES = {
    "numpy": ("runtime", "(base)"), "onnxruntime": ("runtime: CPU provider", "(base)"),
    "onnxruntime-gpu": ("runtime: CUDA / TensorRT providers", "gpu"), "Pillow": ("runtime: PNGs", "(base)"),
    "torch": ("compiler", "compiler"), "onnx": ("compiler", "compiler"), "onnxscript": ("compiler", "compiler"),
    "safetensors": ("compiler: project checkpoints", "compiler"), "onnxsim": ("convert --onnxsim", "simplify"),
    "tensorrt": ("TensorRT engines", "tensorrt"), "openvino": ("OpenVINO engines", "openvino"),
    "nncf": ("OpenVINO int8 at convert time", "openvino-int8"), "ray": ("flexdit-serve (Ray Serve)", "serve"),
    "click": ("command lines", "(base)"),
}
def _serve_pin() -> str | None:
    """The Ray version the ``.[serve]`` extra pins, read from this package's own metadata
    (pyproject.toml is the one place it is written); None when the metadata is not there."""
    try:
        reqs = metadata.requires("flexdit-export") or []
    except metadata.PackageNotFoundError:
        return None
    for r in reqs:
        if r.startswith("ray[serve]==") and "serve" in r.split(";", 1)[-1]:
            return r.split("==", 1)[1].split(";", 1)[0].strip()
    return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _engines() -> dict:
    """Engine kind -> 'usable' or why not (its module imported, nothing loaded)."""
    out = {}
    try:
        from flexdit_runtime import stage_engine
    except ImportError as e:
        return {"runtime": f"not importable: {e}"}
    for kind, (_, target) in stage_engine.ENGINE_KINDS.items():
        module = target.split(":")[0]
        try:
            importlib.import_module(module)
        except Exception as e:  # an engine's library missing or broken: report, never fail
            out[kind] = f"unusable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
            continue
        out[kind] = "usable"
    if out.get("tensorrt") == "usable":
        try:
            importlib.import_module("tensorrt")
        except ImportError:
            out["tensorrt"] = "unusable (the tensorrt package is not installed: pip install '.[tensorrt]')"
    if out.get("openvino") == "usable" and _version("openvino") is None:
        out["openvino"] = "unusable (openvino is not installed: pip install '.[openvino]')"
    return out


def report() -> dict:
    packages = {d: _version(d) for d in PACKAGES}
    providers = []
    try:
        import onnxruntime as ort
        providers = list(ort.get_available_providers())
    except ImportError:
        pass
    cuda = None
    if packages["torch"]:
        try:
            import torch
            cuda = torch.cuda.is_available()
        except Exception:
            cuda = None
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count()
    return {"python": sys.version.split()[0], "platform": platform.platform(), "cores": cores,
            "flexdit-export": _version("flexdit-export"), "packages": packages,
            "onnxruntime_providers": providers, "torch_cuda": cuda, "engines": _engines(),
            "compiler_ready": all(packages[d] for d in ("torch", "onnx", "onnxscript", "safetensors")),
            "server_ready": bool(packages["ray"]) and packages["ray"] == (_serve_pin() or packages["ray"])}


def render(r: dict) -> str:
    lines = [f"flexdit-export {r['flexdit-export'] or '(not installed)'}; python {r['python']}; {r['platform']}; "
             f"{r['cores']} usable cores", "packages:"]
    for dist, (what, extra) in PACKAGES.items():
        v = r["packages"][dist]
        lines.append(f"  {dist:<16} {v or '-':<14} {what}" + ("" if v or extra in ("-", "(base)") else
                                                                 f"  (pip install '.[{extra}]')"))
    lines.append("onnxruntime providers: " + (", ".join(r["onnxruntime_providers"]) or "none (onnxruntime missing)"))
    if r["torch_cuda"] is not None:
        lines.append(f"torch sees a CUDA GPU: {'yes' if r['torch_cuda'] else 'no'}")
    lines.append("stage engines (flexdit-run --backend): " +
                 ", ".join(f"{k}: {v}" for k, v in r["engines"].items()))
    lines.append("compiler (flexdit-export convert): " + ("ready" if r["compiler_ready"] else
                                                           "missing packages: pip install '.[compiler]'"))
    lines.append("server (flexdit-serve): " + ("ready" if r["server_ready"] else
                                                "needs ray[serve]" + (f"=={_serve_pin()}" if _serve_pin() else "") + ": pip install '.[serve]'"))
    return "\n".join(lines)
