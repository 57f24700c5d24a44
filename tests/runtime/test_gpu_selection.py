"""GPU selection on a CPU-only machine (issue 9, points 3 and 4): which execution providers and
options a session gets, the TensorRT provider's cache keys, IO binding (its mechanics run here on
CPU buffers; the CPU path by default does not use it), and ``--device cpu|cuda`` through the API
and the real CLI. Nothing here runs on a GPU: the CUDA/TensorRT branches are checked for the
options they build and the refusals they give where no GPU or no onnxruntime-gpu exists."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import onnxruntime as ort
import pytest

from conftest import run_cli

from flexdit_bundle.manifest import BundleError
from flexdit_bundle.spec import Artifact
from flexdit_runtime import ort_engine as oe
from flexdit_runtime.device import resolve
from flexdit_runtime.settings import RuntimeSettings

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
ALL = [TRT, CUDA, CPU]
ORT_HAS_CUDA = CUDA in ort.get_available_providers()


def _one_line(p):
    err = p.stderr.strip()
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ---------------------------------------------------------------- provider selection

def test_default_providers_follow_what_is_present():
    assert oe.resolve_providers(None, ALL, gpu_present=True) == ALL
    assert oe.resolve_providers(None, ALL, gpu_present=False) == [CPU]  # onnxruntime-gpu on a GPU-less host
    assert oe.resolve_providers(None, [CPU], gpu_present=True) == [CPU]


def test_named_providers_get_their_fallbacks():
    assert oe.resolve_providers(["cuda"], ALL, gpu_present=True) == [CUDA, CPU]
    # TensorRT leaves what it cannot build to CUDA, then the CPU
    assert oe.resolve_providers(["tensorrt"], ALL, gpu_present=True) == [TRT, CUDA, CPU]
    assert oe.resolve_providers(["trt", "cpu"], ALL, gpu_present=True) == [TRT, CUDA, CPU]
    assert oe.resolve_providers(["cpu"], ALL, gpu_present=True) == [CPU]


@pytest.mark.parametrize("name", ["cuda", "tensorrt", "CUDAExecutionProvider"])
def test_gpu_provider_missing_from_onnxruntime_is_one_line_with_the_fix(name):
    with pytest.raises(BundleError) as e:
        oe.resolve_providers([name], ["AzureExecutionProvider", CPU], gpu_present=False)
    msg = str(e.value)
    assert "\n" not in msg and "not available" in msg and "onnxruntime-gpu" in msg and repr(name) in msg


def test_gpu_provider_without_a_gpu_is_refused():
    with pytest.raises(BundleError, match="no NVIDIA GPU is visible"):
        oe.resolve_providers(["cuda"], ALL, gpu_present=False)


@pytest.mark.skipif(ORT_HAS_CUDA, reason="this onnxruntime has the CUDA provider")
def test_providers_cuda_through_the_cli_is_one_line(flex_bundle, tmp_path):
    (tmp_path / "p.txt").write_text("1\n")
    p = run_cli("flexdit-run", tmp_path / "p.txt", "--bundle", flex_bundle, "-o", tmp_path / "o", "--steps", "2",
                "--providers", "cuda", check=False)
    err = _one_line(p)
    assert err.startswith("flexdit-run: error: execution provider 'cuda' is not available") and "onnxruntime-gpu" in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- provider options

def test_cpu_sessions_get_no_options_and_no_io_binding():
    s = RuntimeSettings()
    assert oe.provider_options([CPU], s, "fp32") == [{}]
    assert not oe.uses_io_binding([CPU], s) and not oe.uses_cuda_graph([CPU], s)
    # a CUDA graph means nothing on the CPU, whatever the setting
    assert not oe.uses_cuda_graph([CPU], RuntimeSettings(cuda_graph=True, io_binding=True))


def test_cuda_options():
    s = RuntimeSettings(device_id=1, cudnn_conv_algo_search="HEURISTIC", gpu_mem_limit=8 << 30)
    cuda, cpu = oe.provider_options([CUDA, CPU], s, "fp32")
    assert cuda == {"device_id": "1", "cudnn_conv_algo_search": "HEURISTIC",
                    "arena_extend_strategy": "kSameAsRequested",
                    "do_copy_in_default_stream": "1", "enable_cuda_graph": "1", "gpu_mem_limit": str(8 << 30)}
    assert cpu == {}
    assert oe.uses_io_binding([CUDA, CPU], s) and oe.uses_cuda_graph([CUDA, CPU], s)
    # defaults: ONNX Runtime's search, no memory limit
    d = oe.provider_options([CUDA, CPU], RuntimeSettings(), "fp16")[0]
    assert d["cudnn_conv_algo_search"] == "EXHAUSTIVE" and d["device_id"] == "0" and "gpu_mem_limit" not in d


@pytest.mark.parametrize("kw", [dict(cuda_graph=False), dict(io_binding=False)])
def test_cuda_graph_off(kw):
    s = RuntimeSettings(**kw)
    assert oe.provider_options([CUDA, CPU], s)[0]["enable_cuda_graph"] == "0"
    assert not oe.uses_cuda_graph([CUDA, CPU], s)
    assert oe.uses_io_binding([CUDA, CPU], s) == (kw.get("io_binding", True))


@pytest.mark.parametrize("precision,fp16,int8", [("fp32", "False", "False"), ("fp16", "True", "False"),
                                                 ("int8-static", "False", "True"), ("int8-dynamic", "False", "False"),
                                                 ("fp8", "False", "False")])
def test_tensorrt_options_per_precision(precision, fp16, int8):
    dirs = {"engines": "/c/key/engines/abc-" + precision, "timing": "/c/key/timing"}
    trt, cuda, cpu = oe.provider_options([TRT, CUDA, CPU], RuntimeSettings(), precision, dirs)
    assert trt == {"device_id": "0", "trt_fp16_enable": fp16, "trt_int8_enable": int8,
                   "trt_engine_cache_enable": "True", "trt_engine_cache_path": dirs["engines"],
                   "trt_timing_cache_enable": "True", "trt_timing_cache_path": dirs["timing"],
                   "trt_cuda_graph_enable": "True"}
    # the CUDA provider behind TensorRT takes leftovers only: no graph capture of its own
    assert cuda["enable_cuda_graph"] == "0" and cpu == {}
    no_cache = oe.provider_options([TRT, CUDA, CPU], RuntimeSettings(cuda_graph=False), precision, None)[0]
    assert not any(k.startswith(("trt_engine_cache", "trt_timing_cache", "trt_cuda_graph")) for k in no_cache)


def test_without_cuda_graph():
    opts = oe.provider_options([TRT, CUDA, CPU], RuntimeSettings(), "fp16", None)
    off = oe.without_cuda_graph(opts)
    assert "trt_cuda_graph_enable" not in off[0] and off[1]["enable_cuda_graph"] == "0"
    assert "trt_cuda_graph_enable" in opts[0]  # the input is left as it was
    assert oe.without_cuda_graph(oe.provider_options([CUDA, CPU], RuntimeSettings()))[0]["enable_cuda_graph"] == "0"


@pytest.mark.parametrize("kw,match", [(dict(cudnn_conv_algo_search="FAST"), "cudnn_conv_algo_search"),
                                      (dict(arena_extend_strategy="grow"), "arena_extend_strategy"),
                                      (dict(device_id=-1), "device_id"), (dict(gpu_mem_limit=0), "gpu_mem_limit"),
                                      (dict(cuda_graph=True, io_binding=False), "needs io_binding")])
def test_gpu_settings_are_checked(kw, match):
    with pytest.raises(BundleError, match=match):
        RuntimeSettings(**kw)


# ---------------------------------------------------------------- TensorRT provider caches

ENV = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt": "10.9.0", "onnxruntime": "1.22.0"}


@pytest.mark.parametrize("change", [dict(gpu="NVIDIA A100-SXM4-80GB"), dict(compute_capability="8.0"),
                                    dict(tensorrt="10.8.0"), dict(tensorrt="lib100900"), dict(onnxruntime="1.21.1")])
def test_trt_cache_key_changes_with_the_environment(change):
    assert oe.trt_cache_key({**ENV, **change}) != oe.trt_cache_key(ENV)


def test_trt_cache_key_is_stable_and_a_plain_directory_name():
    k = oe.trt_cache_key(ENV)
    assert k == oe.trt_cache_key(dict(ENV))
    assert k.startswith("NVIDIA-H100-80GB-HBM3-sm9.0-trt10.9.0-ort1.22.0-") and "/" not in k and " " not in k
    # names that differ only in characters the readable part drops still get different keys
    assert oe.trt_cache_key({**ENV, "gpu": "a/b"}) != oe.trt_cache_key({**ENV, "gpu": "a b"})


def _artifact(sha256, precision):
    return Artifact.from_json({"backend": "onnx", "precision": precision, "path": "stages/s.onnx", "sha256": sha256})


def test_trt_cache_dirs(tmp_path, monkeypatch):
    art = _artifact("ab" * 32, "fp16")
    d = oe.trt_cache_dirs(str(tmp_path), ENV, art)
    key = oe.trt_cache_key(ENV)
    assert d["engines"] == str(tmp_path / key / "engines" / ("ab" * 8 + "-fp16"))
    assert d["timing"] == str(tmp_path / key / "timing")
    other = oe.trt_cache_dirs(str(tmp_path), ENV, _artifact("cd" * 32, "fp16"))
    assert other["engines"] != d["engines"] and other["timing"] == d["timing"]  # engines per graph, timing shared
    assert oe.trt_cache_dirs(str(tmp_path), {**ENV, "tensorrt": "10.8.0"}, art)["timing"] != d["timing"]
    assert oe.trt_cache_dirs(None, ENV, art) is None
    # where the caches go: explicit, "" = none, the environment variable, the user's cache dir
    monkeypatch.delenv(oe.ENV_TRT_CACHE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert oe.trt_cache_root() == str(tmp_path / "xdg" / "flexdit" / "ort-tensorrt")
    monkeypatch.setenv(oe.ENV_TRT_CACHE, str(tmp_path / "env"))
    assert oe.trt_cache_root() == str(tmp_path / "env")
    assert oe.trt_cache_root(str(tmp_path / "x")) == str(tmp_path / "x")
    assert oe.trt_cache_root("") is None


def test_gpu_environment_here():
    env = oe.gpu_environment()
    assert env["onnxruntime"] == ort.__version__ and set(env) == set(ENV)


# ---------------------------------------------------------------- IO binding (mechanics, on CPU buffers)

def _rows(model, seed=0, n=2):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, *model.latent_shape), dtype=np.float32), np.array([900, 10][:n], np.float32),
            np.array([3, 10][:n], np.int64))


def test_cpu_engines_do_not_bind(flex_bundle):
    from flexdit_runtime.model import Model

    m = Model.from_bundle(flex_bundle, RuntimeSettings(providers=("cpu",)))
    for e, d in zip(m.runner.engines, m.engines()):
        assert e.bound is None and d["io_binding"] is False and d["cuda_graph"] is False
        assert "provider_options" not in d and d["providers"] == [CPU]


def test_io_binding_gives_the_same_rows_at_fixed_addresses(flex_bundle):
    from flexdit_runtime.model import Model
    from flexdit_runtime.pipeline import Pipeline

    plain = Model.from_bundle(flex_bundle, RuntimeSettings(providers=("cpu",)))
    bound = Model.from_bundle(flex_bundle, RuntimeSettings(providers=("cpu",), io_binding=True))
    for sid, e in enumerate(bound.runner.engines):
        assert e.bound is not None and e.bound.device_type == "cpu" and e.describe()["io_binding"] is True
        before = e.bound.addresses
        first = bound.runner.run_rows(sid, *_rows(plain, 0))
        np.testing.assert_array_equal(first, plain.runner.run_rows(sid, *_rows(plain, 0)))
        kept = first.copy()
        second = bound.runner.run_rows(sid, *_rows(plain, 1))
        np.testing.assert_array_equal(second, plain.runner.run_rows(sid, *_rows(plain, 1)))
        np.testing.assert_array_equal(first, kept)  # results are copies, not views of the bound output
        assert not np.array_equal(first, second)
        assert e.bound._addresses() == before  # the same device buffers, call after call
    # a whole trajectory is the same image
    kw = dict(steps=4, seed=3, cfg_scale=2.0)
    a = Pipeline.from_bundle(flex_bundle, providers=["cpu"])([1, 7, 2], **kw).samples
    bound_settings = RuntimeSettings(providers=("cpu",), io_binding=True)
    b = Pipeline.from_bundle(flex_bundle, settings=bound_settings)([1, 7, 2], **kw)
    np.testing.assert_array_equal(a, b.samples)


# ---------------------------------------------------------------- --device

def _fake_bundle(aoti_device=None, onnx=True):
    ns = types.SimpleNamespace
    arts = ([ns(backend="onnx", precision="fp32", aoti=None)] if onnx else []) + \
           ([ns(backend="aoti", precision="fp32", aoti=ns(device=aoti_device))] if aoti_device else [])
    return ns(stages=[ns(id=0, artifacts=arts), ns(id=1, artifacts=arts)], model=ns(source={"file": "ck.pt"}), root="b")


OK = lambda: None  # noqa: E731  (a probe that finds what it needs)


def _no(why):
    return lambda: why


@pytest.mark.parametrize("bundle,device,backend,probes,want_backend,want_providers", [
    (_fake_bundle(), "cpu", None, {}, "onnx", ("cpu",)),
    (_fake_bundle("cpu"), "cpu", None, {}, "onnx", ("cpu",)),      # the CPU default stays torch-free
    (_fake_bundle("cpu"), "cpu", "aoti", {}, "aoti", None),
    (_fake_bundle(), "cpu", "openvino", {}, "openvino", None),
    (_fake_bundle(), "cpu", "auto", {}, "auto", ("cpu",)),
    (_fake_bundle("cuda"), "cuda", None, dict(torch_cuda=OK, ort_cuda=OK), "aoti", None),
    (_fake_bundle("cuda"), "cuda", None, dict(torch_cuda=_no("no torch"), ort_cuda=OK), "onnx", ("cuda",)),
    (_fake_bundle("cpu"), "cuda", None, dict(torch_cuda=OK, ort_cuda=OK), "onnx", ("cuda",)),
    (_fake_bundle(), "cuda", "onnx", dict(ort_cuda=OK), "onnx", ("cuda",)),
    (_fake_bundle(), "cuda", "tensorrt", {}, "tensorrt", None),
    (_fake_bundle("cuda"), None, None, {}, "onnx", None),          # no --device: nothing changes
])
def test_device_picks_an_engine(bundle, device, backend, probes, want_backend, want_providers):
    got_backend, settings = resolve(bundle, device, backend, RuntimeSettings(), probes)
    assert got_backend == want_backend and settings.providers == want_providers
    # --providers that name a GPU provider are kept as given
    if device == "cuda" and want_backend == "onnx":
        kept = resolve(bundle, device, backend, RuntimeSettings(providers=("tensorrt", "cuda")), probes)[1]
        assert kept.providers == ("tensorrt", "cuda")


@pytest.mark.parametrize("bundle,device,backend,providers,probes,match", [
    (_fake_bundle(), "cpu", "tensorrt", None, {}, "TensorRT engines run on a GPU only"),
    (_fake_bundle(), "cpu", "aoti", None, {}, "has no AOTI packages"),
    (_fake_bundle("cuda"), "cpu", "aoti", None, {}, "compiled for cuda; .*--device cpu"),
    (_fake_bundle(), "cpu", None, ("cuda",), {}, "contradicts --providers cuda"),
    (_fake_bundle(), "cuda", None, ("cpu",), dict(ort_cuda=OK), "contradicts --providers cpu"),
    (_fake_bundle(), "cuda", "openvino", None, {}, "runs on the CPU only"),
    (_fake_bundle(), "cuda", "auto", None, {}, "runs on the CPU only"),
    (_fake_bundle("cpu"), "cuda", "aoti", None, {}, "compiled for cpu; rebuild with: .*--device cuda"),
    (_fake_bundle("cuda"), "cuda", "aoti", None, dict(torch_cuda=_no("torch sees no CUDA GPU")), "torch sees no"),
    (_fake_bundle("cuda"), "cuda", None, None, dict(torch_cuda=_no("torch sees no CUDA GPU"), ort_cuda=_no("no prov")),
     "AOTI packages need CUDA, but torch sees no CUDA GPU, and for its ONNX graphs no prov"),
    (_fake_bundle(), "cuda", None, None, dict(ort_cuda=_no("no prov")), "has no AOTI packages, and for its ONNX"),
    (_fake_bundle("cpu", onnx=False), "cuda", None, None, {}, "compiled for the CPU, and it has no ONNX graphs"),
    (_fake_bundle(), "tpu", None, None, {}, "unknown device 'tpu'"),
])
def test_device_refusals(bundle, device, backend, providers, probes, match):
    with pytest.raises(BundleError, match=match) as e:
        resolve(bundle, device, backend, RuntimeSettings(providers=providers), probes)
    assert "\n" not in str(e.value)


def test_device_cpu_end_to_end(flex_bundle, tmp_path):
    from flexdit_runtime.pipeline import Pipeline

    kw = dict(steps=4, seed=1)
    ref = Pipeline.from_bundle(flex_bundle)([2, 5], **kw).samples
    pipe = Pipeline.from_bundle(flex_bundle, device="cpu")
    assert pipe.model.settings.providers == ("cpu",)
    assert [e.kind for e in pipe.model.runner.engines] == ["onnx"] * 3
    np.testing.assert_array_equal(pipe([2, 5], **kw).samples, ref)
    (tmp_path / "p.txt").write_text("2\n5\n")
    p = run_cli("flexdit-run", tmp_path / "p.txt", "--bundle", flex_bundle, "-o", tmp_path / "o", "--steps", "4",
                "--seed", "1", "--device", "cpu", "--json", "--save-npy")
    r = json.loads(p.stdout)
    assert r["device"] == "cpu" and [e["kind"] for e in r["engines"]] == ["onnx"] * 3
    np.testing.assert_array_equal(np.load(tmp_path / "o" / "samples.npy"), ref)


@pytest.mark.skipif(ORT_HAS_CUDA, reason="this onnxruntime has the CUDA provider")
def test_device_cuda_without_a_gpu_through_the_cli(flex_bundle, tmp_path):
    (tmp_path / "p.txt").write_text("1\n")
    p = run_cli("flexdit-run", tmp_path / "p.txt", "--bundle", flex_bundle, "-o", tmp_path / "o", "--steps", "2",
                "--device", "cuda", check=False)
    err = _one_line(p)
    assert err == ("flexdit-run: error: --device cuda: the bundle has no AOTI packages, and for its ONNX graphs this "
                   f"onnxruntime ({ort.__version__}) has no CUDA provider (install onnxruntime-gpu: README, GPU)")
    assert not (tmp_path / "o").exists()
    p = run_cli("flexdit-run", tmp_path / "p.txt", "--bundle", flex_bundle, "-o", tmp_path / "o", "--device", "gpu",
                check=False)
    assert "argument --device: invalid choice: 'gpu'" in _one_line(p)


def test_device_paths_stay_torch_free(flex_bundle):
    """--device cpu, and the --device cuda refusal for a bundle without CUDA packages, never
    import torch (only the AOTI path needs it)."""
    code = ("import sys\nfrom flexdit_bundle.manifest import BundleError\n"
            "from flexdit_runtime.pipeline import Pipeline\n"
            f"Pipeline.from_bundle({str(flex_bundle)!r}, device='cpu')([1], steps=2)\n"
            + ("" if ORT_HAS_CUDA else
               f"try:\n    Pipeline.from_bundle({str(flex_bundle)!r}, device='cuda')\n"
               "    raise SystemExit('no refusal')\n"
               "except BundleError:\n    pass\n")
            + "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_cuda_graph_failure_reopens_the_stage_without_it(flex_bundle, monkeypatch):
    """The CUDA-graph branch's control flow, with the GPU replaced: sessions are real CPU sessions
    that record the options they were given, and a bound run fails while the options ask for a
    CUDA graph (as ONNX Runtime does when a stage cannot be captured). The engine must reopen
    the stage without the graph, keep IO binding, say why, and compute the same rows."""
    from flexdit_runtime.model import Model

    real_make, real_bound = oe.make_session, oe.BoundIO
    given = []

    def make_session(path, providers, *a, provider_options=None, **kw):
        given.append(provider_options)
        s = real_make(path, [CPU], *a, **kw)
        s.asked = provider_options
        return s

    class CpuBound(real_bound):
        def __init__(self, session, stage, names, out, device_type, device_id=0):
            assert device_type == "cuda"
            super().__init__(session, stage, names, out, "cpu", device_id)

        def run(self, session, arrays):
            if session.asked[0].get("enable_cuda_graph") == "1":
                raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : graph capture is not supported here")
            return super().run(session, arrays)

    monkeypatch.setattr(oe, "resolve_providers", lambda names: [CUDA, CPU])
    monkeypatch.setattr(oe, "make_session", make_session)
    monkeypatch.setattr(oe, "BoundIO", CpuBound)
    m = Model.from_bundle(flex_bundle, RuntimeSettings())
    stages = len(m.runner.engines)
    assert [g[0]["enable_cuda_graph"] for g in given].count("1") == stages  # every stage tried the graph first
    for e in m.runner.engines:
        d = e.describe()
        assert d["cuda_graph"] is False and "graph capture is not supported here" in d["cuda_graph_error"]
        assert d["io_binding"] is True and d["provider_options"][0]["enable_cuda_graph"] == "0"
    monkeypatch.undo()
    plain = Model.from_bundle(flex_bundle, RuntimeSettings(providers=("cpu",), graph_optimization="all"))
    rows = _rows(plain, 4)  # (GPU providers get the "all" optimisation level)
    np.testing.assert_array_equal(m.runner.run_rows(0, *rows), plain.runner.run_rows(0, *rows))
    # and with the graph turned off nothing is tried twice
    given.clear()
    monkeypatch.setattr(oe, "resolve_providers", lambda names: [CUDA, CPU])
    monkeypatch.setattr(oe, "make_session", make_session)
    monkeypatch.setattr(oe, "BoundIO", CpuBound)
    Model.from_bundle(flex_bundle, RuntimeSettings(cuda_graph=False))
    assert len(given) == stages and all(g[0]["enable_cuda_graph"] == "0" for g in given)


def test_trt_cache_dirs_that_cannot_be_made_turn_the_caches_off(tmp_path):
    dirs = oe.trt_cache_dirs(str(tmp_path / "c"), ENV, _artifact("ab" * 32, "fp32"))
    assert oe.make_dirs(dirs) == (dirs, None) and all(os.path.isdir(d) for d in dirs.values())
    (tmp_path / "file").write_text("x")  # a file where the cache directory should be
    blocked = oe.trt_cache_dirs(str(tmp_path / "file"), ENV, _artifact("ab" * 32, "fp32"))
    got, why = oe.make_dirs(blocked)
    assert got is None and why.startswith("TensorRT caches off: cannot create ") and "\n" not in why
    assert oe.make_dirs(None) == (None, None)
    # and no cache options are given then
    assert "trt_engine_cache_path" not in oe.provider_options([TRT, CUDA, CPU], RuntimeSettings(), "fp32", got)[0]


# ---------------------------------------------------------------- the engine registry

def test_a_new_engine_kind_is_one_registration_line(monkeypatch, tmp_path):
    """A kind registered with one line (ONNX Runtime under another name, declaring itself the
    first choice on CUDA, a candidate of --backend auto and a keeper of trajectories on its
    device) is what --device picks, what --backend auto measures, what the server's pre-check
    asks, and whose sampler Model.run hands whole trajectories to."""
    import dataclasses
    from pathlib import Path

    import flexdit_bundle
    from flexdit_bundle.manifest import load_bundle
    from flexdit_runtime import stage_engine
    from flexdit_runtime.engine_select import candidates
    from flexdit_runtime.engines import StageRunner
    from flexdit_runtime.model import Model
    from flexdit_runtime.ort_engine import OrtStageEngine
    from flexdit_serve.cli import check_engines
    from flexdit_serve.config import ServeConfig

    calls = []

    class FakeEngine(OrtStageEngine):
        kind = "fake"
        devices = ("cpu", "cuda")
        default_on = {"cuda": -1}
        auto = True
        keeps_trajectory_on_device = True
        refusal = None

        @classmethod
        def preflight(cls, bundle, stage, artifact, settings):
            calls.append("preflight")
            if cls.refusal:
                raise BundleError(cls.refusal)

        @classmethod
        def on_device(cls, bundle, device, settings, probes, explicit):
            return dataclasses.replace(settings, providers=("cpu",))  # its "device" is the CPU here

        @classmethod
        def run_trajectory(cls, model, request, progress):
            calls.append("trajectory")
            while not request.done:
                model.step([request])

    monkeypatch.setitem(stage_engine.ENGINE_KINDS, "fake", ("onnx", FakeEngine))  # the one line
    monkeypatch.setenv("FLEXDIT_AUTO_PROFILE", "off")
    monkeypatch.setenv("FLEXDIT_OPENVINO_CACHE", str(tmp_path / "ov"))
    tiny = Path(flexdit_bundle.__file__).resolve().parent / "conformance" / "tiny-bundle"
    b = load_bundle(tiny, defer_weights=True)

    assert "fake" in stage_engine.backend_choices()
    # --device: the default walk tries it first on CUDA; named, it runs where it says
    assert resolve(b, "cuda", None, RuntimeSettings(), {})[0] == "fake"
    assert resolve(b, "cpu", None, RuntimeSettings(), {})[0] == "onnx"
    assert resolve(b, "cpu", "fake", RuntimeSettings(), {})[0] == "fake"

    # the sampler: every stage on the fake kind -> its trajectory sampler, same image as ONNX Runtime
    fake, ref = Model(b, RuntimeSettings(threads=1), backend="fake"), Model(b, RuntimeSettings(threads=1))
    assert {e.kind for e in fake.runner.engines} == {"fake"}
    outs = []
    for m in (fake, ref):
        req = m.start([1, 2], m.params(steps=4), seed=5)
        m.run(req)
        outs.append(req.x)
    assert calls.count("trajectory") == 1
    np.testing.assert_array_equal(*outs)

    # --backend auto: a candidate of every stage, measured with the others
    assert all("fake" in {k for k, _ in candidates(b, st, None)} for st in b.stages)
    auto = StageRunner(b, RuntimeSettings(threads=1), backend="auto")
    assert all("fake/fp32" in sel["ms"] for sel in auto.selection)
    assert calls.count("trajectory") > 1  # timed inside the sampler its trajectories go through

    # the server's pre-Ray check: the kind's preflight, here only
    calls.clear()
    check_engines(b, ServeConfig(bundle=str(tiny), backend="fake"), local=True)
    assert calls == ["preflight"] * len(b.stages)
    FakeEngine.refusal = "fake: no fake device on this machine"
    with pytest.raises(BundleError, match="no fake device"):
        check_engines(b, ServeConfig(bundle=str(tiny), backend="fake"), local=True)
    check_engines(b, ServeConfig(bundle=str(tiny), backend="fake"), local=False)  # a cluster's nodes judge it
    check_engines(b, ServeConfig(bundle=str(tiny), device="cuda"), local=False)  # --device cuda picks it
    with pytest.raises(BundleError, match="no fake device"):
        check_engines(b, ServeConfig(bundle=str(tiny), device="cuda", gpus=1), local=True)
