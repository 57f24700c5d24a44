"""flexdit-run: the torch-free runtime for flexdit-export bundles (numpy + onnxruntime + Pillow).

``Model`` is a loaded bundle (immutable, shared between threads) with a step-wise sampler over
per-request ``Request`` objects; ``Pipeline`` runs whole prompt lists through it;
``RuntimeSettings`` says how (threads, providers, shared pool).
"""

from flexdit_bundle.manifest import Bundle, BundleError, load_bundle
from .model import Model
from .pipeline import Pipeline
from .request import Request, Result
from .sampling_params import SamplingParams
from .settings import RuntimeSettings
from .stage_engine import StageEngine

__all__ = ["Bundle", "BundleError", "load_bundle", "Model", "Pipeline", "Request", "Result", "RuntimeSettings",
           "SamplingParams", "StageEngine"]
__version__ = "0.1.0"
