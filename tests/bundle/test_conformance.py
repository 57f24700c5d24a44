"""The recorded conformance vectors of the bundle contract (flexdit_bundle/conformance/): the
Python runtime reproduces every one of them, the tiny bundle verifies, and the deterministic part
of the generator (tools/gen_conformance.py) still produces the recorded files byte for byte.
A C++ runtime is held to the same files with the tolerances in their JSON (see the README there)."""

import ast
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import flexdit_bundle
from flexdit_bundle.manifest import FORMAT_VERSION, BundleError, load_bundle, stage_for

ROOT = Path(flexdit_bundle.__file__).resolve().parent / "conformance"
VEC = ROOT / "vectors"
TINY = ROOT / "tiny-bundle"
REPO = Path(__file__).resolve().parents[2]


def _json(rel):
    return json.loads((VEC / rel).read_text())


def _within(got, ref, tol):
    """The vectors' tolerance: max |got - ref| <= tol * max |ref| (and the same shape)."""
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape
    assert np.all(np.isfinite(got))
    err = np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max()
    assert err <= tol, f"max abs error {err:.3e} of max |ref| (tolerance {tol:.0e})"


PROCESSES = _json("diffusion/processes.json")
STEPS = _json("steps/steps.json")
TRAJ = _json("trajectories/trajectories.json")
SOLV = _json("solvers/solvers.json")
STRAJ = _json("solver_trajectories/solver_trajectories.json")


# --- diffusion tables and respaced timesteps ------------------------------------------------

@pytest.mark.parametrize("proc", PROCESSES["processes"], ids=lambda p: p["name"])
def test_runtime_reproduces_tables_and_timesteps(proc):
    from flexdit_runtime.diffusion import Diffusion, linear_betas, space_timesteps

    T = PROCESSES["num_timesteps"]
    tab = np.load(VEC / "diffusion" / proc["tables"])
    assert tab.dtype == np.float64 and tab.shape == (len(proc["fields"]), proc["num_steps"])
    base = linear_betas(T, PROCESSES["beta_start"], PROCESSES["beta_end"])
    if proc["spec"] is None:  # the training process: the linear schedule itself
        got = {"betas": base, "alphas_cumprod": np.cumprod(1.0 - base)}
        assert proc["timesteps"] == list(range(T))
    else:
        keep = space_timesteps(T, proc["spec"])
        assert keep == proc["timesteps"] and len(keep) == proc["num_steps"]
        d = Diffusion(base, keep, "learned_range")
        assert d.timestep_map.tolist() == keep
        got = {f: np.log(d.betas) if f == "log_betas" else getattr(d, f) for f in proc["fields"]}
    tol = PROCESSES["tolerance"]["rel"]
    for i, f in enumerate(proc["fields"]):
        np.testing.assert_allclose(got[f], tab[i], rtol=tol, atol=0, err_msg=f"{proc['name']}: {f}")


def test_processes_cover_the_required_specs():
    names = {p["name"] for p in PROCESSES["processes"]}
    assert {"base", "1000", "100", "250", "ddim25", "ddim50"} <= names
    # a spec whose sections do not divide T, and a DDIM stride that does not divide T
    assert any("," in (p["spec"] or "") and PROCESSES["num_timesteps"] % len(p["spec"].split(",")) for p in PROCESSES["processes"])
    assert any((p["spec"] or "").startswith("ddim") and PROCESSES["num_timesteps"] % (p["timesteps"][1] - p["timesteps"][0])
               for p in PROCESSES["processes"])


# --- one guide step, single DDPM / DDIM steps ----------------------------------------------

def test_runtime_reproduces_guide_step():
    from flexdit_runtime.samplers import guide

    g = STEPS["guide"]
    out = np.load(VEC / "steps" / g["model_out"])
    assert out.shape[0] == 2 * g["n"] and {c["policy"] for c in g["cases"]} == {"first3", "eps"}
    for case in g["cases"]:
        got = guide(out, g["n"], g["scale"], case["policy"], STEPS["in_channels"])
        ref = np.load(VEC / "steps" / case["expected"])
        _within(got, ref, STEPS["tolerance"]["max_abs_over_max_ref"])
        # unguided channels are the conditional rows' own output, bit for bit
        c = case["guided_channels"]
        assert np.array_equal(ref[:, c:], out[:g["n"], c:]) and np.array_equal(got[:, c:], ref[:, c:])


@pytest.mark.parametrize("case", STEPS["steps"], ids=lambda c: c["name"])
def test_runtime_reproduces_sampler_step(case):
    from flexdit_runtime.diffusion import Diffusion, linear_betas, space_timesteps
    from flexdit_runtime.samplers import ddim_step, ddpm_step

    inputs = {k: np.load(VEC / "steps" / f) for k, f in STEPS["step_inputs"].items()}
    keep = space_timesteps(1000, case["process"])
    assert keep[case["k"]] == case["t"]
    d = Diffusion(linear_betas(1000), keep, case["variance_type"])
    noise = inputs["noise"] if case["uses_noise"] else None
    cin = STEPS["in_channels"]
    if case["sampler"] == "ddpm":
        got = ddpm_step(d, inputs["x"], inputs["model_out"], case["k"], cin, noise, case["clip_denoised"])
    else:
        got = ddim_step(d, inputs["x"], inputs["model_out"], case["k"], cin, noise, case["eta"], case["clip_denoised"])
    assert got.dtype == np.float32
    _within(got, np.load(VEC / "steps" / case["expected"]), STEPS["tolerance"]["max_abs_over_max_ref"])


# --- the tiny bundle and its trajectories ---------------------------------------------------

def test_tiny_bundle_verifies_and_stays_small(tmp_path):
    b = load_bundle(TINY)  # schema, coverage, sha256 of every file
    assert b.manifest.format.version == FORMAT_VERSION
    assert len(b.stages) == 3 and [st.sparse_grid for st in b.stages].count(None) == 1
    assert {st.batch for st in b.stages} == {2}
    assert [w.id for w in b.manifest.weights] == ["fp32"]
    assert all(a.weights.file == "fp32" for st in b.stages for a in st.artifacts)
    # the two sparse stages also run through one shared graph (docs/bundle-format.md 4.5): the
    # recorded trajectories below are reproduced through it
    (g,) = b.manifest.shared_graphs
    assert g.stages == (0, 1) and [bool(st.artifacts[0].shared_graph) for st in b.stages] == [1, 1, 0]
    size = sum(f.stat().st_size for f in TINY.rglob("*") if f.is_file())
    assert size < 350_000, f"tiny bundle grew to {size} bytes"
    assert sum(f.stat().st_size for f in ROOT.rglob("*") if f.is_file()) < 950_000
    # the checksums are real: one flipped byte of the shared weights is refused
    bad = tmp_path / "tampered"
    shutil.copytree(TINY, bad)
    w = bad / b.manifest.weights[0].path
    data = bytearray(w.read_bytes())
    data[100] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(bad)


def test_trajectory_cases_cover_the_contract():
    assert (VEC / "trajectories" / TRAJ["bundle"]).resolve() == TINY.resolve()
    got = {(c["sampler"], c["eta"] > 0, c["cfg_scale"] > 1) for c in TRAJ["trajectories"]}
    assert got == {("ddpm", False, True), ("ddim", False, True), ("ddim", True, False)}
    b = load_bundle(TINY)
    for c in TRAJ["trajectories"]:
        # stage selection by original timestep; every trajectory passes through every stage
        assert c["stage_per_step"] == [stage_for(b.stages, t).id for t in reversed(c["timesteps"])]
        assert set(c["stage_per_step"]) == {0, 1, 2}
        assert c["pytorch_reference_max_rel"] <= TRAJ["tolerance"]["max_abs_over_max_ref"]


def _arrays(case):
    d = VEC / "trajectories"
    init = np.load(d / case["init_noise"])
    step = np.load(d / case["step_noise"]) if case["step_noise"] else None
    return init, step, np.load(d / case["final"])


@pytest.fixture(scope="module")
def pipe():
    from flexdit_runtime import Pipeline

    return Pipeline.from_bundle(TINY)


def _run(pipe, case, **kw):
    return pipe(case["class_ids"], steps=case["steps"], sampler=case["sampler"], cfg_scale=case["cfg_scale"],
                eta=case["eta"], spacing=case["spacing"], **kw).samples


@pytest.mark.parametrize("case", TRAJ["trajectories"], ids=lambda c: c["name"])
def test_runtime_reproduces_trajectory_from_recorded_noise(pipe, case):
    init, step, final = _arrays(case)
    n = len(case["class_ids"])
    assert init.shape == (n, 4, 8, 8) and final.shape == init.shape
    if step is not None:
        assert step.shape == (len(case["timesteps"]),) + init.shape and not step[0].any()
    calls = []

    def noise_fn(k, idx):
        calls.append(k)
        return step[k][idx]

    got = _run(pipe, case, init_noise=init, noise_fn=noise_fn if step is not None else None)
    _within(got, final, TRAJ["tolerance"]["max_abs_over_max_ref"])
    if step is not None:  # noise is taken at k = K-1 .. 1 and never at k = 0
        assert 0 not in calls and set(calls) == set(range(1, len(case["timesteps"])))


@pytest.mark.parametrize("case", TRAJ["trajectories"], ids=lambda c: c["name"])
def test_recorded_noise_is_the_python_runtimes_seeded_stream(pipe, case):
    """The Python runtime's documented noise: image i draws x_T and then each step's noise
    (k = K-1 .. 1) from np.random.default_rng([seed, i]), float32 standard normals."""
    init, step, final = _arrays(case)
    K = len(case["timesteps"])
    for i in range(len(case["class_ids"])):
        r = np.random.default_rng([case["seed"], i])
        assert np.array_equal(r.standard_normal(init.shape[1:], dtype=np.float32), init[i])
        if step is not None:
            for k in range(K - 1, 0, -1):
                assert np.array_equal(r.standard_normal(init.shape[1:], dtype=np.float32), step[k, i])
    _within(_run(pipe, case, seed=case["seed"]), final, TRAJ["tolerance"]["max_abs_over_max_ref"])


# --- the few-step solvers: schedules, update sequences, trajectories (diffusers as reference) ---

@pytest.mark.parametrize("case", SOLV["schedules"], ids=lambda c: f"{c['sampler']}{c['steps']}-{c['spacing']}")
def test_runtime_reproduces_solver_schedule(case):
    from flexdit_runtime.diffusion import SolverSchedule, linear_betas, solver_timesteps

    ts = solver_timesteps(case["sampler"], SOLV["num_timesteps"], case["steps"], case["spacing"])
    assert ts.tolist() == case["timesteps"]
    s = SolverSchedule(linear_betas(SOLV["num_timesteps"], SOLV["beta_start"], SOLV["beta_end"]), ts)
    np.testing.assert_allclose(s.sigmas, case["sigmas"], rtol=SOLV["tolerance"]["sigmas_rel"], atol=0)
    assert s.sigmas[-1] == 0 == case["sigmas"][-1]


@pytest.mark.parametrize("case", SOLV["sequences"], ids=lambda c: c["name"])
def test_runtime_reproduces_solver_update_sequence(case):
    """Fed the recorded eps at every step, the runtime's solver gives diffusers' sample after each."""
    from flexdit_runtime.diffusion import SolverSchedule, linear_betas, solver_timesteps
    from flexdit_runtime.samplers import SolverState, initial_sample, solver_step

    d = VEC / "solvers"
    x_T, eps, want = (np.load(d / case[k]) for k in ("x_T", "eps", "expected"))
    s = SolverSchedule(linear_betas(SOLV["num_timesteps"]), solver_timesteps(case["sampler"], SOLV["num_timesteps"],
                                                                            case["steps"], case["spacing"]))
    state, x = SolverState(), initial_sample(s, case["sampler"], x_T)
    for i in range(case["steps"]):
        x = solver_step(s, case["sampler"], state, x, eps[i], s.num_steps - 1 - i, x.shape[1])
        assert x.dtype == np.float32
        _within(x, want[i], SOLV["tolerance"]["max_abs_over_max_ref"])


def test_solver_trajectory_cases_cover_the_contract():
    assert {c["sampler"] for c in STRAJ["trajectories"]} == {"dpmpp-2m", "unipc", "euler"}
    assert {c["cfg_scale"] > 1 for c in STRAJ["trajectories"]} == {True, False}
    b = load_bundle(TINY)
    for c in STRAJ["trajectories"]:
        # fractional (euler) timesteps pick the stage whose range holds floor(t)
        assert c["stage_per_step"] == [stage_for(b.stages, int(t)).id for t in c["timesteps"]]
        assert set(c["stage_per_step"]) == {0, 1, 2}
        assert c["diffusers_max_rel"] <= STRAJ["tolerance"]["max_abs_over_max_ref"]


@pytest.mark.parametrize("case", STRAJ["trajectories"], ids=lambda c: c["name"])
def test_runtime_reproduces_solver_trajectory(pipe, case):
    d = VEC / "solver_trajectories"
    init, final = np.load(d / case["init_noise"]), np.load(d / case["final"])
    kw = dict(steps=case["steps"], sampler=case["sampler"], cfg_scale=case["cfg_scale"], spacing=case["spacing"])
    _within(pipe(case["class_ids"], init_noise=init, **kw).samples, final, STRAJ["tolerance"]["max_abs_over_max_ref"])
    _within(pipe(case["class_ids"], seed=case["seed"], **kw).samples, final, STRAJ["tolerance"]["max_abs_over_max_ref"])


# --- file formats a C++ reader relies on, and the generator ---------------------------------

def test_vector_arrays_are_simple_npy():
    files = sorted(VEC.rglob("*.npy"))
    assert files
    for f in files:
        with open(f, "rb") as fh:
            assert fh.read(8) == b"\x93NUMPY\x01\x00", f  # format version 1.0
            n = int.from_bytes(fh.read(2), "little")
            header = ast.literal_eval(fh.read(n).decode("latin1"))
        assert header["descr"] in ("<f4", "<f8") and header["fortran_order"] is False, f
        assert (10 + n) % 64 == 0  # data starts 64-byte aligned
        assert f.stat().st_size == 10 + n + int(np.prod(header["shape"])) * int(header["descr"][2]), f


def test_every_referenced_file_exists_and_every_file_is_referenced():
    named = {VEC / "diffusion" / p["tables"] for p in PROCESSES["processes"]}
    named |= {VEC / "solvers" / c[k] for c in SOLV["sequences"] for k in ("x_T", "eps", "expected")}
    named |= {VEC / "solver_trajectories" / c[k] for c in STRAJ["trajectories"] for k in ("init_noise", "final")}
    named |= {VEC / "steps" / f for f in STEPS["step_inputs"].values()}
    named |= {VEC / "steps" / STEPS["guide"]["model_out"]} | {VEC / "steps" / c["expected"] for c in STEPS["guide"]["cases"]}
    named |= {VEC / "steps" / c["expected"] for c in STEPS["steps"]}
    for c in TRAJ["trajectories"]:
        named |= {VEC / "trajectories" / c[k] for k in ("init_noise", "step_noise", "final") if c[k]}
    assert named == set(VEC.rglob("*.npy"))


def _generator():
    spec = importlib.util.spec_from_file_location("gen_conformance", REPO / "tools" / "gen_conformance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generator_reproduces_tables_and_timesteps(tmp_path):
    """The deterministic part of the generator (float64 tables, respaced timesteps) gives the
    recorded files byte for byte, without torch."""
    _generator().write_tables(tmp_path)
    new = sorted(p.relative_to(tmp_path) for p in (tmp_path / "vectors" / "diffusion").iterdir())
    old = sorted(p.relative_to(ROOT) for p in (VEC / "diffusion").iterdir())
    assert new == old
    for rel in new:
        assert (tmp_path / rel).read_bytes() == (ROOT / rel).read_bytes(), rel


def test_generator_reproduces_step_vectors(tmp_path):
    """The step vectors' inputs regenerate byte for byte and their expected outputs are still what
    the PyTorch reference sampler computes (within the vectors' tolerance: another torch may
    differ in an ulp of exp)."""
    _generator().write_steps(tmp_path)
    new_dir, old_dir = tmp_path / "vectors" / "steps", VEC / "steps"
    assert sorted(p.name for p in new_dir.iterdir()) == sorted(p.name for p in old_dir.iterdir())
    assert (new_dir / "steps.json").read_bytes() == (old_dir / "steps.json").read_bytes()
    expected = {STEPS["guide"]["model_out"]: False} | {f: False for f in STEPS["step_inputs"].values()}
    expected |= {c["expected"]: True for c in STEPS["guide"]["cases"] + STEPS["steps"]}
    for name, is_output in expected.items():
        new, old = np.load(new_dir / name), np.load(old_dir / name)
        if is_output:
            _within(new, old, STEPS["tolerance"]["max_abs_over_max_ref"])
        else:
            assert (new_dir / name).read_bytes() == (old_dir / name).read_bytes(), name


def test_importing_the_contract_never_imports_torch():
    code = "import sys, flexdit_bundle, flexdit_bundle.manifest; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
