"""Rebuild the recorded conformance vectors of the bundle contract (flexdit_bundle/conformance/).

    python3 tools/gen_conformance.py                 # everything (needs torch and the compiler)
    python3 tools/gen_conformance.py --only tables   # the torch-free deterministic part
    python3 tools/gen_conformance.py --out DIR       # write elsewhere (default: the repository)

What comes from where, so that the vectors check a runtime against something other than itself:
- diffusion tables and respaced timesteps: computed here, by a float64 restatement of the
  improved-DDPM code (``space_timesteps``, ``GaussianDiffusion`` / ``SpacedDiffusion``), not by
  the Python runtime. Deterministic: ``tests/bundle/test_conformance.py`` regenerates them and
  compares them with the recorded files byte for byte.
- guide / DDPM / DDIM step outputs: the PyTorch reference sampler
  (``flexdit_export.reference_sampler``) on fixed random inputs.
- tiny bundle: built by the real CLI (``flexdit-export convert``) from a random-weight tiny
  FlexDiT; its trajectories are the Python runtime's (``Pipeline.__call__`` with the recorded
  noise), each checked here against the PyTorch reference sampler on the PyTorch model (the
  recorded ``pytorch_reference_max_rel``).

Everything is seeded: rerunning on the same library versions reproduces every file; a different
torch / onnxruntime may change the tiny bundle's bytes and the trajectories' last bits, so only
the tables and timesteps are held byte-identical by the tests.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFORMANCE = REPO / "flexdit_bundle" / "conformance"

T = 1000
BETA_START, BETA_END = 1e-4, 0.02
# name -> respacing spec. "base": the training process itself (betas = the linear schedule, not
# respaced; only its betas and alphas_cumprod, which respacing starts from). "1000": the full
# process as a sampler uses it (every timestep kept, betas recomputed by the respacing rule, as
# DiT's create_diffusion does; within ~4e-13 of base). "10,15,20": three sections of 334/333/333
# timesteps (T not divisible by the section count); "ddim30": stride 34, which does not divide T.
PROCESSES = {"base": None, "1000": "1000", "100": "100", "250": "250", "ddim25": "ddim25", "ddim50": "ddim50",
             "10,15,20": "10,15,20", "ddim30": "ddim30"}
BASE_FIELDS = ("betas", "alphas_cumprod")
TABLE_FIELDS = ("betas", "log_betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2")

# The tiny model of the recorded bundle: every block kind (Poolingformer, token merge, semantic,
# token recover), 16 dense tokens, 3 stages (s=2, s=3, dense), batch 2.
TINY = dict(family="flexdit", hidden_size=16, num_heads=2, patch_size=2, input_size=8, in_channels=4, num_classes=4,
            depth=4, num_poolingformer=1, num_dumbbell=1, dumbbell_group=[1, 1, 1, 0], num_normal_block=0,
            semantic_size=2)
SCHEDULE = "600:2,300:3,0:dense"
TRAJECTORIES = [
    dict(name="ddpm10_cfg4", sampler="ddpm", steps=10, spacing="sections", eta=0.0, cfg_scale=4.0, seed=11),
    dict(name="ddim8_eta0_cfg2", sampler="ddim", steps=8, spacing="ddim", eta=0.0, cfg_scale=2.0, seed=12),
    dict(name="ddim8_eta0.5_nocfg", sampler="ddim", steps=8, spacing="sections", eta=0.5, cfg_scale=1.0, seed=13),
]
CLASS_IDS = [0, 2, 3]  # three images: with CFG one image per graph call, without CFG a padded last call
TRAJECTORY_TOL = 1e-5
STEP_TOL = 1e-6
# Few-step solvers: schedules, update sequences (diffusers' schedulers fed fixed model
# outputs) and trajectories of the tiny bundle through all three stages.
SOLVER_SCHEDULES = [("dpmpp-2m", 1, "linspace"), ("dpmpp-2m", 4, "linspace"), ("dpmpp-2m", 25, "linspace"),
                    ("dpmpp-2m", 12, "sections"), ("unipc", 3, "linspace"), ("unipc", 10, "linspace"),
                    ("euler", 1, "linspace"), ("euler", 7, "linspace"), ("euler", 15, "linspace")]
SOLVER_SEQUENCES = [("dpmpp-2m", 5), ("unipc", 5), ("euler", 4)]
SOLVER_TRAJECTORIES = [
    dict(name="dpmpp-2m6_cfg2.5", sampler="dpmpp-2m", steps=6, spacing="linspace", cfg_scale=2.5, seed=21),
    dict(name="unipc5_cfg4", sampler="unipc", steps=5, spacing="linspace", cfg_scale=4.0, seed=22),
    dict(name="euler7_nocfg", sampler="euler", steps=7, spacing="linspace", cfg_scale=1.0, seed=23),
    dict(name="dpmpp-2m9_sections_cfg2", sampler="dpmpp-2m", steps=9, spacing="sections", cfg_scale=2.0, seed=24),
]
SEQUENCE_TOL = 1e-5


# --- reference restatement of improved-DDPM (float64) -------------------------------------

def space_timesteps(num_timesteps: int, spec: str) -> list[int]:
    """Kept original timesteps, ascending: 'ddimN' takes the smallest integer stride that gives
    exactly N timesteps from 0; 'a,b,c' splits 0..T-1 into len sections (the first T % len one
    longer) and takes count timesteps per section at a fractional stride, rounded half to even."""
    if spec.startswith("ddim"):
        want = int(spec[4:])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == want:
                return list(range(0, num_timesteps, stride))
        raise ValueError(spec)
    counts = [int(c) for c in spec.split(",")]
    size_per, extra = num_timesteps // len(counts), num_timesteps % len(counts)
    start, steps = 0, set()
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.add(start + round(cur))
            cur += stride
        start += size
    return sorted(steps)


def process_tables(keep: list[int] | None) -> dict:
    base = np.linspace(BETA_START * 1000 / T, BETA_END * 1000 / T, T, dtype=np.float64)
    if keep is None:
        betas = base
    else:
        alphas_cumprod, kept = np.cumprod(1.0 - base, axis=0), set(keep)
        last, new = 1.0, []
        for i, ac in enumerate(alphas_cumprod):
            if i in kept:
                new.append(1 - ac / last)
                last = ac
        betas = np.array(new, dtype=np.float64)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    acp = np.append(1.0, ac[:-1])
    pv = betas * (1.0 - acp) / (1.0 - ac)
    return {"betas": betas, "log_betas": np.log(betas), "alphas_cumprod": ac, "alphas_cumprod_prev": acp,
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac), "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
            "posterior_variance": pv, "posterior_log_variance_clipped": np.log(np.append(pv[1], pv[1:])),
            "posterior_mean_coef1": betas * np.sqrt(acp) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - acp) * np.sqrt(alphas) / (1.0 - ac)}


def _dump(obj, path: Path) -> None:
    """Indented JSON with every list of plain numbers on one line (timestep lists stay short)."""
    text = json.dumps(obj, indent=1)
    text = re.sub(r"\[\s*(-?[0-9.e+-]+(?:,\s*-?[0-9.e+-]+)*)\s*\]",
                  lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _save(arr, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ascontiguousarray(arr))


def write_tables(out: Path) -> None:
    """vectors/diffusion/processes.json + one (fields, K) float64 .npy per process."""
    d = out / "vectors" / "diffusion"
    index = {"num_timesteps": T, "beta_schedule": "linear", "beta_start": BETA_START, "beta_end": BETA_END,
             "tolerance": {"rel": 1e-12},
             "processes": []}
    for name, spec in PROCESSES.items():
        keep = None if spec is None else space_timesteps(T, spec)
        tab = process_tables(keep)
        fields = BASE_FIELDS if spec is None else TABLE_FIELDS
        fname = f"tables_{name.replace(',', '-')}.npy"
        _save(np.stack([tab[f] for f in fields]), d / fname)
        index["processes"].append({"name": name, "spec": spec, "num_steps": len(tab["betas"]),
                                   "timesteps": keep if keep is not None else list(range(T)),
                                   "fields": list(fields), "tables": fname})
    _dump(index, d / "processes.json")


# --- guide and single steps: the PyTorch reference sampler ---------------------------------

def write_steps(out: Path) -> None:
    import torch

    from flexdit_export.reference_sampler import ReferenceDiffusion

    rng = np.random.default_rng(20240601)
    cin, n, hw = 4, 2, 4
    d = out / "vectors" / "steps"
    # guide: rows [0, n) conditional, [n, 2n) unconditional
    g_out = rng.standard_normal((2 * n, 2 * cin, hw, hw)).astype(np.float32)
    scale = 2.7  # not a float32 number: a runtime must cast it to float32 before use
    _save(g_out, d / "guide_model_out.npy")
    guide_cases = []
    for policy, ch in (("first3", 3), ("eps", cin)):
        t = torch.from_numpy(g_out)
        cond, uncond = t[:n], t[n:]
        g = cond.clone()
        g[:, :ch] = uncond[:, :ch] + scale * (cond[:, :ch] - uncond[:, :ch])
        _save(g.numpy(), d / f"guide_{policy}.npy")
        guide_cases.append({"policy": policy, "guided_channels": ch, "expected": f"guide_{policy}.npy"})

    x = rng.standard_normal((n, cin, hw, hw)).astype(np.float32)
    eps = rng.standard_normal((n, cin, hw, hw)).astype(np.float32)
    v = rng.uniform(-1, 1, (n, cin, hw, hw)).astype(np.float32)
    model_out = np.concatenate([eps, v], axis=1)
    noise = rng.standard_normal((n, cin, hw, hw)).astype(np.float32)
    _save(x, d / "x.npy")
    _save(model_out, d / "model_out.npy")
    _save(noise, d / "noise.npy")
    cases = []
    specs = {"100": (100, "sections"), "ddim25": (25, "ddim")}
    for name, sampler, process, k, eta in [("ddpm_100_k37", "ddpm", "100", 37, None),
                                           ("ddpm_100_k0", "ddpm", "100", 0, None),
                                           ("ddim_ddim25_k12_eta0", "ddim", "ddim25", 12, 0.0),
                                           ("ddim_ddim25_k12_eta0.5", "ddim", "ddim25", 12, 0.5),
                                           ("ddim_ddim25_k0_eta0.5", "ddim", "ddim25", 0, 0.5)]:
        ref = ReferenceDiffusion(T, *specs[process], learn_sigma=True)
        tx, to, tn = torch.from_numpy(x), torch.from_numpy(model_out), torch.from_numpy(noise)
        uses_noise = k > 0 and (sampler == "ddpm" or eta > 0)
        if sampler == "ddpm":
            y = ref.ddpm_step(to, tx, k, tn)
        else:
            y = ref.ddim_step(to, tx, k, tn if uses_noise else torch.zeros_like(tx), eta)
        _save(y.numpy().astype(np.float32), d / f"{name}.npy")
        case = {"name": name, "sampler": sampler, "process": process, "k": k, "t": ref.map[k],
                "variance_type": "learned_range", "clip_denoised": False, "uses_noise": uses_noise,
                "expected": f"{name}.npy"}
        if eta is not None:
            case["eta"] = eta
        cases.append(case)
    _dump({"in_channels": cin,
           "guide": {"model_out": "guide_model_out.npy", "n": n, "scale": scale, "cases": guide_cases},
           "step_inputs": {"x": "x.npy", "model_out": "model_out.npy", "noise": "noise.npy"},
           "steps": cases, "tolerance": {"max_abs_over_max_ref": STEP_TOL}}, d / "steps.json")


# --- tiny bundle and its trajectories --------------------------------------------------------

def tiny_model():
    import torch

    from flexdit_export.model import ModelConfig, build_model

    torch.manual_seed(0)
    m = build_model(ModelConfig(**TINY))
    with torch.no_grad():  # every weight random: adaLN-Zero init would make the output trivially 0
        for name, p in m.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.08)
    return m.eval()


def build_tiny_bundle(model, dst: Path) -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "tiny-flexdit.pt"
        torch.save(model.state_dict(), ckpt)
        bundle = Path(tmp) / "bundle"
        subprocess.run([sys.executable, "-m", "flexdit_export.cli", "convert", str(ckpt), "-o", str(bundle),
                        "--schedule", SCHEDULE, "--num-heads", str(TINY["num_heads"]), "--batch", "2", "--seed", "0"],
                       check=True, capture_output=True, text=True)
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(bundle, dst)


def seeded_noise(seed: int, n: int, shape: tuple, num_steps: int, uses_step_noise: bool):
    """The Python runtime's stream: image i draws from default_rng([seed, i]) its x_T, then one
    standard normal (float32) per step k = K-1 .. 1 that takes noise."""
    rngs = [np.random.default_rng([seed, i]) for i in range(n)]
    init = np.stack([r.standard_normal(shape, dtype=np.float32) for r in rngs])
    if not uses_step_noise:
        return init, None
    step = np.zeros((num_steps, n) + shape, np.float32)  # row k = 0 is never used
    for i, r in enumerate(rngs):
        for k in range(num_steps - 1, 0, -1):
            step[k, i] = r.standard_normal(shape, dtype=np.float32)
    return init, step


def write_trajectories(out: Path, model) -> None:
    from flexdit_bundle.manifest import load_bundle
    from flexdit_export.reference_sampler import reference_sample
    from flexdit_runtime import Pipeline

    bundle_dir = out / "tiny-bundle"
    pipe = Pipeline.from_bundle(bundle_dir, threads=1)
    b = load_bundle(bundle_dir)
    cfg = b.model.config
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    n = len(CLASS_IDS)
    d = out / "vectors" / "trajectories"
    cases = []
    for tr in TRAJECTORIES:
        diff = pipe.diffusion(tr["steps"], tr["spacing"])
        K = diff.num_steps
        uses = tr["sampler"] == "ddpm" or tr["eta"] > 0
        init, step = seeded_noise(tr["seed"], n, shape, K, uses)
        res = pipe(CLASS_IDS, steps=tr["steps"], sampler=tr["sampler"], cfg_scale=tr["cfg_scale"], eta=tr["eta"],
                   spacing=tr["spacing"], init_noise=init,
                   noise_fn=(lambda k, idx, step=step: step[k][idx]) if uses else None)
        final = res.samples.astype(np.float32)
        seeded = pipe(CLASS_IDS, steps=tr["steps"], sampler=tr["sampler"], cfg_scale=tr["cfg_scale"], eta=tr["eta"],
                      spacing=tr["spacing"], seed=tr["seed"]).samples
        if not np.array_equal(seeded, final):
            raise SystemExit(f"{tr['name']}: the seeded run differs from the run with the recorded noise")
        stages = [(st.t_min, st.t_max, st.sparse_grid) for st in b.stages]
        ref = reference_sample(model, stages, init, np.array(CLASS_IDS), steps=tr["steps"], sampler=tr["sampler"],
                               eta=tr["eta"], cfg_scale=tr["cfg_scale"], cfg_channels=b.diffusion.cfg_channels,
                               spacing=tr["spacing"], num_timesteps=T,
                               noise_fn=(lambda k, step=step: step[k]) if uses else None)
        ref_rel = float(np.abs(final - ref).max() / np.abs(ref).max())
        if ref_rel > TRAJECTORY_TOL:
            raise SystemExit(f"{tr['name']}: the runtime is {ref_rel:.2e} (relative) from the PyTorch reference")
        name = tr["name"]
        _save(init, d / f"{name}.init_noise.npy")
        if uses:
            _save(step, d / f"{name}.step_noise.npy")
        _save(final, d / f"{name}.final.npy")
        timesteps = [int(t) for t in diff.timestep_map]
        cases.append({**tr, "class_ids": CLASS_IDS, "timesteps": timesteps,
                      "stage_per_step": [b.stage_for(t).id for t in reversed(timesteps)],
                      "init_noise": f"{name}.init_noise.npy", "step_noise": f"{name}.step_noise.npy" if uses else None,
                      "final": f"{name}.final.npy", "pytorch_reference_max_rel": float(f"{ref_rel:.3g}")})
    _dump({"bundle": "../../tiny-bundle", "null_class": b.model.null_class, "cfg_channels": b.diffusion.cfg_channels,
           "clip_denoised": False, "trajectories": cases, "tolerance": {"max_abs_over_max_ref": TRAJECTORY_TOL}},
          d / "trajectories.json")


# --- few-step solvers: diffusers' schedulers are the reference ------------------------------

def _diffusers(sampler: str, steps: int, spacing: str):
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

    cls = {"dpmpp-2m": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler, "euler": EulerDiscreteScheduler}
    betas = np.linspace(BETA_START * 1000 / T, BETA_END * 1000 / T, T, dtype=np.float64)
    sch = cls[sampler](num_train_timesteps=T, trained_betas=betas)
    if spacing == "linspace":
        sch.set_timesteps(steps)
    else:  # the respaced kept timesteps, first step first
        sch.set_timesteps(timesteps=space_timesteps(T, f"ddim{steps}" if spacing == "ddim" else str(steps))[::-1])
    return sch


def diffusers_run(sampler, steps, spacing, x_T, network):
    """diffusers' loop: x = x_T * init_noise_sigma; per step network(scaled x, t) -> eps."""
    import torch

    sch = _diffusers(sampler, steps, spacing)
    x = torch.from_numpy(x_T) * sch.init_noise_sigma
    xs = []
    for i, t in enumerate(sch.timesteps):
        eps = network(sch.scale_model_input(x, t).numpy(), float(t), i)
        x = sch.step(torch.from_numpy(np.ascontiguousarray(eps)), t, x).prev_sample
        xs.append(x.numpy().astype(np.float32))
    return xs


def write_solvers(out: Path) -> None:
    """vectors/solvers/solvers.json: schedules (timesteps, sigmas) and update sequences."""
    d = out / "vectors" / "solvers"
    schedules = []
    for sampler, steps, spacing in SOLVER_SCHEDULES:
        sch = _diffusers(sampler, steps, spacing)
        schedules.append({"sampler": sampler, "steps": steps, "spacing": spacing,
                          "timesteps": [float(t) if sampler == "euler" else int(t) for t in sch.timesteps.tolist()],
                          "sigmas": [float(v) for v in sch.sigmas.numpy().astype(np.float32).tolist()]})
    rng = np.random.default_rng(20260601)
    n, cin, hw = 2, 4, 4
    sequences = []
    for sampler, steps in SOLVER_SEQUENCES:
        x_T = rng.standard_normal((n, cin, hw, hw)).astype(np.float32)
        eps = rng.standard_normal((steps, n, cin, hw, hw)).astype(np.float32)
        xs = diffusers_run(sampler, steps, "linspace", x_T, lambda x, t, i, eps=eps: eps[i])
        name = f"{sampler}{steps}"
        _save(x_T, d / f"{name}.x_T.npy")
        _save(eps, d / f"{name}.eps.npy")
        _save(np.stack(xs), d / f"{name}.x.npy")
        sequences.append({"name": name, "sampler": sampler, "steps": steps, "spacing": "linspace",
                          "x_T": f"{name}.x_T.npy", "eps": f"{name}.eps.npy", "expected": f"{name}.x.npy"})
    _dump({"num_timesteps": T, "beta_start": BETA_START, "beta_end": BETA_END, "schedules": schedules,
           "sequences": sequences, "tolerance": {"sigmas_rel": 1e-6, "max_abs_over_max_ref": SEQUENCE_TOL}},
          d / "solvers.json")


def write_solver_trajectories(out: Path) -> None:
    """vectors/solver_trajectories: the tiny bundle sampled by the Python runtime; each run
    checked here against diffusers' scheduler driving the same graphs."""
    import math

    from flexdit_bundle.manifest import load_bundle
    from flexdit_runtime import Pipeline
    from flexdit_runtime.samplers import guide

    bundle_dir = out / "tiny-bundle"
    pipe = Pipeline.from_bundle(bundle_dir, threads=1)
    b = load_bundle(bundle_dir)
    cfg = b.model.config
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    d = out / "vectors" / "solver_trajectories"
    y = np.array(CLASS_IDS)
    cases = []
    for tr in SOLVER_TRAJECTORIES:
        init, _ = seeded_noise(tr["seed"], len(CLASS_IDS), shape, 1, False)
        final = pipe(CLASS_IDS, steps=tr["steps"], sampler=tr["sampler"], cfg_scale=tr["cfg_scale"],
                     spacing=tr["spacing"], init_noise=init).samples.astype(np.float32)
        seeded = pipe(CLASS_IDS, steps=tr["steps"], sampler=tr["sampler"], cfg_scale=tr["cfg_scale"],
                      spacing=tr["spacing"], seed=tr["seed"]).samples
        if not np.array_equal(seeded, final):
            raise SystemExit(f"{tr['name']}: the seeded run differs from the run with the recorded noise")
        stage_ids = []

        def network(x, t, i, w=tr["cfg_scale"]):
            sid = next(st.id for st in b.stages if st.serves(math.floor(t)))
            stage_ids.append(sid)
            n = x.shape[0]
            if w <= 1:
                return pipe.runner.run_rows(sid, x, np.full(n, t, np.float32), y)[:, :shape[0]]
            out_ = pipe.runner.run_rows(sid, np.concatenate([x, x]), np.full(2 * n, t, np.float32),
                                        np.concatenate([y, np.full(n, b.model.null_class)]))
            return guide(out_, n, w, b.diffusion.cfg_channels, shape[0])[:, :shape[0]]
        ref = diffusers_run(tr["sampler"], tr["steps"], tr["spacing"], init, network)[-1]
        rel = float(np.abs(final - ref).max() / np.abs(ref).max())
        if rel > TRAJECTORY_TOL:
            raise SystemExit(f"{tr['name']}: the runtime is {rel:.2e} (relative) from diffusers")
        name = tr["name"]
        _save(init, d / f"{name}.init_noise.npy")
        _save(final, d / f"{name}.final.npy")
        ts = pipe.diffusion(tr["steps"], tr["spacing"], tr["sampler"]).timesteps.tolist()
        cases.append({**tr, "class_ids": CLASS_IDS,
                      "timesteps": [t if tr["sampler"] == "euler" else int(t) for t in ts],
                      "stage_per_step": stage_ids, "init_noise": f"{name}.init_noise.npy",
                      "final": f"{name}.final.npy", "diffusers_max_rel": float(f"{rel:.3g}")})
    _dump({"bundle": "../../tiny-bundle", "null_class": b.model.null_class, "cfg_channels": b.diffusion.cfg_channels,
           "clip_denoised": False, "trajectories": cases, "tolerance": {"max_abs_over_max_ref": TRAJECTORY_TOL}},
          d / "solver_trajectories.json")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("tables", "solvers", "all"), default="all",
                   help="solvers: only the few-step solver vectors (needs diffusers; keeps the tiny bundle)")
    p.add_argument("--out", type=Path, default=CONFORMANCE, help="conformance folder to write")
    a = p.parse_args(argv)
    if a.only == "solvers":
        write_solvers(a.out)
        write_solver_trajectories(a.out)
        print(f"wrote {a.out}")
        return 0
    write_tables(a.out)
    if a.only == "all":
        write_steps(a.out)
        model = tiny_model()
        build_tiny_bundle(model, a.out / "tiny-bundle")
        write_trajectories(a.out, model)
        write_solvers(a.out)
        write_solver_trajectories(a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
