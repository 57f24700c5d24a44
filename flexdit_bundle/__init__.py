"""The bundle contract: what the compiler writes and every runtime (Python, C++) reads.

Torch-free and small on purpose: the manifest reader and writer rules, its typed model (``spec``), its JSON Schema, the
format version and migration rule, the precision grammar, the TensorRT engine header, and the
recorded test vectors a runtime must reproduce. ``flexdit_export`` (compiler) and
``flexdit_runtime`` (Python runtime) both import it; ``docs/bundle-format.md`` describes it for
other languages.
"""

from .manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST, Bundle, BundleError, load_bundle, sha256_file, validate_manifest
from .spec import (Artifact, Calibration, Decoder, Diffusion, Manifest, Model, ModelConfig, Output, SamplingDefaults,
                   SharedGraph, Stage, TensorSpec, WeightFile, WeightTensor)

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MANIFEST", "Bundle", "BundleError", "load_bundle", "sha256_file",
           "validate_manifest", "Artifact", "Calibration", "Decoder", "Diffusion", "Manifest", "Model", "ModelConfig",
           "Output", "SamplingDefaults", "SharedGraph", "Stage", "TensorSpec", "WeightFile", "WeightTensor"]
