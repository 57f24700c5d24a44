"""Everything around the TensorRT engines that can be checked without TensorRT: engine headers,
cache keys, the engine cache, bundle entries, and the refusals (TensorRT absent here; another
GPU or TensorRT version). The TensorRT build and execution calls themselves are unverified."""

import json
import shutil

import pytest

from conftest import run_cli
from flexdit_export.errors import UserError
from flexdit_export.tensorrt_build import cache_key, engines_command, require_tensorrt, strongly_typed
from flexdit_runtime import Pipeline, load_bundle
from flexdit_bundle.manifest import BundleError
from flexdit_bundle.engine_header import check_engine, read_header, write_engine
from flexdit_runtime.tensorrt_engine import open_engine

pytest_plugins = ["quant_fixtures"]  # the quant_bundle fixture, shared with test_quantize.py

ENV = {"tensorrt_version": "10.3.0", "compute_capability": "8.9"}
SHA = "ab" * 32


def test_engine_header_round_trip_and_refusals(tmp_path):
    f = tmp_path / "e.engine"
    header = {**ENV, "precision": "int8-static", "strongly_typed": True, "source_sha256": SHA, "cache_key": "k"}
    write_engine(f, header, b"\x00PLAN-BYTES")
    got, offset = read_header(f)
    assert got == header and f.read_bytes()[offset:] == b"\x00PLAN-BYTES"
    check_engine(got, ENV, "stages/s0.engine")  # same TensorRT, same GPU: accepted
    for other, what in (({**ENV, "tensorrt_version": "10.4.0"}, "TensorRT 10.4.0"),
                        ({**ENV, "compute_capability": "9.0"}, "compute capability 9.0")):
        with pytest.raises(BundleError) as e:
            check_engine(got, other, "stages/s0.engine", "bundles/flex")
        msg = str(e.value)
        assert "built with TensorRT 10.3.0 for compute capability 8.9" in msg and what in msg
        assert "`flexdit-export engines bundles/flex --force`" in msg and "\n" not in msg
    with pytest.raises(BundleError, match="TensorRT is not installed"):
        check_engine(got, {"tensorrt_version": None, "compute_capability": None}, "stages/s0.engine")
    with pytest.raises(BundleError, match="no NVIDIA GPU"):
        check_engine(got, {**ENV, "compute_capability": None}, "stages/s0.engine")
    with pytest.raises(BundleError, match="another"):  # the runtime checks before TensorRT is touched
        open_engine(f, "stages/s0.engine", env={**ENV, "tensorrt_version": "another"})
    bad = tmp_path / "plain.plan"
    bad.write_bytes(b"ftrt" + b"\x00" * 40)  # a bare TensorRT plan without our header
    with pytest.raises(BundleError, match="not a flexdit TensorRT engine"):
        read_header(bad)


def test_cache_key_changes_with_every_input():
    base = cache_key(SHA, "fp16", ENV)
    assert base == cache_key(SHA, "fp16", dict(ENV)) and len(base) == 32
    others = {cache_key("cd" * 32, "fp16", ENV), cache_key(SHA, "int8-static", ENV),
              cache_key(SHA, "fp16", {**ENV, "tensorrt_version": "10.3.1"}),
              cache_key(SHA, "fp16", {**ENV, "compute_capability": "9.0"})}
    assert base not in others and len(others) == 4
    assert strongly_typed("fp16") and strongly_typed("int8-static") and strongly_typed("fp8")
    assert not strongly_typed("fp32")


def test_tensorrt_absent_is_refused_cleanly(quant_bundle, tmp_path):
    with pytest.raises(UserError, match="TensorRT is not installed"):
        require_tensorrt({"tensorrt_version": None, "compute_capability": None})
    before = (quant_bundle / "manifest.json").read_text()
    p = run_cli("flexdit-export", "engines", quant_bundle, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("flexdit-export engines: error: TensorRT is not installed")
    assert (quant_bundle / "manifest.json").read_text() == before


def test_engines_from_the_cache_into_a_bundle_and_the_runtime_check(quant_bundle, tmp_path):
    """The builder is replaced by a function that returns fake plan bytes (TensorRT is absent);
    everything else is the real code path: cache, keys, headers, bundle rewrite, runtime check."""
    b = tmp_path / "bundle"
    shutil.copytree(quant_bundle, b)
    cache = tmp_path / "cache"
    calls = []

    def fake_build(onnx_path, precision, timing_cache, log):
        calls.append((onnx_path.name, precision, timing_cache.name))
        return b"PLAN:" + onnx_path.name.encode()

    with pytest.raises(UserError, match="int8-dynamic graph uses ONNX Runtime-only operators"):
        engines_command(b, None, cache, env=ENV, build=fake_build, log=lambda *a: None)
    # stage 0's default is int8-dynamic (no QDQ graph): build the fp8 engine there instead
    engines_command(b, "fp8:stages=0", cache, env=ENV, build=fake_build, log=lambda *a: None)
    assert [c[1] for c in calls] == ["fp8", "fp16", "int8-static"]
    assert all(c[2] == "timing-trt10.3.0-sm8.9.cache" for c in calls)
    bundle = load_bundle(b)  # checksums of the engines included
    for st, prec in zip(bundle.stages, ["fp8", "fp16", "int8-static"]):
        eng = bundle.artifact(st, "tensorrt", prec)
        src = bundle.artifact(st, "onnx", prec)
        header, off = read_header(bundle.path(eng))
        assert header["source_sha256"] == src.sha256 == eng.source_sha256
        assert eng.tensorrt.to_json() == {"tensorrt_version": "10.3.0", "compute_capability": "8.9",
                                          "cache_key": cache_key(src.sha256, prec, ENV), "strongly_typed": True}
        assert bundle.path(eng).read_bytes()[off:] == b"PLAN:" + bundle.path(src).name.encode()
    with pytest.raises(UserError, match="already has TensorRT engines"):
        engines_command(b, "fp8:stages=0", cache, env=ENV, build=fake_build)
    engines_command(b, "fp8:stages=0", cache, force=True, env=ENV, build=fake_build, log=lambda *a: None)
    assert len(calls) == 3  # all three from the engine cache
    n_engines = len(list((b / "stages").glob("*.engine")))
    engines_command(b, "fp8:stages=0,2", cache, force=True, env=ENV, build=fake_build, log=lambda *a: None)
    assert calls[-1][1] == "fp8" and len(calls) == 4  # only stage 2's fp8 engine is new
    assert len(list((b / "stages").glob("*.engine"))) == n_engines  # the replaced engine file is gone
    # the runtime: TensorRT is not installed here, and an engine for another GPU is refused
    with pytest.raises(BundleError, match="TensorRT is not installed"):
        Pipeline.from_bundle(b, backend="tensorrt")
    st = load_bundle(b).stages[1]
    eng = next(a for a in st.artifacts if a.backend == "tensorrt")
    with pytest.raises(BundleError, match="rebuild them here with `flexdit-export engines"):
        open_engine(b / eng.path, eng.path, b, env={"tensorrt_version": "10.3.0", "compute_capability": "8.6"})
    prompts = tmp_path / "p.txt"
    prompts.write_text("1\n")
    p = run_cli("flexdit-run", prompts, "--bundle", b, "--backend", "tensorrt", "-o", tmp_path / "o", check=False)
    assert p.returncode == 2 and "TensorRT is not installed" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()
    m = json.loads((b / "manifest.json").read_text())
    assert sum(a["backend"] == "tensorrt" for s in m["stages"] for a in s["artifacts"]) == 3
