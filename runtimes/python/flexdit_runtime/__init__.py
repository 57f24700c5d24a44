"""flexdit-run: the torch-free runtime for flexdit-export bundles (numpy + onnxruntime + Pillow)."""

from flexdit_bundle.manifest import Bundle, BundleError, load_bundle
from .pipeline import Pipeline, Result

__all__ = ["Bundle", "BundleError", "load_bundle", "Pipeline", "Result"]
__version__ = "0.1.0"
