"""The samplers of ``samplers.py`` with the sampler state as a torch tensor on the engine's
device, for engines that run there (AOTI). Same arithmetic, operation for operation: every
per-step coefficient is the same numpy float32 scalar (computed on the host, which costs no
device sync) and every tensor operation is float32, so the results equal the numpy sampler's
within float rounding (tests/compiler/test_aoti.py). Imported only by the AOTI path (needs torch).

``run_on_device`` takes one request through all its remaining steps without a host round trip
per step: x_T, the labels and every step's fresh noise go to the device once, each step is one
engine call (a CUDA graph replay on CUDA) plus a few elementwise kernels, and the final sample
comes back once. Per-stage time is measured with CUDA events (no sync inside the loop).
"""

from __future__ import annotations

import time

import numpy as np

from .diffusion import Diffusion
from .samplers import SOLVERS, model_input, needs_noise, solver_step


def guide(out, n: int, scale: float, policy: str, cin: int):
    g = 3 if policy == "first3" else cin
    cond, uncond = out[:n], out[n:]
    guided = cond.clone()
    guided[:, :g] = uncond[:, :g] + float(np.float32(scale)) * (cond[:, :g] - uncond[:, :g])
    return guided


def _f(v) -> float:
    """A float32 scalar as the Python float torch multiplies a float32 tensor by (exactly)."""
    return float(np.float32(v))


def split_output(d: Diffusion, out, k: int, cin: int):
    import torch

    eps = out[:, :cin]
    if d.variance_type == "learned_range":
        min_log = d.f32("posterior_log_variance_clipped", k)
        max_log = np.float32(np.log(d.betas)[k])
        frac = (out[:, cin:] + 1.0) / 2.0
        return eps, frac * _f(max_log) + (1.0 - frac) * _f(min_log)
    if d.variance_type == "fixed_large":
        var = np.append(d.posterior_variance[1], d.betas[1:]) if d.num_steps > 1 else d.betas
        return eps, torch.full_like(eps, _f(np.log(var)[k]))
    return eps, torch.full_like(eps, _f(d.f32("posterior_log_variance_clipped", k)))


def pred_xstart(d: Diffusion, x, eps, k: int, clip: bool = False):
    x0 = _f(d.f32("sqrt_recip_alphas_cumprod", k)) * x - _f(d.f32("sqrt_recipm1_alphas_cumprod", k)) * eps
    return x0.clamp(-1, 1) if clip else x0


def ddpm_step(d: Diffusion, x, out, k, cin, noise, clip=False):
    eps, log_var = split_output(d, out, k, cin)
    x0 = pred_xstart(d, x, eps, k, clip)
    mean = _f(d.f32("posterior_mean_coef1", k)) * x0 + _f(d.f32("posterior_mean_coef2", k)) * x
    if k == 0:
        return mean
    return mean + (0.5 * log_var).exp() * noise


def ddim_step(d: Diffusion, x, out, k, cin, noise, eta: float = 0.0, clip=False):
    eps, _ = split_output(d, out, k, cin)
    x0 = pred_xstart(d, x, eps, k, clip)
    eps = (_f(d.f32("sqrt_recip_alphas_cumprod", k)) * x - x0) / _f(d.f32("sqrt_recipm1_alphas_cumprod", k))
    ab, abp = d.f32("alphas_cumprod", k), d.f32("alphas_cumprod_prev", k)
    one = np.float32(1)
    sigma = np.float32(eta) * np.sqrt((one - abp) / (one - ab)) * np.sqrt(one - ab / abp)
    mean = x0 * _f(np.sqrt(abp)) + _f(np.sqrt(one - abp - sigma ** 2)) * eps
    if k == 0 or eta == 0:
        return mean
    return mean + _f(sigma) * noise


def step(d: Diffusion, sampler: str, x, out, k, cin, noise, eta: float = 0.0, clip=False):
    if sampler == "ddpm":
        return ddpm_step(d, x, out, k, cin, noise, clip)
    return ddim_step(d, x, out, k, cin, noise, eta, clip)


def _call(engine, x, t, y):
    """Any number of rows through an engine of static batch B on the device (chunks, the last
    padded with copies of its first row, as ``static_batch`` does on the host)."""
    import torch

    B, rows = engine.batch, x.shape[0]
    if rows == B:
        return engine.run_device(x, t, y)
    outs = []
    for lo in range(0, rows, B):
        c = [a[lo:lo + B] for a in (x, t, y)]
        n = c[0].shape[0]
        if n < B:
            c = [torch.cat([a, a[:1].expand(B - n, *a.shape[1:])]) for a in c]
        outs.append(engine.run_device(*c)[:n])
    return torch.cat(outs)


def run_on_device(model, request, progress=None) -> None:
    """All remaining steps of ``request`` with ``model``'s engines (each has ``run_device`` and
    ``device``); request.x ends as the numpy sample, request.stage_seconds as the engines' time."""
    import torch

    engines = model.runner.engines
    device = engines[0].device
    p, d = request.params, request.diffusion
    cin = model.cfg.in_channels
    policy = model.bundle.diffusion.cfg_channels
    null = model.bundle.model.null_class
    ks = list(range(request.k, -1, -1))
    # Fresh noise in the order the host sampler draws it (same generators, same numbers).
    noise_np = {k: request.noise(k) for k in ks if needs_noise(p.sampler, k, p.eta)}
    noise = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)).to(device) for k, v in noise_np.items()}
    x = torch.from_numpy(np.ascontiguousarray(request.x, np.float32)).to(device)
    solver = p.sampler in SOLVERS  # samplers.py's solver code, with Python-float coefficients
    state = request.state if solver else None
    y = np.asarray(request.class_ids, np.int64)
    if p.guided:
        y = np.concatenate([y, np.full(request.n, null, np.int64)])
    y = torch.from_numpy(y).to(device)
    rows = y.shape[0]
    cuda = device == "cuda" or str(device).startswith("cuda")
    events, host = [], {}
    with torch.inference_mode():
        for k in ks:
            t = float(d.timestep_map[k])
            sid = model.runner.stage_for(t)
            xm = model_input(d, p.sampler, x, k, _f) if solver else x
            xin = torch.cat([xm, xm]) if p.guided else xm
            tv = torch.full((rows,), float(t), dtype=torch.float32, device=device)
            if cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                out = _call(engines[sid], xin, tv, y)
                e1.record()
                events.append((sid, e0, e1))
            else:
                t0 = time.perf_counter()
                out = _call(engines[sid], xin, tv, y)
                host[sid] = host.get(sid, 0.0) + time.perf_counter() - t0
            if p.guided:
                out = guide(out, request.n, p.cfg_scale, policy, cin)
            if solver:
                x = solver_step(d, p.sampler, state, x, out, k, cin, p.clip_denoised, _f)
            else:
                x = step(d, p.sampler, x, out, k, cin, noise.get(k), p.eta, p.clip_denoised)
            request.k -= 1
            if progress:
                progress(1)
        request.x = x.to("cpu").numpy().copy()  # the one sync of the trajectory
    for sid, e0, e1 in events:
        request.stage_seconds[sid] += e0.elapsed_time(e1) / 1e3
    for sid, s in host.items():
        request.stage_seconds[sid] += s
