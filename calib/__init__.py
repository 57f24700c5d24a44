"""calib: calibration data for quantising stage graphs.

Trajectory capture (``capture``: the PyTorch model sampled with the bundle's sampler, every
network call filed under its stage), per-stage sample sets on disk with a content hash
(``store``), and readers for ONNX Runtime's static quantiser and for TensorRT (``readers``).
``store`` and ``readers`` need only numpy (and onnxruntime / tensorrt for their readers);
``capture`` needs torch.
"""

from .store import CalibError, CalibSet, content_hash, write_set

__all__ = ["CalibError", "CalibSet", "content_hash", "write_set"]
