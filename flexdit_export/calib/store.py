"""Per-stage calibration sets on disk, with the settings that made them and a content hash.

    DIR/calib.json            format, settings, per stage: rows, timesteps seen, files + sha256
    DIR/stage{k}.calib.npz    x (N, C, H, W) float32, t (N,) float32, y (N,) int64: calibration rows
    DIR/stage{k}.holdout.npz  the same from other images: held out for the per-stage error gates

The hash covers the settings and every array file, so it changes whenever anything that made
the set changes (model weights, schedule, sampler, steps, guidance, seeds, counts). A set is
written into a staging sibling directory and renamed into place (``flexdit_bundle.files.
StagingDirectory``, the bundle writer's rule): never half-written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flexdit_bundle.errors import FlexditError
from flexdit_bundle.files import StagingDirectory, sha256_file

FORMAT = "flexdit-calib"
VERSION = 1
INDEX = "calib.json"
SPLITS = ("calib", "holdout")


class CalibError(FlexditError):
    """The calibration set is missing, incomplete, modified or made for another model/schedule."""


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def content_hash(settings: dict, file_hashes: list[str]) -> str:
    h = hashlib.sha256(canonical_json(settings).encode())
    for fh in file_hashes:
        h.update(fh.encode())
    return h.hexdigest()


def write_set(out, settings: dict, stages: list[dict], arrays: dict, replace: bool = False) -> "CalibSet":
    """``stages``: [{id, t_min, t_max, sparse_grid}]; ``arrays[(sid, split)] = (x, t, y)``."""
    out = Path(out)
    if out.exists() and not replace:
        raise CalibError(f"{out} already exists")
    if out.exists() and not (out / INDEX).is_file() and any(out.iterdir()):
        raise CalibError(f"{out} exists and is not a calibration set; refusing to replace it")
    with StagingDirectory(out) as staging:
        tmp = staging.path
        entries, hashes = [], []
        for st in stages:
            e = {k: st[k] for k in ("id", "t_min", "t_max", "sparse_grid")}
            for split in SPLITS:
                x, t, y = arrays[(st["id"], split)]
                name = f"stage{st['id']}.{split}.npz"
                np.savez(tmp / name, x=np.ascontiguousarray(x, np.float32), t=np.asarray(t, np.float32),
                         y=np.asarray(y, np.int64))
                fh = sha256_file(tmp / name)
                hashes.append(fh)
                e[split] = {"file": name, "rows": int(len(t)), "sha256": fh,
                            "t_values": sorted({int(v) for v in np.asarray(t)})}
            entries.append(e)
        index = {"format": FORMAT, "version": VERSION, "sha256": content_hash(settings, hashes),
                 "settings": settings, "stages": entries}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        staging.publish()
    return CalibSet.open(out)


@dataclass
class CalibSet:
    root: Path
    index: dict

    @classmethod
    def open(cls, path, verify: bool = True) -> "CalibSet":
        root = Path(path)
        f = root / INDEX
        if not f.is_file():
            raise CalibError(f"no calibration set at {root} ({INDEX} missing); capture one with "
                             "flexdit-export calibrate CKPT -o DIR")
        try:
            index = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CalibError(f"cannot read {f}: {e}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise CalibError(f"{f} is not a {FORMAT} index")
        if index.get("version", 0) > VERSION:
            raise CalibError(f"calibration set {root} has format version {index['version']}, newer than this tool")
        cs = cls(root, index)
        if verify:
            hashes = []
            for st in index["stages"]:
                for split in SPLITS:
                    e = st[split]
                    p = root / e["file"]
                    if not p.is_file():
                        raise CalibError(f"calibration set {root} is incomplete: {e['file']} is missing; recapture it")
                    fh = sha256_file(p)
                    if fh != e["sha256"]:
                        raise CalibError(f"calibration set {root} was modified: {e['file']} does not match its "
                                         "sha256; recapture it")
                    hashes.append(fh)
            if content_hash(index["settings"], hashes) != index["sha256"]:
                raise CalibError(f"calibration set {root}: {INDEX} was modified (content hash mismatch); recapture it")
        return cs

    @property
    def sha256(self) -> str:
        return self.index["sha256"]

    @property
    def settings(self) -> dict:
        return self.index["settings"]

    @property
    def stages(self) -> list[dict]:
        return self.index["stages"]

    def stage(self, sid: int) -> dict:
        for st in self.stages:
            if st["id"] == sid:
                return st
        raise CalibError(f"calibration set {self.root} has no stage {sid}")

    def rows(self, sid: int, split: str = "calib") -> int:
        return self.stage(sid)[split]["rows"]

    def arrays(self, sid: int, split: str = "calib") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, t, y) of one stage and split, loaded from disk (a set is capped per stage)."""
        with np.load(self.root / self.stage(sid)[split]["file"]) as z:
            return z["x"], z["t"], z["y"]

    def check_matches(self, model_sha256: str, stages: list[dict], num_timesteps: int) -> None:
        """Refuse a set made for other weights or another schedule."""
        s = self.settings
        if s.get("model_sha256") != model_sha256:
            raise CalibError(f"calibration set {self.root} was captured from other model weights; recapture it "
                             "for this checkpoint")
        mine = [(st["t_min"], st["t_max"], st["sparse_grid"]) for st in self.stages]
        want = [(st["t_min"], st["t_max"], st["sparse_grid"]) for st in stages]
        if mine != want or s.get("num_timesteps") != num_timesteps:
            raise CalibError(f"calibration set {self.root} was captured for schedule {_text(mine)}, not {_text(want)}; "
                             "recapture it with the bundle's schedule")

    def summary(self) -> dict:
        return {"path": str(self.root), "sha256": self.sha256, "settings": self.settings,
                "stages": [{"id": st["id"], "t_min": st["t_min"], "t_max": st["t_max"],
                            "sparse_grid": st["sparse_grid"], "calib_rows": st["calib"]["rows"],
                            "holdout_rows": st["holdout"]["rows"], "t_values": st["calib"]["t_values"]}
                           for st in self.stages]}


def _text(stages) -> str:
    return ",".join(f"{lo}:{'dense' if s is None else s}" for lo, _, s in stages)
