"""The numpy runtime: samplers against the PyTorch reference, respacing, prompts, schema."""

import copy
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import numpy as np
import pytest
import torch

from flexdit_export.reference_sampler import reference_sample
from flexdit_runtime import Pipeline
from flexdit_runtime.diffusion import Diffusion, linear_betas, space_timesteps
from flexdit_bundle.manifest import BundleError, schema, validate_manifest
from flexdit_runtime.prompts import ClassIndex, PromptError, read_prompts
from flexdit_runtime.samplers import guide
from sampling_loop import sample


def test_respacing_matches_improved_ddpm():
    assert space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
    assert space_timesteps(1000, "2,3") == [0, 499, 500, 750, 999]  # round(249.5) == 250
    s250 = space_timesteps(1000, "250")
    assert len(s250) == 250 and s250[:4] == [0, 4, 8, 12] and s250[-1] == 999
    with pytest.raises(ValueError):
        space_timesteps(10, "11")


def test_diffusion_tables_recorded_values():
    d = Diffusion(linear_betas(1000))
    assert d.alphas_cumprod[-1] == pytest.approx(4.0358e-05, rel=1e-3)
    assert d.alphas_cumprod[0] == pytest.approx(1 - 1e-4)
    r = Diffusion(linear_betas(1000), space_timesteps(1000, "10"))
    base = np.cumprod(1 - linear_betas(1000))
    np.testing.assert_allclose(r.alphas_cumprod, base[r.timestep_map], rtol=1e-12)


STAGES = [(600, 999, 2), (300, 599, 3), (0, 299, None)]


def _torch_denoiser(model, cfg_scale, policy, y, null=10):
    def den(x, t):
        s = next(s for lo, hi, s in STAGES if lo <= t <= hi)
        n = x.shape[0]
        with torch.no_grad():
            if cfg_scale > 1:
                out = model(torch.from_numpy(np.concatenate([x, x])), torch.full((2 * n,), float(t)),
                            torch.from_numpy(np.concatenate([y, np.full(n, null)])), s).numpy()
                return guide(out, n, cfg_scale, policy, 4)
            return model(torch.from_numpy(x), torch.full((n,), float(t)), torch.from_numpy(y), s).numpy()
    return den


@pytest.mark.parametrize("sampler,eta,cfg_scale,policy,spacing,clip", [
    ("ddim", 0.0, 4.0, "first3", "sections", False),
    ("ddim", 0.5, 1.5, "eps", "ddim", False),
    ("ddpm", 0.0, 4.0, "first3", "sections", False),
    ("ddpm", 0.0, 1.0, "first3", "sections", False),
    ("ddpm", 0.0, 2.0, "eps", "sections", True),
    ("ddim", 0.0, 2.0, "eps", "sections", True),
])
def test_numpy_sampler_matches_torch_reference(tiny_flex_model, sampler, eta, cfg_scale, policy, spacing, clip):
    """Same denoiser (the PyTorch model), same noise: the sampler arithmetic must agree."""
    steps = 10
    z = np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32)
    y = np.array([1, 7])
    noise = {k: np.random.default_rng(100 + k).standard_normal(z.shape).astype(np.float32) for k in range(steps)}
    ref = reference_sample(tiny_flex_model, STAGES, z, y, steps=steps, sampler=sampler, eta=eta, cfg_scale=cfg_scale,
                           cfg_channels=policy, spacing=spacing, noise_fn=noise.__getitem__, clip_denoised=clip)
    d = Diffusion(linear_betas(1000), space_timesteps(1000, f"ddim{steps}" if spacing == "ddim" else str(steps)))
    got = sample(d, _torch_denoiser(tiny_flex_model, cfg_scale, policy, y), z, cin=4, sampler=sampler, eta=eta,
                 noise_fn=noise.__getitem__, clip_denoised=clip)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 5e-5  # float32 rounding only; a formula slip is O(1)


def test_guidance_policies():
    out = np.arange(2 * 8, dtype=np.float32).reshape(2, 8, 1, 1)
    g3 = guide(out, 1, 2.0, "first3", 4)
    ge = guide(out, 1, 2.0, "eps", 4)
    np.testing.assert_array_equal(g3[0, :3, 0, 0], 2 * out[0, :3, 0, 0] - out[1, :3, 0, 0])
    np.testing.assert_array_equal(g3[0, 3:, 0, 0], out[0, 3:, 0, 0])
    np.testing.assert_array_equal(ge[0, 3, 0, 0], 2 * out[0, 3, 0, 0] - out[1, 3, 0, 0])
    np.testing.assert_array_equal(ge[0, 4:, 0, 0], out[0, 4:, 0, 0])


def test_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# header\nGolden Retriever\n\n  207  # by id\ntench\n")
    names = ["tench, Tinca tinca"] + [f"class {i}" for i in range(1, 207)] + ["golden retriever"]
    idx = ClassIndex(names, 208)
    assert [idx.resolve(p) for p in read_prompts(f)] == [207, 207, 0]
    with pytest.raises(PromptError, match="did you mean 'golden retriever'"):
        idx.resolve("golden retreiver")
    with pytest.raises(PromptError, match="outside"):
        idx.resolve("208")
    f.write_text("# only comments\n\n")
    with pytest.raises(PromptError, match="no prompts"):
        read_prompts(f)
    with pytest.raises(PromptError, match="not found"):
        read_prompts(tmp_path / "missing.txt")


def test_schema_checker_agrees_with_jsonschema(flex_bundle):
    m = json.loads((flex_bundle / "manifest.json").read_text())
    jsonschema.validate(m, schema())
    validate_manifest(m)
    mutations = [
        lambda m: m["format"].update(name="other"),
        lambda m: m["stages"][0].update(sparse_grid=0),
        lambda m: m["stages"][0]["artifacts"][0].update(sha256="xyz"),
        lambda m: m["stages"][0]["artifacts"][0].update(path="../../etc/passwd"),
        lambda m: m["stages"][0]["artifacts"][0].update(precision="int3"),
        lambda m: m["diffusion"].update(cfg_channels="all"),
        lambda m: m["stages"].clear(),
        lambda m: m["model"].pop("null_class"),
        lambda m: m["stages"][1]["inputs"][0].update(dtype="float64"),
        lambda m: m.update(decoder={"kind": "sd-vae"}),
        lambda m: m["diffusion"].update(num_timesteps=10**9),  # maximum
        lambda m: m["diffusion"].update(beta_end=1.0),  # exclusiveMaximum
        lambda m: m["output"].update(value_range=[-1e300, 1.0]),  # items' minimum
        lambda m: m["stages"][0]["artifacts"][0].update(path="stages/a\x00.onnx"),  # no control characters
    ]
    for mutate in mutations:
        bad = copy.deepcopy(m)
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema())
        with pytest.raises(BundleError):
            validate_manifest(bad)
    gap = copy.deepcopy(m)
    gap["stages"][0]["t_min"] += 1
    with pytest.raises(BundleError, match="exactly once"):
        validate_manifest(gap)


def test_runtime_never_imports_torch(flex_bundle):
    code = (
        "import sys\n"
        "from flexdit_runtime import Pipeline\n"
        f"r = Pipeline.from_bundle({str(flex_bundle)!r})([1, 'class 2' if False else 3], steps=4)\n"
        "assert r.images.shape == (2, 16, 16, 3), r.images.shape\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_shared_thread_pool_gives_the_same_samples(flex_bundle, tmp_path):
    """flexdit-run's process-wide pool (all stage sessions share it) changes timing only; the
    process-wide choice is made once, and a contradicting request later is one clear error."""
    out = tmp_path / "shared.npy"
    code = (
        "import numpy as np\n"
        "from flexdit_bundle.manifest import BundleError\n"
        "from flexdit_runtime import Pipeline, RuntimeSettings\n"
        "s = RuntimeSettings(providers=('cpu',), threads=1, shared_thread_pool=True)\n"
        f"pipe = Pipeline.from_bundle({str(flex_bundle)!r}, settings=s)\n"
        "assert not any(e.session._sess_options.use_per_session_threads for e in pipe.runner.engines)\n"
        f"np.save({str(out)!r}, pipe([0, 1, 2], steps=6, seed=5).samples)\n"
        "for bad in (RuntimeSettings(threads=2, shared_thread_pool=True), RuntimeSettings(shared_thread_pool=False)):\n"
        "    try:\n"
        "        bad.apply()\n"
        "    except BundleError as e:\n"
        "        print('refused:', e)\n"
        "assert RuntimeSettings(threads=1).apply() and RuntimeSettings().apply()  # None follows the process\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    refusals = p.stdout.strip().splitlines()
    assert len(refusals) == 2 and "cannot be resized to 2" in refusals[0] and "refuses sessions with their own" in refusals[1]
    own = Pipeline.from_bundle(flex_bundle, providers=["cpu"])([0, 1, 2], steps=6, seed=5).samples
    np.testing.assert_allclose(np.load(out), own, rtol=1e-5, atol=1e-5)


def test_legacy_share_thread_pool_still_shares(flex_bundle):
    """Scripts that call engines.share_thread_pool() before loading keep one pool for all sessions."""
    code = (
        "from flexdit_runtime import Pipeline, engines\n"
        "assert engines.share_thread_pool(1)\n"
        f"pipe = Pipeline.from_bundle({str(flex_bundle)!r})\n"
        "assert not any(e.session._sess_options.use_per_session_threads for e in pipe.runner.engines)\n"
        "s = engines.make_session(pipe.bundle.path(pipe.runner.engines[0].artifact), ['CPUExecutionProvider'], 1)\n"
        "assert not s._sess_options.use_per_session_threads\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_images_do_not_depend_on_batching(flex_bundle):
    pipe = Pipeline.from_bundle(flex_bundle)
    a = pipe([0, 1, 2], steps=5, seed=3, batch=1)
    b = pipe([0, 1, 2], steps=5, seed=3, batch=3)
    c = pipe([0, 1, 2], steps=5, seed=4, batch=3)
    np.testing.assert_allclose(a.samples, b.samples, rtol=1e-5, atol=1e-5)
    assert not np.allclose(a.samples, c.samples)


def test_pipeline_trajectory_matches_reference_through_stage_switches(flex_bundle, tiny_flex_model):
    """Bundle graphs + numpy sampler vs PyTorch model + torch reference, DDIM, same noise."""
    pipe = Pipeline.from_bundle(flex_bundle)
    z = np.random.default_rng(9).standard_normal((2, 4, 16, 16)).astype(np.float32)
    stages = [(s.t_min, s.t_max, s.sparse_grid) for s in pipe.bundle.stages]
    assert stages == STAGES
    res = pipe([4, 5], steps=12, sampler="ddim", cfg_scale=1.5, init_noise=z)
    got = res.samples
    ref = reference_sample(tiny_flex_model, stages, z, np.array([4, 5]), steps=12, sampler="ddim", cfg_scale=1.5)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
    # every stage served some of the 12 steps
    assert set(res.stage_seconds) == {0, 1, 2}


# ---- the model/request split: concurrency, step-wise sampling, engines bound by manifest names ----

def test_one_pipeline_serves_concurrent_requests_bit_for_bit(flex_bundle):
    """Threads share one loaded pipeline; each thread's images equal the single-threaded ones
    exactly, and each result's stage timings are its own."""
    pipe = Pipeline.from_bundle(flex_bundle, providers=["cpu"])
    jobs = [dict(seed=s, steps=5, sampler=("ddpm", "ddim")[s % 2], cfg_scale=(4.0, 1.0, 2.5)[s % 3], eta=0.3 * (s % 2))
            for s in range(6)]
    alone = [pipe([s % 10, (3 * s) % 10, 7], **kw) for s, kw in enumerate(jobs)]
    barrier = threading.Barrier(len(jobs))

    def work(i):
        barrier.wait()
        return pipe([i % 10, (3 * i) % 10, 7], **jobs[i])

    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(work, range(len(jobs))))
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a.samples, b.samples)
        np.testing.assert_array_equal(a.images, b.images)
        assert set(b.stage_seconds) == {0, 1, 2} and sum(b.stage_seconds.values()) < b.seconds


def test_step_api_packs_requests_without_changing_them(flex_bundle):
    """model.step advances several requests at once, rows of the same stage in shared calls
    (different seeds, guidance, samplers and timesteps); each request ends exactly as alone."""
    model = Pipeline.from_bundle(flex_bundle, providers=["cpu"]).model
    specs = [dict(prompts=[1, 2, 3], seed=0, steps=6), dict(prompts=[4], seed=1, steps=6, cfg_scale=1.0),
             dict(prompts=[5, 6], seed=2, steps=9, sampler="ddim", eta=0.5),
             dict(prompts=[7], seed=3, steps=4, init_noise=np.ones((4, 16, 16), np.float32))]

    def start(spec):
        spec = dict(spec)
        return model.start(spec.pop("prompts"), **spec)

    alone = [model.finish(model.run(start(s))) for s in specs]
    reqs = [start(s) for s in specs]
    packed_calls = 0
    while not all(r.done for r in reqs):
        stages = [model.runner.stage_for(r.timestep) for r in reqs if not r.done]
        packed_calls += len(stages) - len(set(stages))
        model.step(reqs)
    assert packed_calls > 0  # some steps really shared engine calls
    for a, r in zip(alone, reqs):
        b = model.finish(r)
        np.testing.assert_array_equal(a.samples, b.samples)
        assert b.class_ids == r.class_ids
    with pytest.raises(BundleError, match="finished"):
        model.finish(start(specs[0]))


def test_pipeline_keeps_noise_fn_meaning(flex_bundle):
    """noise_fn(k, idx) gets each group's image indices in the prompt list."""
    pipe = Pipeline.from_bundle(flex_bundle, providers=["cpu"])
    calls = []

    def noise(k, idx):
        calls.append(list(idx))
        return np.stack([np.random.default_rng([k, i]).standard_normal((4, 16, 16), dtype=np.float32) for i in idx])

    a = pipe([1, 2, 3], steps=3, batch=2, noise_fn=noise).samples
    assert {tuple(c) for c in calls} == {(0, 1), (2,)}
    np.testing.assert_array_equal(a, pipe([1, 2, 3], steps=3, batch=3, noise_fn=noise).samples)


def _rename_graph_io(bundle_dir, names):
    """Rename the stage graphs' inputs/outputs (old -> new) in the ONNX files and the manifest,
    keeping checksums consistent: a valid bundle whose tensors are not called x, t, y, out."""
    mf = bundle_dir / "manifest.json"
    m = json.loads(mf.read_text())
    for st in m["stages"]:
        for e in st["inputs"] + st["outputs"]:
            e["name"] = names.get(e["name"], e["name"])
        for a in st["artifacts"]:
            if a["backend"] != "onnx":
                continue
            _rename_in_graph(bundle_dir, a, names)
    for a in m.get("shared_graphs") or []:  # the graph the stages run through (docs/bundle-format.md 4.5)
        _rename_in_graph(bundle_dir, a, names)
    mf.write_text(json.dumps(m))
    return m


def _rename_in_graph(bundle_dir, a, names):
    import onnx

    from flexdit_bundle.files import sha256_file

    f = bundle_dir / a["path"]
    g = onnx.load(str(f), load_external_data=False)
    for v in list(g.graph.input) + list(g.graph.output):
        v.name = names.get(v.name, v.name)
    for node in g.graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    onnx.save(g, str(f))
    a["sha256"], a["bytes"] = sha256_file(f), f.stat().st_size


def test_engines_bind_by_manifest_names(flex_bundle, tmp_path):
    import shutil

    b = tmp_path / "renamed"
    shutil.copytree(flex_bundle, b)
    _rename_graph_io(b, {"x": "latent", "t": "timestep", "y": "label", "out": "model_output"})
    pipe = Pipeline.from_bundle(b, providers=["cpu"])
    assert pipe.runner.engines[0].describe()["inputs"] == ["latent", "timestep", "label"]
    assert pipe.runner.engines[0].describe()["output"] == "model_output"
    want = Pipeline.from_bundle(flex_bundle, providers=["cpu"])([1, 8], steps=4, seed=2).samples
    np.testing.assert_array_equal(pipe([1, 8], steps=4, seed=2).samples, want)
    # the manifest renamed, the graph not: refused at load, naming both sides
    m = json.loads((flex_bundle / "manifest.json").read_text())
    m["stages"][1]["inputs"][0]["name"] = "latent"
    c = tmp_path / "mismatch"
    shutil.copytree(flex_bundle, c)
    (c / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"stage 1\): the manifest names the inputs \['latent', 't', 'y'\] but the graph "
                                          r"has \['t', 'x', 'y'\]"):
        Pipeline.from_bundle(c)


def test_engine_kinds_are_a_registry():
    from flexdit_runtime.stage_engine import ENGINE_KINDS, StageEngine, engine_kind

    assert set(ENGINE_KINDS) >= {"onnx", "tensorrt"}
    backend, cls = engine_kind("onnx")
    assert backend == "onnx" and issubclass(cls, StageEngine)
    with pytest.raises(BundleError, match="unknown backend 'nope'"):
        engine_kind("nope")


def test_settings_prepack_and_load_threads_change_speed_only(flex_bundle):
    from flexdit_runtime import RuntimeSettings

    base = Pipeline.from_bundle(flex_bundle, providers=["cpu"])([2, 6], steps=4, seed=1).samples
    s = RuntimeSettings(providers="cpu", prepack_weights=True, load_threads=1)
    pipe = Pipeline.from_bundle(flex_bundle, settings=s)
    np.testing.assert_allclose(pipe([2, 6], steps=4, seed=1).samples, base, rtol=1e-5, atol=1e-5)
    with pytest.raises(BundleError, match="--load-threads must be a positive integer"):
        RuntimeSettings(load_threads=0)
    with pytest.raises(TypeError, match="inside settings"):
        Pipeline.from_bundle(flex_bundle, threads=2, settings=s)
