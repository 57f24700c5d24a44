"""What a request asks for (steps, sampler, guidance, eta, spacing, seed, initial noise), checked
once: ``flexdit-run`` and the Python API share this path, so a value either is refused with one
line that names it or is something the sampler handles correctly. Nothing here is lenient on
purpose: NaN guidance, a negative seed or complex initial noise would otherwise yield garbage
images or a traceback deep in numpy."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flexdit_bundle.errors import ArgumentError
from flexdit_bundle.manifest import BundleError
from flexdit_bundle.spec import SamplingDefaults

from .prompts import shown
from .samplers import SAMPLERS, SOLVERS

# 'linspace': each solver's diffusers default placement (the solvers' default, their only one for
# euler); 'sections'/'ddim': respacing (ddpm/ddim, and the kept timesteps for dpmpp-2m/unipc)
SPACINGS = ("sections", "ddim", "linspace")


@dataclass(frozen=True)
class SamplingParams:
    steps: int
    sampler: str
    cfg_scale: float
    eta: float
    spacing: str
    clip_denoised: bool

    @property
    def guided(self) -> bool:
        """Classifier-free guidance is on (a scale <= 1 turns it off)."""
        return self.cfg_scale > 1


def _integer(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentError(name.replace("-", "_"), f"must be an integer, got {shown(value)}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        bound = f"in {lo}..{hi}" if hi is not None else f"at least {lo}"
        raise ArgumentError(name.replace("-", "_"), f"must be {bound}, got {value}")
    return value


def _real(name: str, value, lo: float, hi: float | None = None) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ArgumentError(name.replace("-", "_"), f"must be a number, got {shown(value)}") from None
    if isinstance(value, (bool, complex, str)) or not math.isfinite(f):
        raise ArgumentError(name.replace("-", "_"), f"must be a finite number, got {shown(value)}")
    if f < lo or (hi is not None and f > hi):
        bound = f"in [{lo:g}, {hi:g}]" if hi is not None else f"at least {lo:g}"
        raise ArgumentError(name.replace("-", "_"), f"must be {bound}, got {f:g}")
    return f


def spacing_for(sampler: str, spacing) -> str:
    """The spacing a sampler runs with (None: its default), or one line on what it cannot use."""
    if spacing is None:
        return "linspace" if sampler in SOLVERS else "sections"
    if spacing not in SPACINGS:
        raise BundleError(f"unknown spacing {shown(spacing)} (choose from {', '.join(SPACINGS)})")
    if spacing == "linspace" and sampler not in SOLVERS:
        raise BundleError(f"--spacing linspace is for {', '.join(SOLVERS)}; {sampler} takes sections or ddim")
    if spacing != "linspace" and sampler == "euler":
        raise BundleError(f"--spacing {spacing} does not apply to euler (it places fractional timesteps, "
                          "linspace only)")
    return spacing


def max_steps(sampler: str, spacing: str, num_timesteps: int) -> int:
    """dpmpp-2m/unipc with linspace round T-1 .. 0 into N+1 timesteps: more than T-1 steps repeat one
    (a zero step size, NaN); everything else takes up to T."""
    return num_timesteps - 1 if spacing == "linspace" and sampler != "euler" else num_timesteps


def resolve_params(defaults: SamplingDefaults | dict, num_timesteps: int, *, steps=None, sampler=None, cfg_scale=None,
                   eta=None, spacing=None, clip_denoised=None) -> SamplingParams:
    """Fill what the caller left None from the bundle's ``defaults`` and check every value
    (``spacing`` None: the sampler's own default). ``defaults`` holds every value (a bundle's
    ``sampling_defaults``, or ``SAMPLING_DEFAULTS`` as a dict)."""
    defaults = SamplingDefaults.from_json(defaults)
    sampler = defaults.sampler if sampler is None else sampler
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise BundleError(f"unknown sampler {shown(sampler)} (choose from {', '.join(SAMPLERS)})")
    spacing = spacing_for(sampler, spacing)
    if sampler in SOLVERS:
        if eta is not None:
            raise BundleError(f"--eta is for ddim; {sampler} takes none")
        eta = 0.0
    clip = defaults.clip_denoised if clip_denoised is None else clip_denoised
    if not isinstance(clip, (bool, np.bool_)):
        raise BundleError(f"clip_denoised must be True or False, got {shown(clip)}")
    steps = _integer("steps", defaults.steps if steps is None else steps, 1, num_timesteps)
    most = max_steps(sampler, spacing, num_timesteps)
    if steps > most:
        raise BundleError(f"--steps must be in 1..{most} for {sampler} with {spacing} spacing (more would repeat "
                          f"a timestep), got {steps}")
    return SamplingParams(
        steps=steps,
        sampler=sampler,
        cfg_scale=_real("cfg-scale", defaults.cfg_scale if cfg_scale is None else cfg_scale, 0.0),
        # eta > 1 asks for more noise than the step removes: sqrt of a negative number, NaN images
        eta=_real("eta", defaults.eta if eta is None else eta, 0.0, 1.0),
        spacing=spacing, clip_denoised=bool(clip))


def check_seed(seed) -> int:
    """numpy seeds are non-negative integers (image i uses ``default_rng([seed, i])``)."""
    return _integer("seed", seed, 0)


def check_batch(batch) -> int | None:
    return None if batch is None else _integer("batch", batch, 1)


def check_noise_layout(dtype: np.dtype, got: tuple, n: int, shape: tuple) -> None:
    """x_T for n images is (n, C, H, W) or one (C, H, W) for all, of real floating point (ints,
    booleans or complex values are not noise a sampler can start from)."""
    if dtype.kind != "f":
        raise BundleError(f"initial noise must hold real floating-point values, got dtype {dtype}")
    if got not in (shape, (n,) + shape):
        raise BundleError(f"initial noise has shape {got}; expected {(n,) + shape} or {shape}")


def check_init_noise(init_noise, n: int, shape: tuple) -> np.ndarray:
    """x_T for n images (``check_noise_layout``), finite, as float32 (n, C, H, W)."""
    x = np.asarray(init_noise)
    check_noise_layout(x.dtype, x.shape, n, shape)
    x = np.broadcast_to(x, (n,) + shape).astype(np.float32)
    if not np.isfinite(x).all():
        raise BundleError("initial noise holds NaN or infinite values (after conversion to float32)")
    return x


NPY_MAGIC = b"\x93NUMPY"


def read_init_noise(path, n: int, shape: tuple) -> np.ndarray:
    """x_T for n images from a .npy file, read no further than the array a run can use: the
    header's dtype and shape are checked (``check_noise_layout``) before any data is read, and
    exactly the bytes they declare must follow, so /dev/zero or a huge file is one error, not all
    memory. Never a pickle (np.load would advise allow_pickle for any non-.npy file)."""
    where = f"cannot read --init-noise {path}"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8 or head[:6] != NPY_MAGIC:
                raise BundleError(f"{where}: not a .npy file")
            if head[6] not in (1, 2, 3):
                raise BundleError(f"{where}: unsupported .npy version")
            read_header = np.lib.format.read_array_header_1_0 if head[6] == 1 else np.lib.format.read_array_header_2_0
            got, fortran, dtype = read_header(f)
            if fortran:
                raise BundleError(f"{where}: only C-order arrays are read")
            check_noise_layout(dtype, got, n, shape)
            size = dtype.itemsize * math.prod(got)
            data = f.read(size)
            if len(data) != size or f.read(1):
                raise BundleError(f"{where}: the data size does not match its shape")
    except OSError as e:
        raise BundleError(f"{where}: {e.strerror or e}") from None
    except ValueError as e:
        if isinstance(e, BundleError):
            raise
        raise BundleError(f"{where}: {str(e).splitlines()[0]}") from None
    return np.frombuffer(data, dtype).reshape(got)
