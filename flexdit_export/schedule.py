"""The temporal token-density schedule as data: which sparse grid serves which timesteps.

A schedule is an ordered list of stages, noisiest first (the order a sampler meets them);
each covers an inclusive range of *original* timestep indices and names a sparse grid side s
(M = s*s tokens in the SDTMs) or ``None`` for dense. Validation guarantees every index 0..T-1
is served exactly once, so a runtime can never meet a timestep without a graph.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

# paper4: four equal stages, s rising towards the clean end. The paper gives only pruning-rate
# ranges (r in [0.61, 0.86]); these square grids fit them (spec section 3).
PAPER4_GRIDS = {16: [6, 7, 9, 10], 32: [12, 15, 17, 20]}
PRESETS = ("released", "paper4", "dense")


@dataclass(frozen=True)
class Stage:
    t_min: int
    t_max: int
    sparse_grid: int | None  # None = dense

    def tokens(self, grid: int) -> int:
        return (self.sparse_grid or grid) ** 2

    def to_dict(self) -> dict:
        return {"t_min": self.t_min, "t_max": self.t_max, "sparse_grid": self.sparse_grid}


def paper4_grids(S: int) -> list[int]:
    if S in PAPER4_GRIDS:
        return list(PAPER4_GRIDS[S])
    return [max(1, min(S, math.floor(S * g / 16 + 0.5))) for g in PAPER4_GRIDS[16]]


def equal_stages(T: int, grids: list) -> list[Stage]:
    """len(grids) equal ranges, noisiest first: grids[0] serves the top of 0..T-1."""
    k = len(grids)
    bounds = [T * i // k for i in range(k + 1)]
    return [Stage(bounds[k - 1 - i], bounds[k - i] - 1, g) for i, g in enumerate(grids)]


def parse_schedule(spec: str, *, T: int, grid: int, family: str, semantic_size: int = 8) -> list[Stage]:
    """Preset name, 'lo:s,...' text, or a JSON file path -> validated stages."""
    spec = spec.strip()
    if family == "dit" and spec not in ("dense", "released"):
        raise UserError(f"schedule {spec!r} needs a FlexDiT; a plain DiT has only the dense stage")
    if spec == "dense" or family == "dit":
        stages = [Stage(0, T - 1, None)]
    elif spec == "released":
        stages = [Stage(0, T - 1, semantic_size)]
    elif spec == "paper4":
        stages = equal_stages(T, paper4_grids(grid))
    elif spec.endswith(".json") or Path(spec).is_file():
        stages = _from_json(spec)
    elif ":" in spec:
        stages = _from_text(spec, T)
    else:
        raise UserError(f"unknown schedule {spec!r}: use one of {', '.join(PRESETS)}, 'lo:s,...' "
                        "(e.g. 750:6,500:7,250:9,0:10) or a JSON file")
    validate(stages, T=T, grid=grid)
    return stages


def untrained_grids(stages: list[Stage], trained: list[Stage]) -> list[int]:
    """Sparse grids of ``stages`` that none of the ``trained`` stages used (a FlexDiT is trained
    on a few grids; others run, but with weights that never saw that token count)."""
    known = {st.sparse_grid for st in trained}
    return sorted({st.sparse_grid for st in stages if st.sparse_grid is not None and st.sparse_grid not in known})


def check_explicit(spec: str | None, flag: str = "--schedule") -> None:
    """An explicitly empty value is an error, not the default schedule."""
    if spec is not None and not str(spec).strip():
        raise UserError(f"{flag} is empty: give {', '.join(PRESETS)}, 'lo:s,...' (e.g. 750:6,500:7,250:9,0:10) or "
                        "a JSON file, or leave the option out for the checkpoint's own schedule")


def _grid_value(text: str, where: str):
    if text.strip().lower() in ("dense", "null", "none"):
        return None
    try:
        return int(text)
    except ValueError:
        raise UserError(f"schedule {where}: sparse grid {text!r} is not an integer or 'dense'") from None


def _from_text(spec: str, T: int) -> list[Stage]:
    pairs = []
    for part in spec.split(","):
        if part.count(":") != 1:
            raise UserError(f"schedule entry {part!r} is not lo:s")
        lo, s = part.split(":")
        try:
            lo = int(lo)
        except ValueError:
            raise UserError(f"schedule entry {part!r}: {lo!r} is not a timestep") from None
        pairs.append((lo, _grid_value(s, f"entry {part!r}")))
    lows = sorted({lo for lo, _ in pairs}, reverse=True)
    if len(lows) != len(pairs):
        raise UserError(f"schedule {spec!r} repeats a boundary")
    by_lo = dict(pairs)
    stages, hi = [], T - 1
    for lo in lows:
        stages.append(Stage(lo, hi, by_lo[lo]))
        hi = lo - 1
    return stages


def _from_json(path: str) -> list[Stage]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"schedule file not found: {path}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read schedule file {path}: {e}") from None
    items = data.get("stages") if isinstance(data, dict) else data
    try:
        stages = [Stage(int(d["t_min"]), int(d["t_max"]), None if d.get("sparse_grid") is None else int(d["sparse_grid"]))
                  for d in items]
    except (TypeError, KeyError, ValueError):
        raise UserError(f"schedule file {path}: expected a list of {{t_min, t_max, sparse_grid}}") from None
    return sorted(stages, key=lambda s: -s.t_max)


def validate(stages: list[Stage], *, T: int, grid: int) -> None:
    if not stages:
        raise UserError("schedule has no stages")
    covered = [0] * T
    for st in stages:
        if not 0 <= st.t_min <= st.t_max <= T - 1:
            raise UserError(f"schedule stage [{st.t_min}, {st.t_max}] is outside timesteps 0..{T - 1}")
        if st.sparse_grid is not None and not 1 <= st.sparse_grid <= grid:
            raise UserError(f"schedule stage [{st.t_min}, {st.t_max}]: sparse grid {st.sparse_grid} is outside 1..{grid}")
        for t in range(st.t_min, st.t_max + 1):
            covered[t] += 1
    overlap = [t for t, c in enumerate(covered) if c > 1]
    if overlap:
        raise UserError(f"schedule stages overlap at timesteps {_ranges(overlap)}")
    gaps = [t for t, c in enumerate(covered) if c == 0]
    if gaps:
        raise UserError(f"schedule leaves timesteps {_ranges(gaps)} uncovered")
    if [s.t_max for s in stages] != sorted((s.t_max for s in stages), reverse=True):
        raise UserError("schedule stages must be ordered noisiest (highest timesteps) first")


def _ranges(ts: list[int]) -> str:
    out, start = [], ts[0]
    for a, b in zip(ts, ts[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out[:5]) + (" ..." if len(out) > 5 else "")


def describe(stages: list[Stage], grid: int) -> str:
    n = grid * grid
    return "; ".join(f"t {s.t_max}..{s.t_min}: " + ("dense" if s.sparse_grid is None else
                     f"s={s.sparse_grid} ({s.tokens(grid)}/{n} tokens, r={1 - s.tokens(grid) / n:.2f})") for s in stages)
