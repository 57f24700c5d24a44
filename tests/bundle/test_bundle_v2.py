"""Bundle format v2: one copy of each precision's weights on disk and in memory, the binding
check, inspect/verify reporting, and the v1 migration rule."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import run_cli
from flexdit_bundle import FORMAT_VERSION, load_bundle
from flexdit_bundle.manifest import BundleError
from flexdit_runtime import Pipeline
from flexdit_runtime.weights import SharedWeights

ROOT = Path(__file__).resolve().parents[2]
FASHION = ROOT / "models" / "fashion-flexdit"


def _param_bytes(ckpt_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(ckpt_dir / "model.safetensors"), "np") as f:
        return sum(f.get_tensor(k).size * 4 for k in f.keys())


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def fashion_bundle(tmp_path_factory):
    """The shipped Fashion-MNIST FlexDiT with its trained 4-stage schedule, via the real CLI."""
    out = tmp_path_factory.mktemp("v2") / "fashion"
    run_cli("flexdit-export", "convert", FASHION, "-o", out)
    return out


def test_four_stage_bundle_stores_the_weights_once(fashion_bundle):
    """The design target, deterministic: bundle bytes <= 1.05x one dense model's fp32 weights."""
    m = json.loads((fashion_bundle / "manifest.json").read_text())
    assert m["format"]["version"] == FORMAT_VERSION == 2 and len(m["stages"]) == 4
    ratio = _dir_bytes(fashion_bundle) / _param_bytes(FASHION)
    assert ratio <= 1.05, f"bundle is {ratio:.3f}x the weights"
    (w,) = m["weights"]
    assert w["path"] == "stages/weights.fp32.bin" and w["bytes"] >= 0.99 * _param_bytes(FASHION)
    # every stage graph binds the same tensors (by index) for every shared initializer it names
    bindings = [st["artifacts"][0]["weights"]["bindings"] for st in m["stages"]]
    shared = set.intersection(*(set(b) for b in bindings))
    assert len(shared) > 50 and all(len({b[n] for b in bindings}) == 1 for n in shared)
    # stage-specific pooling tables stay in their own graph
    for st, b in zip(m["stages"], bindings):
        inits = {t.name for t in onnx.load(str(fashion_bundle / st["artifacts"][0]["path"]),
                                           load_external_data=False).graph.initializer}
        assert "rs.pool" in inits and "rs.pool" not in b


def test_graphs_stay_standalone_onnx_models(fashion_bundle):
    """Each stage graph resolves its weights through ONNX external data (any ONNX tool can load it)."""
    st = json.loads((fashion_bundle / "manifest.json").read_text())["stages"][2]
    model = onnx.load(str(fashion_bundle / st["artifacts"][0]["path"]))  # loads the external data
    onnx.checker.check_model(model, full_check=True)
    w = {t.name: t for t in model.graph.initializer}
    assert onnx.numpy_helper.to_array(w["model.x_embedder.proj.weight"]).shape == (128, 1, 4, 4)


def test_runtime_reads_each_weight_file_once(fashion_bundle):
    b = load_bundle(fashion_bundle, defer_weights=True)
    sw = SharedWeights(b)
    pipe = Pipeline(b, providers=["cpu"])
    assert pipe.runner.weights.resident_bytes == b.manifest.weights[0].bytes
    res = pipe([3, 7], steps=8, sampler="ddim", cfg_scale=4.0, seed=0)
    assert sorted(res.stage_seconds) == [0, 1, 2, 3] and np.isfinite(res.samples).all()
    assert sw.resident_bytes == 0  # nothing read until a graph asks


ENGINE_OUTLIVES_RUNNER = r"""
import gc, sys
import numpy as np
from flexdit_runtime import RuntimeSettings, load_bundle
from flexdit_runtime.engines import StageRunner
from flexdit_runtime.engine_select import sample_inputs
b = load_bundle(sys.argv[1], defer_weights=True)
for shared in (True, False):
    runner = StageRunner(b, RuntimeSettings(threads=1, shared_graphs=shared), backend="onnx")
    engines = runner.engines
    feeds = [sample_inputs(st) for st in b.stages]
    before = [e.run(*f) for e, f in zip(engines, feeds)]
    del runner
    gc.collect()
    junk = [np.full(1 << 20, 7.0) for _ in range(64)]  # reuse whatever memory the runner gave back
    after = [e.run(*f) for e, f in zip(engines, feeds)]
    assert all(np.array_equal(x, y) for x, y in zip(before, after)), shared
print("ok")
"""


def test_engines_keep_the_shared_weights_alive(fashion_bundle):
    """The sessions run on the weight buffers in place: an engine kept after its runner is gone
    must still compute the same bits (it used to read freed memory and crash the process)."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", ENGINE_OUTLIVES_RUNNER, str(fashion_bundle)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", (p.returncode, p.stderr[-2000:])


def test_inspect_and_verify_report_shared_weights(fashion_bundle):
    s = json.loads(run_cli("flexdit-export", "inspect", fashion_bundle, "--json").stdout)
    (w,) = s["weights"]
    assert w["stages"] == [0, 1, 2, 3] and s["sizes"]["shared_weights"] == w["bytes"]
    assert s["sizes"]["per_stage"] < 0.1 * w["bytes"] and s["total_bytes"] == _dir_bytes(fashion_bundle)
    assert all(a["shared_bytes"] > 0.9 * w["bytes"] for st in s["stages"] for a in st["artifacts"])
    text = run_cli("flexdit-export", "inspect", fashion_bundle).stdout
    assert "shared weights fp32: stages/weights.fp32.bin" in text and "stored once" in text
    p = run_cli("flexdit-export", "verify", fashion_bundle, "--ckpt", FASHION, "--steps", "4")
    assert "shared weights: ok" in p.stderr and "640 bindings of 5 graphs" in p.stderr  # 4 stage graphs + the shared one
    assert "shared graph stages/shared.fp32.onnx: bit-identical to the graphs of stages [0, 1, 2, 3]" in p.stderr


def _copy(src, tmp_path, name="b"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _one_line_error(p, needle, progress_lines=False):
    """Exit 2, no traceback, one error line (verify logs its progress on stderr before it)."""
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert (progress_lines or len(lines) == 1) and needle in lines[-1] and "error:" in lines[-1], p.stderr


def test_tampered_weight_file_and_bindings_are_refused(fashion_bundle, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Sneaker\n")
    b = _copy(fashion_bundle, tmp_path, "flip")
    wf = b / "stages" / "weights.fp32.bin"
    data = bytearray(wf.read_bytes())
    data[1000] ^= 1
    wf.write_bytes(bytes(data))
    _one_line_error(run_cli("flexdit-run", prompts, "--bundle", b, "-o", tmp_path / "o1", "--steps", "2", check=False),
                    "checksum mismatch for stages/weights.fp32.bin")
    _one_line_error(run_cli("flexdit-export", "verify", b, check=False), "checksum mismatch", True)
    b = _copy(fashion_bundle, tmp_path, "swap")
    m = json.loads((b / "manifest.json").read_text())
    k0, k1 = "model.x_embedder.proj.weight", "model.final_layer.adaLN_modulation.1.weight"
    # the stages run through the shared graph (its bindings are what the runtime loads); verify
    # checks every graph's, the stage graphs' included
    for bind in (m["stages"][1]["artifacts"][0]["weights"]["bindings"], m["shared_graphs"][0]["weights"]["bindings"]):
        bind[k0], bind[k1] = bind[k1], bind[k0]
    (b / "manifest.json").write_text(json.dumps(m))
    _one_line_error(run_cli("flexdit-run", prompts, "--bundle", b, "-o", tmp_path / "o2", "--steps", "2", check=False),
                    "is not what the graph references")
    _one_line_error(run_cli("flexdit-export", "verify", b, check=False), "is not what the graph references", True)
    from flexdit_runtime import RuntimeSettings

    with pytest.raises(BundleError, match="stage1_s5.onnx: the manifest binds initializer"):
        Pipeline.from_bundle(b, settings=RuntimeSettings(shared_graphs=False))  # the stage graph's own check
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_weight_file_outside_the_bundle_is_refused(fashion_bundle, tmp_path):
    b = _copy(fashion_bundle, tmp_path, "link")
    wf = b / "stages" / "weights.fp32.bin"
    outside = tmp_path / "elsewhere.bin"
    shutil.move(wf, outside)
    wf.symlink_to(outside)
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(b)


def _to_v1(v2: Path, dst: Path) -> Path:
    """The same bundle as format v1 wrote it: every stage graph self-contained, no weights."""
    shutil.copytree(v2, dst)
    m = json.loads((dst / "manifest.json").read_text())
    from flexdit_bundle.files import sha256_file

    for st in m["stages"]:
        for a in st["artifacts"]:
            path = dst / a["path"]
            model = onnx.load(str(path))  # external data read in
            onnx.save(model, str(path))
            a.pop("weights")
            a.pop("shared_graph", None)
            a["sha256"], a["bytes"] = sha256_file(path), path.stat().st_size
    for w in m.pop("weights") + m.pop("shared_graphs", []):
        (dst / w["path"]).unlink()
    m["format"]["version"] = 1
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_v1_bundles_still_load_and_sample_the_same(fashion_bundle, tmp_path):
    v1 = _to_v1(fashion_bundle, tmp_path / "v1")
    assert not list(v1.rglob("weights.*.bin"))
    kw = dict(steps=6, sampler="ddpm", cfg_scale=4.0, seed=3)
    a = Pipeline.from_bundle(v1, providers=["cpu"])([1, 5], **kw).samples
    b = Pipeline.from_bundle(fashion_bundle, providers=["cpu"])([1, 5], **kw).samples
    # v2 runs unpacked GEMMs (no per-session pre-packed copies): same function, float32 rounding apart
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(np.abs(a).max()))


def test_newer_or_retired_format_versions_fail_with_one_line(fashion_bundle, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Sneaker\n")
    for version, needle in ((3, "newer than this runtime supports"), (0, "schema")):
        b = _copy(fashion_bundle, tmp_path, f"v{version}")
        m = json.loads((b / "manifest.json").read_text())
        m["format"]["version"] = version
        (b / "manifest.json").write_text(json.dumps(m))
        _one_line_error(run_cli("flexdit-run", prompts, "--bundle", b, "-o", tmp_path / "o", "--steps", "2",
                                check=False), needle)
    v1 = _copy(fashion_bundle, tmp_path, "v1-with-weights")
    m = json.loads((v1 / "manifest.json").read_text())
    m["format"]["version"] = 1
    (v1 / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="v1 manifest cannot have shared weight files"):
        load_bundle(v1)


def test_sharing_pass_restamps_engines_built_from_the_unshared_graphs(fashion_bundle, tmp_path):
    """convert builds TensorRT engines from each stage's self-contained graph, before the sharing
    pass rewrites it: the engine header and the manifest must name the published graph."""
    from flexdit_bundle.engine_header import read_header, write_engine
    from flexdit_bundle.files import sha256_file
    from flexdit_export.share_weights import share_weights

    root = _to_v1(fashion_bundle, tmp_path / "unshared")
    m = json.loads((root / "manifest.json").read_text())
    st = m["stages"][0]
    src = st["artifacts"][0]
    eng = root / "stages" / "stage0.fp32.engine"
    write_engine(eng, {"precision": "fp32", "source_sha256": src["sha256"], "cache_key": "k"}, b"PLAN")
    st["artifacts"].append({"backend": "tensorrt", "precision": "fp32", "path": "stages/stage0.fp32.engine",
                            "sha256": sha256_file(eng), "bytes": eng.stat().st_size, "source_sha256": src["sha256"]})
    before = src["sha256"]
    m = share_weights(root, m)
    src, art = m["stages"][0]["artifacts"]
    header, off = read_header(eng)
    assert src["sha256"] != before and header["source_sha256"] == art["source_sha256"] == src["sha256"]
    assert art["sha256"] == sha256_file(eng) and eng.read_bytes()[off:] == b"PLAN"


# --- shared graphs: one ONNX Runtime session for the stages of a precision (bundle-format 4.5) ---

def _engines(pipe):
    return pipe.runner.engines


def test_four_stages_run_through_one_shared_session_bit_identical(fashion_bundle):
    from flexdit_runtime import RuntimeSettings

    m = json.loads((fashion_bundle / "manifest.json").read_text())
    (g,) = m["shared_graphs"]
    assert g["stages"] == [0, 1, 2, 3] and g["verified"]["graph_optimization"] == "basic"
    assert all(st["artifacts"][0]["shared_graph"]["id"] == g["id"] for st in m["stages"])
    shared = Pipeline.from_bundle(fashion_bundle, threads=2)
    own = Pipeline.from_bundle(fashion_bundle, settings=RuntimeSettings(threads=2, shared_graphs=False))
    assert len({id(e.session) for e in _engines(shared)}) == 1  # one session for the four stages
    assert len({id(e.session) for e in _engines(own)}) == 4
    assert [d["shared_graph"] for d in shared.runner.describe()] == [g["path"]] * 4
    assert all("shared_graph" not in d for d in own.runner.describe())
    for kw in (dict(steps=25, sampler="ddpm", cfg_scale=4.0), dict(steps=10, sampler="ddim", eta=0.5, cfg_scale=2.0)):
        a = shared([1, 5, 9], seed=4, **kw)
        b = own([1, 5, 9], seed=4, **kw)
        assert sorted(a.stage_seconds) == [0, 1, 2, 3]
        assert np.array_equal(a.samples, b.samples)  # bit for bit, not merely close
    # rows of different stages through the one session, concurrently, still each stage's own result
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1, 32, 32), dtype=np.float32)
    from concurrent.futures import ThreadPoolExecutor

    def both(i):
        st = m["stages"][i]
        t = np.full(2, (st["t_min"] + st["t_max"]) // 2, np.float32)
        return [np.array_equal(p.runner.run_rows(i, x, t, np.array([3, 4])), own.runner.run_rows(i, x, t, np.array([3, 4])))
                for p in (shared,)]
    with ThreadPoolExecutor(4) as pool:
        assert all(all(r) for r in pool.map(both, [0, 1, 2, 3, 3, 2, 1, 0]))


def test_shared_graph_is_used_only_where_it_was_checked(fashion_bundle):
    """Another optimisation level than the recorded one: one session per stage again."""
    from flexdit_runtime import RuntimeSettings

    pipe = Pipeline.from_bundle(fashion_bundle, settings=RuntimeSettings(graph_optimization="all"))
    assert len({id(e.session) for e in _engines(pipe)}) == 4
    assert all("shared_graph" not in d for d in pipe.runner.describe())


def test_tampered_or_inconsistent_shared_graph_is_refused(fashion_bundle, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Sneaker\n")
    b = _copy(fashion_bundle, tmp_path, "flip")
    f = b / "stages" / "shared.fp32.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
    _one_line_error(run_cli("flexdit-run", prompts, "--bundle", b, "-o", tmp_path / "o1", "--steps", "2", check=False),
                    "checksum mismatch for stages/shared.fp32.onnx")
    for name, edit, needle in (
        ("unknown", lambda m: m["stages"][2]["artifacts"][0]["shared_graph"].update(id="nope"),
         "names shared graph 'nope', which the manifest does not list"),
        ("stages", lambda m: m["shared_graphs"][0].update(stages=[0, 1, 2]), "lists stages [0, 1, 2], but stages"),
        ("inputs", lambda m: m["stages"][0]["artifacts"][0]["shared_graph"]["inputs"].pop("rs.pool"),
         "do not match stages/shared.fp32.onnx's stage inputs"),
        ("index", lambda m: m["stages"][0]["artifacts"][0]["shared_graph"]["inputs"].update({"rs.pool": 10 ** 6}),
         "do not match stages/shared.fp32.onnx's stage inputs"),
    ):
        b = _copy(fashion_bundle, tmp_path, name)
        m = json.loads((b / "manifest.json").read_text())
        edit(m)
        (b / "manifest.json").write_text(json.dumps(m))
        _one_line_error(run_cli("flexdit-run", prompts, "--bundle", b, "-o", tmp_path / f"o-{name}", "--steps", "2",
                                check=False), needle)
    # a stage fed another stage's constants: the graph accepts the shapes, so only the sha256 of
    # the bundle stands between; with the manifest re-stamped the stage computes another stage
    # (documented: the manifest is trusted once its checksums pass). Here: swapping in a constant
    # of the wrong type is caught at load.
    b = _copy(fashion_bundle, tmp_path, "dtype")
    m = json.loads((b / "manifest.json").read_text())
    ins = m["stages"][0]["artifacts"][0]["shared_graph"]["inputs"]
    ins["rs.pool"], ins["val_63"] = ins["val_63"], ins["rs.pool"]
    (b / "manifest.json").write_text(json.dumps(m))
    _one_line_error(run_cli("flexdit-run", prompts, "--bundle", b, "-o", tmp_path / "o-dtype", "--steps", "2",
                            check=False), "which the graph does not take")
    assert not any((tmp_path / n).exists() for n in ("o1", "o-unknown", "o-stages", "o-inputs", "o-index", "o-dtype"))


def test_compiler_publishes_no_shared_graph_that_is_not_bit_identical(fashion_bundle, tmp_path, monkeypatch):
    """Without the explicit Gemm rewrite, ONNX Runtime computes the free-token graph in another
    order (~1e-7 relative): the check must catch that and leave the bundle per-stage."""
    from flexdit_export import shared_graph

    b = _copy(fashion_bundle, tmp_path, "nogemm")
    m = json.loads((b / "manifest.json").read_text())
    monkeypatch.setattr(shared_graph, "_explicit_gemm", lambda g: 0)
    notes = []
    out = shared_graph.add_shared_graphs(b, m, log=notes.append)
    assert "shared_graphs" not in out and not (b / "stages" / "shared.fp32.onnx").exists()
    assert all("shared_graph" not in a for st in out["stages"] for a in st["artifacts"])
    assert len(notes) == 1 and "differs from its own graph by" in notes[0], notes
    monkeypatch.undo()
    before = json.loads(json.dumps(out["weights"]))
    again = shared_graph.add_shared_graphs(b, json.loads(json.dumps(out)))  # and with it: published again
    assert again["shared_graphs"][0]["stages"] == [0, 1, 2, 3]
    assert again["weights"] == before  # the constants the first pass stored are found, not stored twice
    from flexdit_bundle.manifest import validate_manifest

    validate_manifest(again)


def test_recorded_conformance_trajectories_are_bit_identical_through_the_shared_graph():
    from flexdit_runtime import RuntimeSettings

    tiny = ROOT / "flexdit_bundle" / "conformance" / "tiny-bundle"
    a = Pipeline.from_bundle(tiny)
    b = Pipeline.from_bundle(tiny, settings=RuntimeSettings(shared_graphs=False))
    assert [bool(d.get("shared_graph")) for d in a.runner.describe()] == [True, True, False]
    for kw in (dict(steps=10, sampler="ddpm", cfg_scale=4.0), dict(steps=8, sampler="ddim", eta=0.5, cfg_scale=1.0)):
        assert np.array_equal(a([1, 2, 3], seed=11, **kw).samples, b([1, 2, 3], seed=11, **kw).samples)
