"""AOTInductor backend on the CPU (issue 9): a graph-capturable forward, packages per stage with
one shared weight file, parity recorded at convert time, the runtime engine (load, trajectory
parity against ONNX Runtime, refusal of a foreign compatibility key, weights loaded once) and
the torch sampler against the numpy one. GPU-only code (CUDA graphs) cannot run here.

Compiling is slow on a small CPU, so one tiny 3-block FlexDiT is converted once per session
(2 stages, batch 2, fp32), plus one single-stage bf16 bundle."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from factories import random_model, save_state_dict

from flexdit_bundle.files import sha256_file
from flexdit_bundle.manifest import BundleError, load_bundle

MICRO = dict(family="flexdit", hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=4,
             num_classes=10, depth=3, num_poolingformer=1, num_dumbbell=1, dumbbell_group=[1, 0, 1, 0],
             num_normal_block=0, semantic_size=2)
SCHEDULE = "500:2,0:dense"
ROOT = Path(__file__).resolve().parents[2]


def _convert(tmp_path_factory, name, precision, schedule):
    from flexdit_export.convert import ConvertOptions, convert

    d = tmp_path_factory.mktemp(name)
    ck = save_state_dict(random_model(MICRO, seed=1), d / "micro.pt")
    opts = ConvertOptions(schedule=schedule, batch=2, num_heads=2, backend="aoti", device="cpu", precision=precision,
                          parity_tol=1e-4)
    return convert(ck, d / "bundle", opts, log=lambda m: None)


@pytest.fixture(scope="session")
def aoti_bundle(tmp_path_factory):
    return _convert(tmp_path_factory, "aoti-fp32", None, SCHEDULE)


@pytest.fixture(scope="session")
def aoti_bf16_bundle(tmp_path_factory):
    return _convert(tmp_path_factory, "aoti-bf16", "bf16", "dense")


# ---------------------------------------------------------------- graph capture (no compile)

class _DeviceRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Every tensor any op of the forward produces, by device."""

    def __init__(self):
        super().__init__()
        self.devices = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.devices.add((t.device.type, str(func)))
        return out


@pytest.mark.parametrize("cfg", [MICRO, dict(family="dit", hidden_size=1152, num_heads=16, depth=28, input_size=32),
                                 dict(family="flexdit", hidden_size=1152, num_heads=16, depth=28, input_size=64,
                                      num_poolingformer=2, num_dumbbell=4, dumbbell_group=[1, 3, 1, 1],
                                      num_normal_block=2, semantic_size=8)])
def test_stage_forward_creates_no_host_tensor(cfg):
    """With the model and inputs on the meta device (any size: XL costs nothing), every tensor
    the forward makes is on that device: nothing is built on the host and copied over, which is
    what CUDA graph capture refuses ("Cannot copy between CPU and CUDA tensors during capture")."""
    from flexdit_export.model import ModelConfig, build_model
    from flexdit_export.schedule import Stage
    from flexdit_export.stages import StageModule

    c = ModelConfig(**cfg)
    with torch.device("meta"):
        m = build_model(c).eval()
    st = Stage(t_min=0, t_max=999, sparse_grid=c.semantic_size if c.family == "flexdit" else None)
    sm = StageModule(m, st).to("meta")
    x = torch.empty(2, c.in_channels, c.input_size, c.input_size, device="meta")
    t, y = torch.empty(2, device="meta"), torch.empty(2, dtype=torch.long, device="meta")
    rec = _DeviceRecorder()
    with rec, torch.no_grad():
        out = sm(x, t, y)
    assert out.shape == (2, c.out_channels, c.input_size, c.input_size)
    host = sorted({f for d, f in rec.devices if d != "meta"})
    assert not host, f"ops that made host tensors: {host}"


def test_exported_stage_has_no_device_transfer():
    from flexdit_export.schedule import Stage
    from flexdit_export.component_io import stage_io
    from flexdit_export.stages import StageModule

    m = random_model(MICRO, seed=1)
    sm = StageModule(m, Stage(0, 999, 2)).eval()
    ep = torch.export.export(sm, stage_io(m.cfg, sm.stage, 2).sample(torch.Generator().manual_seed(0)), strict=False)
    bad = [str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "device" in n.kwargs
           and "assert" not in str(n.target)]  # (metadata asserts only check, they create nothing)
    assert not bad, bad
    # the frequency table is a (non-persistent) buffer now, not rebuilt per call
    assert "model.t_embedder.freqs" in ep.graph_signature.inputs_to_buffers.values()
    assert "t_embedder.freqs" not in m.state_dict()  # checkpoints and strict loading unchanged


def test_frequency_table_stays_float32_under_a_dtype_cast():
    from flexdit_export.model.layers import TimestepEmbedder, timestep_frequencies

    e = TimestepEmbedder(16).to(torch.bfloat16)
    assert e.freqs.dtype == torch.float32 and torch.equal(e.freqs, timestep_frequencies(256))


def test_cuda_graph_output_is_the_callers_own():
    """With a captured CUDA graph every call replays into one static output buffer; run_device
    must hand back a copy made under the engine lock, or a second call (another thread, or the
    next chunk of a batch) overwrites the first call's result before it is read. No GPU here:
    the real engine code runs against a stand-in whose replay() writes the static buffers in place,
    as a CUDA graph replay does."""
    import threading

    from flexdit_bundle.spec import Stage
    from flexdit_runtime.aoti_engine import AotiStageEngine

    B = 2
    art = {"backend": "aoti", "precision": "fp32", "path": "stub.pt2", "sha256": "0" * 64}
    stage = Stage.from_json({"id": 0, "t_min": 0, "t_max": 999, "sparse_grid": None, "tokens": 16, "batch": B,
                             "inputs": [{"name": "x", "dtype": "float32", "shape": [B, 1, 4, 4]},
                                        {"name": "t", "dtype": "float32", "shape": [B]},
                                        {"name": "y", "dtype": "int64", "shape": [B]}],
                             "outputs": [{"name": "out", "dtype": "float32", "shape": [B, 1, 4, 4]}],
                             "artifacts": [art]})
    e = AotiStageEngine.__new__(AotiStageEngine)
    super(AotiStageEngine, e).__init__(stage, stage.artifacts[0])
    e.torch, e.device, e._lock = torch, "cpu", threading.Lock()
    e.static_in = (torch.zeros(B, 1, 4, 4), torch.zeros(B), torch.zeros(B, dtype=torch.int64))
    e.static_out = torch.zeros(B, 1, 4, 4)

    class Replay:
        def replay(self):
            sx, st, sy = e.static_in
            e.static_out.copy_(sx * 2 + st.view(-1, 1, 1, 1) + sy.view(-1, 1, 1, 1))

    e.graph = Replay()
    x1, x2 = torch.ones(B, 1, 4, 4), torch.full((B, 1, 4, 4), 5.0)
    t, y = torch.zeros(B), torch.zeros(B, dtype=torch.int64)
    first = e.run_device(x1, t, y)
    second = e.run_device(x2, t, y)
    assert torch.equal(first, x1 * 2) and torch.equal(second, x2 * 2)
    assert first.data_ptr() != e.static_out.data_ptr()


# ---------------------------------------------------------------- torch sampler (no compile)

@pytest.mark.parametrize("sampler,eta,variance", [("ddpm", 0.0, "learned_range"), ("ddim", 0.0, "learned_range"),
                                                 ("ddim", 0.5, "learned_range"), ("ddpm", 0.0, "fixed_large")])
def test_torch_sampler_matches_numpy(sampler, eta, variance):
    from flexdit_runtime import samplers, torch_sampler
    from flexdit_runtime.diffusion import Diffusion, linear_betas, space_timesteps

    d = Diffusion(linear_betas(1000), space_timesteps(1000, "ddim25"), variance)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    xt = torch.from_numpy(x.copy())
    for k in range(d.num_steps - 1, -1, -1):
        out = rng.standard_normal((4, 8, 8, 8), dtype=np.float32)
        noise = rng.standard_normal(x.shape, dtype=np.float32)
        g = samplers.guide(out, 2, 4.0, "first3", 4)
        gt = torch_sampler.guide(torch.from_numpy(out), 2, 4.0, "first3", 4)
        np.testing.assert_allclose(gt.numpy(), g, rtol=0, atol=1e-6)
        x = samplers.step(d, sampler, x, g, k, 4, noise, eta)
        xt = torch_sampler.step(d, sampler, xt, gt, k, 4, torch.from_numpy(noise), eta)
    scale = np.abs(x).max()
    assert np.abs(xt.numpy() - x).max() <= 1e-5 * scale


# ---------------------------------------------------------------- the bundle (compiled once)

def test_manifest_records_packages_weights_and_parity(aoti_bundle):
    b = load_bundle(aoti_bundle)
    files = b.weight_files
    assert "aoti-fp32" in files
    for st in b.stages:
        a = b.artifact(st, "aoti", "fp32")
        assert sha256_file(b.path(a)) == a.sha256
        assert a.weights.file == "aoti-fp32"
        info = a.aoti
        assert info.device == "cpu" and info.compat.key.startswith(f"torch-{torch.__version__}/cpu-")
        assert st.parity["aoti/fp32"]["max_rel"] <= 1e-4
        # the package holds code, not weights: much smaller than a copy of them would make it
        # necessary, and the constants are the shared file's
        assert st.default_precision == "fp32"
    w = files["aoti-fp32"]
    assert sha256_file(b.path(w)) == w.sha256
    # stored once: both stages bind the same tensors for the shared weights
    b0 = b.artifact(b.stages[0], "aoti").weights.bindings
    b1 = b.artifact(b.stages[1], "aoti").weights.bindings
    shared = [k for k in b0 if k.startswith("model.") and k in b1]
    assert shared and all(b0[k] == b1[k] for k in shared)
    used = {i for bb in (b0, b1) for i in bb.values()}
    assert used == set(range(len(w.tensors)))


def test_runtime_trajectory_matches_onnx_runtime(aoti_bundle):
    from flexdit_runtime.aoti_engine import loaded_weight_sets
    from flexdit_runtime.pipeline import Pipeline

    kw = dict(steps=8, sampler="ddpm", cfg_scale=3.0, seed=3)
    ref = Pipeline.from_bundle(aoti_bundle)([1, 2, 3], **kw)
    p = Pipeline.from_bundle(aoti_bundle, backend="aoti")
    got = p([1, 2, 3], **kw)
    scale = np.abs(ref.samples).max()
    assert np.abs(got.samples - ref.samples).max() <= 1e-4 * scale
    assert [e["kind"] for e in p.model.engines()] == ["aoti", "aoti"]
    assert set(got.stage_seconds) == {0, 1}
    # the shared weights became torch tensors once, and both packages use the same storage
    assert loaded_weight_sets(p.model.runner.weights) == 1
    e0, e1 = p.model.runner.engines
    common = [k for k in e0.constants if k.startswith("model.") and k in e1.constants]
    assert common and all(e0.constants[k].data_ptr() == e1.constants[k].data_ptr() for k in common)
    # the host-side engine call (StageRunner.run_rows) gives the same rows
    x = np.random.default_rng(0).standard_normal((3, 4, 8, 8), dtype=np.float32)
    t, y = np.array([700, 700, 700], np.float32), np.array([1, 2, 10])
    from flexdit_runtime.model import Model
    onnx = Model.from_bundle(aoti_bundle).runner.run_rows(0, x, t, y)
    np.testing.assert_allclose(p.model.runner.run_rows(0, x, t, y), onnx, rtol=0, atol=1e-4 * np.abs(onnx).max())


def test_runtime_refuses_a_foreign_compat_key(aoti_bundle, tmp_path):
    from flexdit_runtime.model import Model

    dst = tmp_path / "foreign"
    shutil.copytree(aoti_bundle, dst)
    mf = dst / "manifest.json"
    m = json.loads(mf.read_text())
    for st in m["stages"]:
        for a in st["artifacts"]:
            if a["backend"] == "aoti":
                a["aoti"]["compat"]["key"] = "torch-2.11.0+cu130/cuda-13.0/sm_90"
    mf.write_text(json.dumps(m))
    with pytest.raises(BundleError) as e:
        Model.from_bundle(dst, backend="aoti")
    msg = str(e.value)
    assert "\n" not in msg and "sm_90" in msg and "rebuild with: flexdit-export convert" in msg
    assert "--backend aoti --device cpu --precision fp32" in msg
    Model.from_bundle(dst)  # the ONNX path of the same bundle is unaffected


def test_bf16_package_within_tolerance(aoti_bf16_bundle):
    from flexdit_runtime.model import Model

    b = load_bundle(aoti_bf16_bundle)
    st = b.stages[0]
    a = b.artifact(st, "aoti", "bf16")
    assert st.default_precision == "bf16" and a.aoti.recipe.startswith("autocast-bf16")
    rec = st.parity["aoti/bf16"]
    assert rec["finite"] and rec["rel_rms"] <= 1e-2
    dtypes = {t.dtype for t in b.weight_files["aoti-bf16"].tensors}
    assert "bfloat16" in dtypes and "float32" in dtypes  # blocks bf16, embedders/final layer fp32
    onnx = Model.from_bundle(aoti_bf16_bundle)  # onnx/fp32 stays the ONNX Runtime default
    aoti = Model.from_bundle(aoti_bf16_bundle, backend="aoti")
    assert aoti.runner.precisions == ["bf16"] and onnx.runner.precisions == ["fp32"]
    x = np.random.default_rng(1).standard_normal((2, 4, 8, 8), dtype=np.float32)
    t, y = np.array([10, 900], np.float32), np.array([0, 10])
    ref, got = onnx.runner.run_rows(0, x, t, y), aoti.runner.run_rows(0, x, t, y)
    assert np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref ** 2)) <= 1e-2


# ---------------------------------------------------------------- plan refusals (no compile)

@pytest.mark.parametrize("opts,msg", [
    (dict(backend="onnx", device="cpu"), "--device applies to --backend aoti"),
    (dict(backend="aoti", device="cpu", precision="int8"), "no builder for precision int8 on aoti"),
    (dict(backend="aoti", device="tpu"), "unknown --device"),
    (dict(backend="onnx", precision="bf16"), "bf16"),
])
def test_plan_refuses(tmp_path, opts, msg):
    from flexdit_export.convert import ConvertOptions
    from flexdit_export.errors import UserError
    from flexdit_export.plan import resolve_plan

    ck = save_state_dict(random_model(MICRO, seed=1), tmp_path / "micro.pt")
    with pytest.raises(UserError, match=msg.replace("-", r"\-")):
        resolve_plan(ck, tmp_path / "out", ConvertOptions(num_heads=2, **opts))
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_plan_refuses_cuda_without_a_gpu(tmp_path):
    from flexdit_export.convert import ConvertOptions
    from flexdit_export.errors import UserError
    from flexdit_export.plan import resolve_plan

    ck = save_state_dict(random_model(MICRO, seed=1), tmp_path / "micro.pt")
    with pytest.raises(UserError, match="sees no CUDA GPU"):
        resolve_plan(ck, tmp_path / "out", ConvertOptions(num_heads=2, backend="aoti", device="cuda"))


def test_onnx_runtime_path_never_imports_torch(aoti_bundle):
    code = ("import sys; from flexdit_runtime.pipeline import Pipeline; "
            f"Pipeline.from_bundle({str(aoti_bundle)!r})([1], steps=2); "
            "from flexdit_runtime import stage_engine, engines, model; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------- --device (issue 9, point 3)

def test_device_cpu_runs_the_cpu_packages(aoti_bundle, tmp_path):
    """--device cpu on a bundle whose AOTI packages were compiled for the CPU: the ONNX graphs by
    default (torch-free), the packages with --backend aoti; both through the real CLI."""
    from conftest import run_cli

    (tmp_path / "p.txt").write_text("1\n2\n3\n")
    runs = {}
    for backend in (None, "aoti"):
        extra = ["--backend", backend] if backend else []
        p = run_cli("flexdit-run", tmp_path / "p.txt", "--bundle", aoti_bundle, "-o", tmp_path / f"o-{backend}",
                    "--steps", "6", "--seed", "3", "--device", "cpu", "--json", "--save-npy", *extra)
        r = json.loads(p.stdout)
        assert r["device"] == "cpu" and [e["kind"] for e in r["engines"]] == [backend or "onnx"] * 2
        runs[backend] = np.load(tmp_path / f"o-{backend}" / "samples.npy")
    scale = np.abs(runs[None]).max()
    assert np.abs(runs["aoti"] - runs[None]).max() <= 1e-4 * scale


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_on_cpu_packages_is_one_line(aoti_bundle, tmp_path):
    import onnxruntime as ort

    from conftest import run_cli

    (tmp_path / "p.txt").write_text("1\n")
    p = run_cli("flexdit-run", tmp_path / "p.txt", "--bundle", aoti_bundle, "-o", tmp_path / "o", "--device", "cuda",
                "--backend", "aoti", check=False)
    err = p.stderr.strip()
    assert p.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "AOTI packages were compiled for cpu; rebuild with: flexdit-export convert" in err
    assert err.endswith("--force --backend aoti --device cuda")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        p = run_cli("flexdit-run", tmp_path / "p.txt", "--bundle", aoti_bundle, "-o", tmp_path / "o", "--device",
                    "cuda", check=False)
        assert p.returncode == 2 and p.stderr.strip() == (
            "flexdit-run: error: --device cuda: the bundle's AOTI packages were compiled for the CPU, and for its "
            f"ONNX graphs this onnxruntime ({ort.__version__}) has no CUDA provider "
            "(install onnxruntime-gpu: README, GPU)")
    assert not (tmp_path / "o").exists()


def test_gpu_runtime_check_script_on_the_cpu(aoti_bundle):
    """benchmarks/gpu_runtime_check.py (GPU_CHECK.md, step 2) on the CPU with this session's
    bundle: every path runs and matches the ONNX Runtime reference, the CLI too."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_runtime_check import check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    r = check(aoti_bundle, "cpu")
    paths = r["paths"]
    assert set(paths) == {"device default", "aoti", "onnx"} and all(p["status"] == "ok" for p in paths.values())
    assert [e["kind"] for e in paths["aoti"]["engines"]] == ["aoti", "aoti"]
    assert [e["kind"] for e in paths["device default"]["engines"]] == ["onnx", "onnx"]
    assert paths["onnx"]["max_abs_diff_rel"] == 0.0 and paths["aoti"]["max_abs_diff_rel"] <= 1e-4
    assert all(p["finite"] for p in paths.values())
    assert r["cli"] == {"rc": 0, "stderr": "", "images": 3, "device": "cpu", "engines": ["onnx", "onnx"]}
