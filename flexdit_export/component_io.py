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

VAE_LATENT_SCALE = 0.18215  # SD's latent scale: parity draws latents of the size the sampler produces

_TORCH_DTYPES = {"float32": torch.float32, "int64": torch.int64}


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
    """One graph input or output. ``draw`` (inputs only) makes a sample from a generator."""
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

    def manifest_entry(self) -> dict:
        """The manifest's tensor entry (the format's name/shape/dtype, nothing more)."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


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

    def feeds(self, inputs) -> dict:
        """Input tensors (torch) keyed by graph input name, as numpy arrays for a session."""
        return {s.name: v.numpy() for s, v in zip(self.inputs, inputs)}

    def manifest_entries(self) -> dict:
        """The component's ``inputs``/``outputs`` entries of the manifest."""
        return {"inputs": [s.manifest_entry() for s in self.inputs],
                "outputs": [s.manifest_entry() for s in self.outputs]}

    def mismatch(self, entry: dict) -> str | None:
        """Why a manifest entry's ``inputs``/``outputs`` are not this declaration (None: they are)."""
        want = self.manifest_entries()
        for key in ("inputs", "outputs"):
            got = [_as_entry(e) for e in entry.get(key, [])]
            if got != want[key]:
                return f"{key} {_describe(got) or 'none'} in the bundle, {_describe(want[key])} declared for the checkpoint"
        return None


def _as_entry(e) -> dict:
    """A manifest tensor entry, read as a dict or a typed node, in ``manifest_entry``'s form."""
    e = e.to_json() if hasattr(e, "to_json") else e
    return {"name": e["name"], "shape": list(e["shape"]), "dtype": e["dtype"]}


def _describe(entries) -> str:
    return ", ".join(f"{e['name']} {e['dtype']}{list(e['shape'])}" for e in entries)


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
