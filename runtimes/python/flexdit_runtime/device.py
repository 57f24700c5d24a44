"""``--device cpu|cuda`` (``Pipeline.from_bundle(..., device=)``): the user's choice of device,
mapped to a stage engine kind and settings the bundle and this machine have.

The kinds decide for themselves (``StageEngine.on_device``); this module only asks them. With
``--backend`` given, that kind must run on the device or it refuses in one line. Without it,
the kinds that declare themselves a default for the device (``StageEngine.default_on``) are
tried in rank order, and the first that can run the bundle there is used: on the CPU that is
ONNX Runtime's CPU provider (the CPU default stays torch-free); on CUDA, AOTI packages built for
CUDA when the bundle has them and torch sees a GPU, else the ONNX graphs on ONNX Runtime's CUDA
provider. When none can, one line gives every kind's reason.

Everything that cannot work is refused before any engine loads, with one line that says what
the bundle has, what this process lacks, and what to do. No GPU was available to this work: the
cuda branch is tested only for its refusals (and its choice, with the availability probes
replaced).
"""

from __future__ import annotations

import dataclasses

from flexdit_bundle.manifest import Bundle, BundleError

from .ort_engine import names_gpu_provider, ort_cuda  # noqa: F401  (ort_cuda: public, used by tests)
from .settings import RuntimeSettings
from .stage_engine import AUTO, AUTO_DEVICES, DEFAULT_KIND, DEVICE_NAMES, NotChosen, engine_classes, engine_kind, \
    kinds_on, or_list

DEVICES = ("cpu", "cuda")


class _AssumeAvailable(dict):
    def get(self, key, default=None):
        return lambda: None


# probes for a machine that is not this one (a cluster's replicas): every availability check passes
ASSUME_AVAILABLE = _AssumeAvailable()


def resolve(bundle: Bundle, device: str | None, backend: str | None, settings: RuntimeSettings,
            probes: dict | None = None) -> tuple[str, RuntimeSettings]:
    """-> (engine kind, settings) that run ``bundle`` on ``device``. ``device`` None keeps the
    caller's choices (backend None = the default kind). ``probes``: {name: fn} replacing the
    kinds' availability checks (``torch_cuda``, ``ort_cuda``; fn() -> None or why not), or
    ``ASSUME_AVAILABLE``."""
    probes = probes if probes is not None else {}
    if device is None:
        return backend or DEFAULT_KIND, settings
    if device not in DEVICES:
        raise BundleError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    gpu_named = names_gpu_provider(settings.providers)
    if (device == "cpu" and gpu_named) or (device != "cpu" and settings.providers and not gpu_named):
        raise BundleError(f"--device {device} contradicts --providers {','.join(settings.providers)}")
    if backend == AUTO:
        if device not in AUTO_DEVICES:
            others = kinds_on(device)
            use = f" (leave --backend out, or use {or_list(others)})" if others else ""
            where = " or ".join(DEVICE_NAMES[d] for d in AUTO_DEVICES)
            raise BundleError(f"--device {device}: --backend auto runs on the {where} only{use}")
        return AUTO, dataclasses.replace(settings, providers=("cpu",))
    if backend is not None:
        return backend, engine_kind(backend)[1].on_device(bundle, device, settings, probes, explicit=True)
    tried = sorted((c for c in engine_classes() if device in c.default_on), key=lambda c: c.default_on[device])
    reasons = []
    for cls in tried:
        try:
            return cls.kind, cls.on_device(bundle, device, settings, probes, explicit=False)
        except NotChosen as e:
            reasons.append(str(e))
    raise BundleError(f"--device {device}: {', and '.join(reasons) or 'no engine kind runs the bundle there'}")
