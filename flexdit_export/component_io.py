"""What each component kind takes and returns, declared once.

A component kind (a schedule stage, the VAE decoder; a text encoder would be one more
declaration: token ids and an attention mask in, embeddings out) lists its inputs and outputs
as ``TensorSpec``s: name, static shape, dtype and, for inputs, how to draw a sample. Everything
else derives from that declaration, so the graph, the manifest and the checks cannot disagree:
the exporter's input/output names and sample shapes, the manifest's ``inputs``/``outputs``
entries, the parity checks' random inputs (at convert time and in ``verify``), and ``verify``'s
check that a bundle's tensors are the ones the checkpoint's graphs take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from flexdit_bundle.spec import TensorSpec as ManifestTensor

VAE_LATENT_SCALE = 0.18215  # SD's latent scale: parity draws latents of the size the sampler produces

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}  # the format's dtypes


@dataclass(frozen=True)
class Normal:
    """Standard normal draws (the sampler's noise and latents)."""

    def __call__(self, shape, dtype: str, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(_TORCH_DTYPES[dtype])


@dataclass(frozen=True)
class Integers:
    """Integers uniform in [low, high], both inclusive, stored in the tensor's dtype (a
    timestep is an integer the graph takes as float32)."""
    low: int
    high: int

    def __call__(self, shape, dtype: str, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(self.low, self.high + 1, shape, generator=gen).to(_TORCH_DTYPES[dtype])


@dataclass(frozen=True)
class DiffusionLatent:
    """Latents as the sampler hands them to the decoder: N(0,1) draws in the diffusion model's
    scale, mapped into this decoder's latent scale (and widened, to cover the tails)."""
    scale_factor: float

    def __call__(self, shape, dtype: str, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * VAE_LATENT_SCALE / self.scale_factor * 4


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: the manifest's tensor entry (``manifest_spec``) plus, for
    inputs, how to draw a sample (``draw``)."""
    name: str
    shape: tuple
    dtype: str = "float32"
    draw: Callable | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.dtype not in _TORCH_DTYPES:
            raise ValueError(f"tensor {self.name}: dtype {self.dtype!r} is not one of {sorted(_TORCH_DTYPES)}")

    def sample(self, gen: torch.Generator) -> torch.Tensor:
        if self.draw is None:
            raise ValueError(f"tensor {self.name} declares no way to draw a sample (an output?)")
        return self.draw(self.shape, self.dtype, gen)

    def manifest_spec(self) -> ManifestTensor:
        """The manifest's tensor entry, as the contract types it."""
        return ManifestTensor(name=self.name, shape=self.shape, dtype=self.dtype)


@dataclass(frozen=True)
class ComponentIO:
    """The inputs and outputs of one component's graphs, in the graphs' argument order."""
    inputs: tuple
    outputs: tuple

    @property
    def input_names(self) -> tuple:
        return tuple(s.name for s in self.inputs)

    @property
    def output_names(self) -> tuple:
        return tuple(s.name for s in self.outputs)

    def sample(self, gen: torch.Generator) -> tuple:
        """One draw of every input, in order, from one generator."""
        return tuple(s.sample(gen) for s in self.inputs)

    def sampler(self, seed: int) -> Callable[[int], tuple]:
        """``i -> fresh inputs``: successive calls continue one generator seeded with ``seed``,
        so a component's draws depend only on its seed, not on what else is built."""
        gen = torch.Generator().manual_seed(seed)
        return lambda i: self.sample(gen)

    def manifest_specs(self) -> dict:
        """The component's ``inputs``/``outputs`` of the manifest, as the contract types them."""
        return {"inputs": tuple(s.manifest_spec() for s in self.inputs),
                "outputs": tuple(s.manifest_spec() for s in self.outputs)}

    def manifest_entries(self) -> dict:
        """The component's ``inputs``/``outputs`` of the manifest in JSON form."""
        return {key: [t.to_json() for t in specs] for key, specs in self.manifest_specs().items()}

    def mismatch(self, entry) -> str | None:
        """Why a manifest entry's (typed or JSON) ``inputs``/``outputs`` are not this
        declaration; None when they are."""
        for key, want in self.manifest_specs().items():
            got = tuple(ManifestTensor.from_json(t) for t in
                        (entry.get(key, ()) if isinstance(entry, dict) else getattr(entry, key)))
            if [_key(t) for t in got] != [_key(t) for t in want]:
                return f"{key} {_describe(got) or 'none'} in the bundle, {_describe(want)} declared for the checkpoint"
        return None


def _key(t: ManifestTensor) -> tuple:
    return t.name, tuple(t.shape), t.dtype


def _describe(tensors) -> str:
    return ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in tensors)


def stage_io(cfg, stage, batch: int) -> ComponentIO:
    """A schedule stage: noisy latent, timestep (an original index inside the stage's range, as
    float32) and class label (the null class included) -> the model's output."""
    size = (cfg.input_size, cfg.input_size)
    return ComponentIO(
        inputs=(TensorSpec("x", (batch, cfg.in_channels, *size), "float32", Normal()),
                TensorSpec("t", (batch,), "float32", Integers(stage.t_min, stage.t_max)),
                TensorSpec("y", (batch,), "int64", Integers(0, cfg.num_classes))),
        outputs=(TensorSpec("out", (batch, cfg.out_channels, *size)),))


def decoder_io(cfg, vae) -> ComponentIO:
    """The VAE decoder: one latent of the diffusion model's size -> one RGB image."""
    img = cfg.input_size * vae.upscale
    return ComponentIO(
        inputs=(TensorSpec("latent", (1, cfg.in_channels, cfg.input_size, cfg.input_size), "float32",
                           DiffusionLatent(vae.scale_factor)),),
        outputs=(TensorSpec("image", (1, 3, img, img)),))
