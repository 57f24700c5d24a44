"""The one contract every artifact builder follows, and what it is given.

A *component* is one thing the bundle ships with its own artifacts (a schedule stage, the VAE
decoder: ``flexdit_export.components``); a *builder* makes one kind of artifact,
(backend, precision), for any component:

    files  = builder.build(component, ctx)          # write the artifact's files into the bundle
    record = builder.check(component, ctx, files)   # parity / quality gate: UserError when it fails
    entry  = builder.describe(component, ctx, files, record)   # the manifest artifact
    shared = builder.weight_files(component, ctx)   # weight files it wrote that ``entry`` binds

A builder instance serves one component (it may keep what ``build`` learned for ``describe``).
Weight files of the ONNX graphs are not a builder's: ``finalize`` writes them for the bundle.
A builder whose ``measures_parity`` is set compares against the PyTorch module; its record is
filed in the component's ``parity`` map under "backend/precision".
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class BuildContext:
    """What every builder of one conversion shares."""
    plan: object  # plan.ConvertPlan
    writer: object  # bundle.BundleWriter
    work: Path  # scratch directory, removed after the conversion
    calib: object | None  # calib.CalibSet when any stage builds a lower precision
    log: Callable[[str], None]
    shared: dict = field(default_factory=dict)  # builder family -> what its builders share in this conversion


@dataclass
class Component:
    """One module to export, with the inputs its parity checks draw and where its files go."""
    what: str  # for messages: "stage 0", "VAE decoder"
    stem: str  # bundle path without extension: "stages/stage0_s4", "decoder/vae_decoder"
    module: object  # torch.nn.Module
    make_inputs: Callable[[int], tuple]  # i -> fresh input tensors (-1: the export's sample)
    input_names: tuple
    output_names: tuple
    summary: str  # what the fp32 export's log line starts with
    optimize: bool = False  # save the fp32 ONNX graph after offline optimisation (plan's choice)
    stage_id: int | None = None  # calibration rows and held-out gates are per stage
    built: dict = field(default_factory=dict)  # (backend, precision) -> (files, artifact) built so far

    def source(self, backend: str, precision: str):
        """(files, artifact) of an artifact built earlier for this component (e.g. the fp32
        graph a quantised graph is derived from)."""
        return self.built[(backend, precision)]


class Builder(ABC):
    """One artifact kind: ``build`` writes its files, ``check`` measures them (parity or a
    quality gate; raises UserError on failure), ``describe`` gives the manifest artifact."""

    backend = ""
    precision = ""
    measures_parity = False

    @property
    def key(self) -> tuple[str, str]:
        return self.backend, self.precision

    @abstractmethod
    def build(self, comp: Component, ctx: BuildContext) -> list[Path]:
        ...

    @abstractmethod
    def check(self, comp: Component, ctx: BuildContext, files: list[Path]) -> dict:
        ...

    @abstractmethod
    def describe(self, comp: Component, ctx: BuildContext, files: list[Path], record: dict) -> dict:
        ...

    def weight_files(self, comp: Component, ctx: BuildContext) -> list[dict]:
        """The manifest ``weights`` entries of files this builder wrote and its artifact binds
        (several components' artifacts may name the same file: one entry per id is kept)."""
        return []


def check_parity(what: str, stats: dict, tol: float) -> None:
    from ..errors import UserError

    if not stats["finite"] or stats["max_rel"] > tol:
        raise UserError(f"{what} fails parity: max relative error {stats['max_rel']:.2e} > {tol:.0e}"
                        + ("" if stats["finite"] else " (non-finite output)"))
