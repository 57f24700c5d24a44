"""Write a bundle atomically: everything goes into a temporary sibling directory, the manifest
(finished by ``finalize``) last, then one rename publishes it. The rename is exclusive unless
``force``: a bundle another process published meanwhile is never silently replaced. A failed
or interrupted conversion leaves nothing behind (nor does a killed one, for long: its
temporaries carry its pid and the next writer removes them)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from flexdit_bundle.files import StagingDirectory, make_temp_dir, remove_stale, sha256_file, target_problem
from flexdit_bundle.manifest import MANIFEST, Bundle
from flexdit_bundle.spec import Manifest

from .errors import UserError


SCRATCH_PREFIX = "flexdit-export-"


def check_target(target, force: bool) -> None:
    """Everything about ``-o`` that can be refused before any work."""
    problem = target_problem(target, force, "bundle directory")
    if problem:
        raise UserError(problem)
    target = Path(target)
    if target.is_dir() and not (target / MANIFEST).exists() and any(target.iterdir()):
        raise UserError(f"{target} exists and is not a bundle; refusing to replace it")


class BundleWriter:
    def __init__(self, target, force: bool = False):
        self.target = Path(target)
        self.force = force
        check_target(self.target, force)
        try:
            self.staging = StagingDirectory(self.target)
        except OSError as e:
            raise UserError(f"cannot write the bundle directory {self.target}: {e.strerror or e}") from None
        self.tmp = self.staging.path
        self._scratch = None

    def scratch(self) -> Path:
        """A private work directory in $TMPDIR (``flexdit-export-<pid>-*``), removed with the
        staging directory; stale ones of dead processes are removed first."""
        if self._scratch is None:
            remove_stale(tempfile.gettempdir(), SCRATCH_PREFIX)
            self._scratch = make_temp_dir(tempfile.gettempdir(), SCRATCH_PREFIX)
        return self._scratch

    @classmethod
    def updating(cls, target) -> "BundleWriter":
        """A writer that starts from a copy of an existing bundle and replaces it on commit."""
        w = cls(target, force=True)
        shutil.rmtree(w.tmp)
        shutil.copytree(w.target, w.tmp, ignore=lambda d, names: [n for n in names if Path(d, n) == w.tmp])
        return w

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.staging.discard()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
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

    def preview(self, manifest: Manifest) -> Bundle:
        """The bundle as it will be published (``manifest`` from ``finalize``), readable by the
        runtime before the rename (for checks that run the runtime on it)."""
        return Bundle(self.tmp, manifest)

    def commit(self, manifest: Manifest) -> Path:
        """Write ``manifest`` (from ``finalize``, which every bundle needs) into the staging
        directory and publish it."""
        if not isinstance(manifest, Manifest):
            raise UserError("internal error: the manifest being written was not finalized")
        try:
            text = json.dumps(manifest.to_json(), indent=2, allow_nan=False)  # NaN/Infinity are not JSON
        except ValueError as e:
            raise UserError(f"internal error: the manifest being written holds a non-finite number ({e})") from None
        (self.tmp / MANIFEST).write_text(text + "\n")
        try:
            return self.staging.publish(replace=self.force)
        except FileExistsError:
            self.staging.discard()
            raise UserError(f"{self.target} was created by another process while this conversion ran; "
                            "nothing was replaced (use --force to replace it)") from None
