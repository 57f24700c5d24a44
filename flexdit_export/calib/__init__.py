"""flexdit_export.calib: calibration data for quantising stage graphs.

Trajectory capture (``capture``: the PyTorch model sampled with the bundle's sampler, every
network call filed under its stage), per-stage sample sets on disk with a content hash
(``store``), and the batch readers the quantiser and the error gates use (``readers``).
``store`` and ``readers`` need only numpy (and onnxruntime for its reader); ``capture`` needs
torch.

Dependencies run one way: the rest of the compiler uses calib; calib imports only
the bundle contract (``flexdit_bundle``) and the runtime's respacing rule, never the compiler
(the sampler it records through is passed in). ``tests/cli/test_imports.py`` holds that.
"""

from .store import CalibError, CalibSet, content_hash, write_set

__all__ = ["CalibError", "CalibSet", "content_hash", "write_set"]
