"""File rules shared by every writer and reader of a bundle (or a calibration set):
content hashes, paths confined to their directory, and atomic publication of a directory."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data) -> str:
    return hashlib.sha256(data).hexdigest()


class StagingDirectory:
    """A temporary sibling of ``target`` that is filled and then published in one rename.

    ``publish()`` replaces ``target`` (moved aside first, removed after the rename), so a reader
    sees either the old directory or the new one, never a half-written one. ``discard()`` (or
    leaving a ``with`` block through an exception) removes the staging directory."""

    def __init__(self, target):
        self.target = Path(target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.discard()
        return False

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def publish(self) -> Path:
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
        os.replace(self.path, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target


class OutsideError(ValueError):
    """A relative path that leaves its directory (``..``, absolute, or through a symbolic link)."""


def resolve_inside(root, rel: str) -> Path:
    """``root / rel`` with every symbolic link resolved; refuses a path that ends up outside
    ``root`` (a manifest entry or a linked file must never make a runtime read elsewhere)."""
    base = Path(root).resolve()
    p = (base / rel).resolve()
    if Path(rel).is_absolute() or (p != base and base not in p.parents):
        raise OutsideError(f"{rel} points outside the bundle directory")
    return p
