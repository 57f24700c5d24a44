"""The few-step solvers (dpmpp-2m, unipc, euler) against diffusers' own schedulers driving the same
network from the same noise, through the runtime's API, step-wise Model and CLI; and their bad inputs."""

import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

from conftest import run_cli
from flexdit_bundle.manifest import BundleError
from flexdit_runtime import Pipeline
from flexdit_runtime.diffusion import SolverSchedule, linear_betas, solver_timesteps
from flexdit_runtime.samplers import SOLVERS, guide
from sampling_loop import sample

from pathlib import Path

import flexdit_bundle

TINY = Path(flexdit_bundle.__file__).resolve().parent / "conformance" / "tiny-bundle"
SCHEDULERS = {"dpmpp-2m": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler,
              "euler": EulerDiscreteScheduler}
STAGES4 = [(750, 999, 2), (500, 749, 3), (250, 499, 4), (0, 249, None)]  # four token densities


def _stage(stages, t):
    """The stage whose range holds floor(t) (a fractional timestep picks its stage as an integer one)."""
    return next(s for lo, hi, s in stages if lo <= math.floor(t) <= hi)


def diffusers_sample(sampler, steps, network, x_T, T=1000, timesteps=None):
    """diffusers' scheduler with its defaults over the linear schedule, driving ``network(x, t)``
    (the guided eps), from x_T."""
    sch = SCHEDULERS[sampler](num_train_timesteps=T, trained_betas=linear_betas(T))
    if timesteps is not None:
        sch.set_timesteps(timesteps=timesteps)
    else:
        sch.set_timesteps(steps)
    x = torch.from_numpy(x_T) * sch.init_noise_sigma
    for t in sch.timesteps:
        inp = sch.scale_model_input(x, t).numpy()
        x = sch.step(torch.from_numpy(network(inp, float(t))[:, :4]), t, x).prev_sample
    return x.numpy(), [float(t) for t in sch.timesteps]


def _rel(got, ref):
    return float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())


def _psnr(got, ref):
    mse = float(np.mean((got.astype(np.float64) - ref) ** 2))
    return 10 * math.log10(float(np.abs(ref).max()) ** 2 / mse) if mse else math.inf


@pytest.fixture(scope="module")
def torch_network(tiny_flex_model):
    """The project's PyTorch FlexDiT over a 4-stage schedule, with CFG 3 on all eps channels."""
    y = np.array([1, 7])
    calls = []

    def net(x, t):
        s = _stage(STAGES4, t)
        calls.append(s)
        n = x.shape[0]
        with torch.no_grad():
            out = tiny_flex_model(torch.from_numpy(np.concatenate([x, x])), torch.full((2 * n,), float(t)),
                                  torch.from_numpy(np.concatenate([y, np.full(n, 10)])), s).numpy()
        return guide(out, n, 3.0, "eps", 4)
    net.calls = calls
    return net


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 10, 25])
@pytest.mark.parametrize("sampler", SOLVERS)
def test_solver_matches_diffusers_through_four_stages_with_cfg(torch_network, sampler, steps):
    x_T = np.random.default_rng(steps).standard_normal((2, 4, 16, 16)).astype(np.float32)
    torch_network.calls.clear()
    ref, ts = diffusers_sample(sampler, steps, torch_network, x_T)
    if steps >= 10:
        assert set(torch_network.calls) == {2, 3, 4, None}  # every stage visited
    s = SolverSchedule(linear_betas(1000), solver_timesteps(sampler, 1000, steps, "linspace"))
    assert s.timesteps.tolist() == ts  # the timesteps the network receives, exactly
    got = sample(s, torch_network, x_T, cin=4, sampler=sampler)
    assert got.dtype == np.float32
    assert _rel(got, ref) <= 1e-5 and _psnr(got, ref) >= 100, (_rel(got, ref), _psnr(got, ref))


def test_dpmpp_with_section_spacing_matches_diffusers_custom_timesteps(torch_network):
    """--spacing keeps its meaning for dpmpp-2m: the respaced kept timesteps, as diffusers runs
    them when given ``timesteps=``."""
    x_T = np.random.default_rng(5).standard_normal((2, 4, 16, 16)).astype(np.float32)
    ts = solver_timesteps("dpmpp-2m", 1000, 12, "sections")
    ref, _ = diffusers_sample("dpmpp-2m", None, torch_network, x_T, timesteps=[int(t) for t in ts])
    got = sample(SolverSchedule(linear_betas(1000), ts), torch_network, x_T, cin=4, sampler="dpmpp-2m")
    assert _rel(got, ref) <= 1e-5


# --- the runtime: Pipeline / step-wise Model / CLI on a real bundle ---------------------------

@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_bundle(TINY, threads=1)


def _runner_network(pipe, y, cfg_scale):
    """The bundle's own stage graphs as diffusers' network: stage picked here by floor(t)."""
    b = pipe.bundle
    stages = [(st.t_min, st.t_max, st.id) for st in b.stages]
    null = b.model.null_class

    def net(x, t):
        sid = _stage(stages, t)
        n = x.shape[0]
        xx, yy = np.concatenate([x, x]), np.concatenate([y, np.full(n, null)])
        out = pipe.runner.run_rows(sid, xx, np.full(2 * n, t, np.float32), yy)
        return guide(out, n, cfg_scale, b.diffusion.cfg_channels, 4)
    return net


@pytest.mark.parametrize("sampler,steps", [("dpmpp-2m", 6), ("unipc", 5), ("euler", 7)])
def test_cli_solver_run_matches_diffusers_on_the_bundle(tmp_path, pipe, sampler, steps):
    """flexdit-run --sampler X: the seeded images are what diffusers' scheduler makes with the
    bundle's graphs as its network (fractional euler timesteps pick their stage by floor)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("0\n3\n")
    out = tmp_path / "out"
    run_cli("flexdit-run", prompts, "--bundle", TINY, "-o", out, "--sampler", sampler, "--steps", steps,
            "--cfg-scale", "2.5", "--seed", "4", "--save-npy", "--quiet")
    got = np.load(out / "samples.npy")
    y = np.array([0, 3])
    x_T = np.stack([np.random.default_rng([4, i]).standard_normal((4, 8, 8), dtype=np.float32) for i in range(2)])
    ref, _ = diffusers_sample(sampler, steps, _runner_network(pipe, y, 2.5), x_T)
    assert _rel(got, ref) <= 1e-5


def test_step_wise_model_mixes_solvers_and_step_counts(pipe):
    """One Model.step call advances requests of different solvers and step counts together;
    each ends bit for bit as it does alone (the solver history is per request)."""
    m = pipe.model
    kinds = [dict(sampler="dpmpp-2m", steps=5), dict(sampler="unipc", steps=8), dict(sampler="euler", steps=6),
             dict(sampler="ddim", steps=4), dict(sampler="unipc", steps=3, cfg_scale=1.0)]
    alone = []
    for i, kw in enumerate(kinds):
        r = m.start([i % 4], seed=i, **kw)
        while not r.done:
            m.step([r])
        alone.append(m.finish(r).samples)
    reqs = [m.start([i % 4], seed=i, **kw) for i, kw in enumerate(kinds)]
    while not all(r.done for r in reqs):
        m.step(reqs)
    for r, a in zip(reqs, alone):
        assert np.array_equal(m.finish(r).samples, a)


@pytest.mark.parametrize("kw,match", [
    (dict(sampler="heun"), "unknown sampler 'heun' \\(choose from ddpm, ddim, dpmpp-2m, unipc, euler\\)"),
    (dict(sampler="dpmpp-2m", eta=0.0), "--eta is for ddim; dpmpp-2m takes none"),
    (dict(sampler="euler", eta=0.3), "--eta is for ddim; euler takes none"),
    (dict(sampler="euler", spacing="sections"), "--spacing sections does not apply to euler"),
    (dict(sampler="ddim", spacing="linspace"), "--spacing linspace is for dpmpp-2m, unipc, euler"),
    (dict(sampler="unipc", steps=1000), "--steps must be in 1..999 for unipc with linspace spacing"),
    (dict(sampler="dpmpp-2m", steps=0), "--steps must be in 1..1000, got 0"),
    (dict(sampler="euler", steps=1001), "--steps must be in 1..1000, got 1001"),
    (dict(sampler="unipc", cfg_scale=float("nan")), "--cfg-scale must be a finite number"),
    (dict(sampler="euler", steps=2.5), "--steps must be an integer"),
])
def test_solver_bad_inputs_refused_before_work(pipe, kw, match):
    with pytest.raises(BundleError, match=match):
        pipe([0], **kw)


def test_solver_step_limits_are_the_usable_ones(pipe):
    """The largest step counts accepted run without NaN: 999 linspace steps for unipc (1000 would
    repeat timestep 0's neighbour), 1000 sections steps for dpmpp-2m."""
    s = SolverSchedule(linear_betas(1000), solver_timesteps("unipc", 1000, 999, "linspace"))
    assert len(set(s.timesteps.tolist())) == 999
    assert len(set(solver_timesteps("unipc", 1000, 1000, "linspace").tolist())) < 1000
    assert pipe.model.params(sampler="dpmpp-2m", steps=1000, spacing="sections").steps == 1000


@pytest.mark.parametrize("args,match", [
    (["--sampler", "dpmpp-2m", "--eta", "0.5"], "--eta is for ddim; dpmpp-2m takes none"),
    (["--sampler", "euler", "--spacing", "ddim"], "--spacing ddim does not apply to euler"),
    (["--sampler", "unipc", "--steps", "1000"], "--steps must be in 1..999 for unipc"),
    (["--sampler", "heun"], "invalid choice: 'heun'"),
])
def test_cli_solver_bad_inputs_one_line_exit_2(tmp_path, args, match):
    prompts = tmp_path / "p.txt"
    prompts.write_text("0\n")
    out = tmp_path / "out"
    p = run_cli("flexdit-run", prompts, "--bundle", TINY, "-o", out, *args, check=False)
    assert p.returncode == 2 and match in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not out.exists()


# --- convert-time defaults and inspect -------------------------------------------------------

def test_convert_refuses_default_sampler_with_steps_it_cannot_run(tmp_path):
    out = tmp_path / "b"
    p = run_cli("flexdit-export", "convert", "missing.pt", "-o", out, "--default-sampler", "unipc",
                "--default-steps", "1000", check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "--default-sampler unipc with 1000 default steps: --steps must be in 1..999" in p.stderr
    assert not out.exists()


def test_bundle_default_solver_runs_and_inspect_shows_it(tmp_path):
    """A bundle whose defaults name a solver (what convert --default-sampler writes) passes the
    schema, runs it when flexdit-run is given no --sampler, and inspect says so."""
    import json
    import shutil

    b = tmp_path / "bundle"
    shutil.copytree(TINY, b)
    m = json.loads((b / "manifest.json").read_text())
    m["diffusion"]["defaults"] = {"sampler": "euler", "steps": 3, "cfg_scale": 2.0}
    (b / "manifest.json").write_text(json.dumps(m))
    prompts = tmp_path / "p.txt"
    prompts.write_text("1\n")
    run_cli("flexdit-run", prompts, "--bundle", b, "-o", tmp_path / "a", "--save-npy", "--quiet")
    run_cli("flexdit-run", prompts, "--bundle", b, "-o", tmp_path / "e", "--save-npy", "--quiet",
            "--sampler", "euler", "--steps", "3", "--cfg-scale", "2")
    assert np.array_equal(np.load(tmp_path / "a" / "samples.npy"), np.load(tmp_path / "e" / "samples.npy"))
    assert "sampling defaults: euler 3 steps, cfg 2" in run_cli("flexdit-export", "inspect", b).stdout


@pytest.mark.parametrize("sampler,steps,cfg", [("dpmpp-2m", 5, 2.5), ("unipc", 6, 4.0), ("euler", 4, 1.0)])
def test_device_sampler_matches_the_host_sampler(pipe, sampler, steps, cfg):
    """torch_sampler.run_on_device (the AOTI/GPU path) runs the same solver with the state on the
    device: here with the bundle's ONNX engines behind a torch run_device stand-in."""
    from types import SimpleNamespace

    from flexdit_runtime.torch_sampler import run_on_device

    class OnDevice:
        def __init__(self, e):
            self.e, self.batch, self.device = e, e.batch, "cpu"

        def run_device(self, x, t, y):
            return torch.from_numpy(self.e.run(x.numpy(), t.numpy(), y.numpy()))

    m = pipe.model
    host = m.start([0, 2], seed=3, sampler=sampler, steps=steps, cfg_scale=cfg)
    m.run(host)
    dev = m.start([0, 2], seed=3, sampler=sampler, steps=steps, cfg_scale=cfg)
    runner = SimpleNamespace(engines=[OnDevice(e) for e in m.runner.engines], stage_for=m.runner.stage_for)
    run_on_device(SimpleNamespace(runner=runner, cfg=m.cfg, bundle=m.bundle), dev)
    assert dev.done and _rel(dev.x, host.x) <= 1e-5
