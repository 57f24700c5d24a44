"""Write a bundle atomically: everything goes into a temporary sibling directory, the stage
graphs' weights are stored once per precision (``share_weights``), the manifest is validated
against the contract's schema, then one rename publishes it. A failed conversion leaves
nothing behind."""

from __future__ import annotations

import shutil
from pathlib import Path

from flexdit_bundle.files import StagingDirectory, sha256_file
from flexdit_bundle.manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST, Bundle, BundleError, validate_manifest

from .errors import UserError
from .share_weights import share_weights


class BundleWriter:
    def __init__(self, target, force: bool = False):
        self.target = Path(target)
        if self.target.exists() and not force:
            raise UserError(f"{self.target} already exists (use --force to replace it)")
        if self.target.exists() and not (self.target / MANIFEST).exists() and any(self.target.iterdir()):
            raise UserError(f"{self.target} exists and is not a bundle; refusing to replace it")
        self.staging = StagingDirectory(self.target)
        self.tmp = self.staging.path

    @classmethod
    def updating(cls, target) -> "BundleWriter":
        """A writer that starts from a copy of an existing bundle and replaces it on commit."""
        w = cls(target, force=True)
        shutil.rmtree(w.tmp)
        shutil.copytree(w.target, w.tmp)
        return w

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.staging.discard()
        return False

    def path(self, rel: str) -> Path:
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def artifact(self, files: list[Path], backend: str, precision: str, **extra) -> dict:
        main = files[0]
        a = {"backend": backend, "precision": precision, "path": main.relative_to(self.tmp).as_posix(),
             "sha256": sha256_file(main), "bytes": main.stat().st_size, **extra}
        if len(files) > 1:
            d = files[1]
            a["external_data"] = {"path": d.relative_to(self.tmp).as_posix(), "sha256": sha256_file(d),
                                  "bytes": d.stat().st_size}
        return a

    def _complete(self, manifest: dict) -> dict:
        manifest = share_weights(self.tmp, {"format": {"name": FORMAT_NAME, "version": FORMAT_VERSION}, **manifest})
        try:
            validate_manifest(manifest)
        except BundleError as e:
            raise UserError(f"internal error: the manifest being written is invalid: {e}") from None
        return manifest

    def preview(self, manifest: dict) -> Bundle:
        """The bundle as it will be published, readable by the runtime before the rename (for
        checks that run the runtime on it)."""
        return Bundle(self.tmp, self._complete(manifest))

    def commit(self, manifest: dict) -> Path:
        import json

        manifest = self._complete(manifest)
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return self.staging.publish()
