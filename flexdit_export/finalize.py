"""The pass that turns a set of built artifacts into the manifest a bundle is published with.

It runs once, after every builder and before the quality gates, so the gates judge exactly the
bundle that is published: the stage graphs' weights are stored once per precision
(``share_weights``), the stages of a precision get one shared ONNX Runtime graph where it is
bit-identical (``shared_graph``), and the manifest is validated against the contract. The
writer (``bundle.BundleWriter``) then only stages, checks and publishes.
"""

from __future__ import annotations

from flexdit_bundle.manifest import FORMAT_NAME, FORMAT_VERSION, BundleError, validate_manifest
from flexdit_bundle.spec import Manifest

from .errors import UserError
from .share_weights import share_weights
from .shared_graph import add_shared_graphs


def finalize(root, manifest: dict, log=None) -> Manifest:
    """Rewrite the artifacts under ``root`` (the writer's staging directory) for publication;
    ``manifest``: as assembled, without its format. -> the typed manifest with its format,
    ``weights`` and ``shared_graphs``, validated. ``log`` hears why a shared graph was left out."""
    manifest = share_weights(root, {"format": {"name": FORMAT_NAME, "version": FORMAT_VERSION}, **manifest})
    manifest = add_shared_graphs(root, manifest, log)
    try:
        validate_manifest(manifest)
    except BundleError as e:
        raise UserError(f"internal error: the manifest being written is invalid: {e}") from None
    return Manifest.from_json(manifest)
