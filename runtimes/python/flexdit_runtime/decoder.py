"""The bundle's VAE decoder graph (latent -> image in [-1, 1]); pixel-space bundles have none."""

from __future__ import annotations

import dataclasses

import numpy as np

from flexdit_bundle.manifest import Bundle, BundleError

from .ort_engine import make_session, ort_error, provider_options, resolve_providers, session_io
from .settings import RuntimeSettings
from .static_batch import in_static_batches


class Decoder:
    """Runs the decoder by the input and output names the manifest declares, in its static batch."""

    def __init__(self, bundle: Bundle, settings: RuntimeSettings | None = None, weights=None):
        settings = settings or RuntimeSettings()
        d = bundle.decoder
        self.artifact = art = bundle.artifact(d, "onnx")
        providers = resolve_providers(settings.providers)
        # the stage engines' provider options (device, precision flags), without a CUDA graph: the
        # decoder runs once per request through plain run(), not through fixed bound buffers
        options = provider_options(providers, dataclasses.replace(settings, cuda_graph=False), art.precision)
        self.session = make_session(bundle.path(art), providers, settings.threads, weights, art,
                                    shared_pool=settings.apply(), prepack_weights=settings.prepack_weights,
                                    provider_options=options)
        # a decoder bound to a shared weight file: its sha256 is checked before the first image
        # (the stage engines' verify() ran before this file was read)
        if weights is not None:
            weights.verify()
        self.batch = d.inputs[0].shape[0]
        self.in_name, self.out_name = d.inputs[0].name, d.outputs[0].name
        inputs, outputs = session_io(self.session)
        if set(inputs) != {self.in_name} or self.out_name not in outputs:
            raise BundleError(f"{art.path}: the manifest names the decoder's input {self.in_name!r} and output "
                              f"{self.out_name!r} but the graph has {sorted(inputs)} -> {sorted(outputs)}; "
                              "re-run flexdit-export convert")

    def _run(self, z: np.ndarray) -> np.ndarray:
        try:
            return self.session.run([self.out_name], {self.in_name: np.ascontiguousarray(z, np.float32)})[0]
        except Exception as e:  # onnxruntime raises its own exception types
            raise BundleError(f"the decoder ({self.artifact.path}) failed in ONNX Runtime: {ort_error(e)}") from None

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return in_static_batches(self._run, self.batch, z)
