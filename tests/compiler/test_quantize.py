"""Optimised, fp16, int8 (dynamic, static QDQ) and fp8 stage graphs, the per-stage precision
policy in the manifest and the runtime, and every user error around them (issue 4)."""

import json
import shutil

import jsonschema
import numpy as np
import onnx
import pytest
import torch

from flexdit_export.calib import CalibSet
from flexdit_export.calib.readers import StageBatches
from conftest import run_cli
from flexdit_export.export import error_stats, layer_of, onnx_session
from flexdit_export.schedule import Stage
from flexdit_export.stages import StageModule
from flexdit_runtime import Pipeline, load_bundle
from flexdit_bundle.cpu import measured_on
from flexdit_bundle.manifest import BundleError, schema
from flexdit_bundle.precision import PrecisionError, describe, parse_policy

pytest_plugins = ["quant_fixtures"]  # the quant_bundle fixture, shared with test_tensorrt.py

DEFAULTS = ["int8-dynamic", "fp16", "int8-static"]  # quant_fixtures.POLICY
# relative RMS error vs the fp32 graph on held-out trajectory rows of the tiny random model
TOL = {"fp16": 5e-3, "int8-dynamic": 0.05, "int8-static": 0.08, "fp8": 0.2}


# ---------------------------------------------------------------- the policy grammar
def test_policy_grammar():
    assert parse_policy("int8:stages=0-2,fp16:stages=3", 4) == {0: "int8-dynamic", 1: "int8-dynamic",
                                                                2: "int8-dynamic", 3: "fp16"}
    assert parse_policy("fp16,int8:stages=0,1", 4) == {0: "int8-dynamic", 1: "int8-dynamic", 2: "fp16", 3: "fp16"}
    assert parse_policy("int8-static:stages=1", 3) == {0: "fp32", 1: "int8-static", 2: "fp32"}
    assert parse_policy("int8", 2, backend="tensorrt") == {0: "int8-static", 1: "int8-static"}
    assert parse_policy(None, 2) == {0: "fp32", 1: "fp32"}
    assert parse_policy("fp8:stages=1", 3, default=None) == {1: "fp8"}  # a runtime override names only some stages
    p = {0: "int8-dynamic", 1: "int8-dynamic", 2: "fp16", 3: "int8-dynamic"}
    assert describe(p) == "int8-dynamic:stages=0-1,3,fp16:stages=2" and parse_policy(describe(p), 4) == p


@pytest.mark.parametrize("spec,msg", [
    ("int9", "unknown precision 'int9'"), ("int8:stages=4", "names stage 4, but the bundle has stages 0..3"),
    ("int8:stages=0,fp16:stages=0", "assigns stage 0 twice"), ("int8:stage=0", "expected PRECISION"),
    ("int8:stages=2-1", "empty range"), ("fp16,int8", "more than one item without stages="),
    ("3,fp16", "does not follow"), ("fp16,,int8:stages=1", "empty item"), ("int8:stages=a", "not a stage id"),
])
def test_policy_errors(spec, msg):
    with pytest.raises(PrecisionError, match=msg.replace("(", r"\(")):
        parse_policy(spec, 4)


# ---------------------------------------------------------------- one bundle with every precision
def _manifest(b):
    return json.loads((b / "manifest.json").read_text())


def _art(st, prec, backend="onnx"):
    return next(a for a in st["artifacts"] if a["backend"] == backend and a["precision"] == prec)


def test_manifest_records_policy_optimisation_calibration(quant_bundle):
    m = _manifest(quant_bundle)
    jsonschema.validate(m, schema())  # the independent validator agrees with the runtime's
    load_bundle(quant_bundle)  # checksums of every derived graph
    assert [st["default_precision"] for st in m["stages"]] == DEFAULTS
    cs = CalibSet.open(quant_bundle.parent / "q.calib")
    assert m["calibration"]["sha256"] == cs.sha256 and m["calibration"]["settings"]["steps"] == 10
    for st in m["stages"]:
        fp32 = _art(st, "fp32")
        opt = fp32["optimization"]
        assert opt["level"] == "basic" and opt["onnxsim"] is True and opt["nodes_before"] > 100 and opt["nodes_after"] > 100
        assert len(onnx.load(str(quant_bundle / fp32["path"])).graph.node) == opt["nodes_after"]
        assert st["parity"]["onnx/fp32"]["max_rel"] < 1e-4  # the optimised graph vs PyTorch
        for a in st["artifacts"]:
            if a["precision"] == "fp32":
                continue
            assert a["source_sha256"] == fp32["sha256"] and a["check"]["status"] == "passed"
            assert a["error"]["finite"] and a["error"]["rel_rms"] < TOL[a["precision"]]
            assert a["error"]["measured_on"] == measured_on()  # the CPU the gate ran on
            if a["precision"] in ("int8-static", "fp8"):
                assert a["quantization"]["calibration_sha256"] == cs.sha256
        cal = next(c for c in m["calibration"]["stages"] if c["id"] == st["id"])
        assert cal["calib_rows"] == cs.rows(st["id"]) and cal["holdout_rows"] == cs.rows(st["id"], "holdout")
    summary = json.loads(run_cli("flexdit-export", "inspect", quant_bundle, "--json").stdout)
    assert [s["default_precision"] for s in summary["stages"]] == DEFAULTS
    text = run_cli("flexdit-export", "inspect", quant_bundle).stdout
    assert "onnx/int8-dynamic*" in text and "rel RMS" in text and "calibration" in text


def test_every_variant_against_fp32_and_pytorch_on_held_out_rows(quant_bundle, tiny_flex_model):
    """Recompute the errors the manifest records, and compare with the PyTorch stage itself."""
    m = _manifest(quant_bundle)
    cs = CalibSet.open(quant_bundle.parent / "q.calib")
    for st in m["stages"]:
        feeds = list(StageBatches(cs, st["id"], st["batch"], "holdout"))
        module = StageModule(tiny_flex_model, Stage(st["t_min"], st["t_max"], st["sparse_grid"])).eval()
        with torch.no_grad():  # all rows in one call (the module has no fixed batch)
            torch_out = module(*(torch.from_numpy(np.concatenate([f[k] for f in feeds])) for k in ("x", "t", "y"))).numpy()
        fp32_s = onnx_session(quant_bundle / _art(st, "fp32")["path"])
        fp32_out = np.concatenate([fp32_s.run(None, f)[0] for f in feeds])
        assert error_stats(fp32_out, torch_out)["max_rel"] < 1e-4
        for a in st["artifacts"]:
            if a["precision"] == "fp32":
                continue
            s = onnx_session(quant_bundle / a["path"])
            got = np.concatenate([s.run(None, f)[0] for f in feeds])
            vs_fp32, vs_torch = error_stats(got, fp32_out), error_stats(got, torch_out)
            assert vs_fp32["rel_rms"] == pytest.approx(a["error"]["rel_rms"], rel=1e-3, abs=1e-7)
            assert vs_torch["rel_rms"] < TOL[a["precision"]], (st["id"], a["precision"], vs_torch)
            if a["precision"] == "fp16":  # fp16 is much closer than any int8 form
                assert vs_torch["rel_rms"] < 5e-3


def _types(model):
    inferred = onnx.shape_inference.infer_shapes(model)
    t = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)
         + list(inferred.graph.output)}
    t.update({i.name: i.data_type for i in inferred.graph.initializer})
    return t


def test_fp16_graph_keeps_its_islands_in_fp32(quant_bundle):
    st = _manifest(quant_bundle)["stages"][1]
    model = onnx.load(str(quant_bundle / _art(st, "fp16")["path"]))
    F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert all(v.type.tensor_type.elem_type == F32 for v in list(model.graph.input)[:2] + list(model.graph.output))
    types = _types(model)
    by_kind = {"island": [], "body": []}
    for n in model.graph.node:
        if n.op_type in ("Cast", "Constant") or not n.input or n.input[0] not in types:
            continue
        layer = layer_of(n.name)
        island = (n.op_type in ("LayerNormalization", "Softmax") or "adaLN_modulation" in layer
                  or layer.startswith(("t_embedder", "y_embedder", "final_layer")))
        by_kind["island" if island else "body"].append((n.op_type, layer, types[n.input[0]]))
    assert by_kind["island"] and all(t == F32 for _, _, t in by_kind["island"]), by_kind["island"][:5]
    body_mm = [t for op, layer, t in by_kind["body"] if op in ("MatMul", "Gemm") and ".mlp." in layer]
    assert body_mm and all(t == F16 for t in body_mm)  # the MLPs really run in fp16
    assert _art(st, "fp16")["fp32_islands"]["spec"] == ["layernorm", "softmax", "embedders", "final_layer"]


def test_qdq_graphs_are_per_channel_symmetric_and_respect_excludes(quant_bundle):
    stages = _manifest(quant_bundle)["stages"]
    for prec, st, qtype in (("int8-static", stages[2], onnx.TensorProto.INT8),
                            ("fp8", stages[0], onnx.TensorProto.FLOAT8E4M3FN)):
        model = onnx.load(str(quant_bundle / _art(st, prec)["path"]))
        inits = {i.name: i for i in model.graph.initializer}
        dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
              and inits[n.input[0]].data_type == qtype and len(inits[n.input[0]].dims) == 2]
        assert dq, prec
        for n in dq:  # weights: one scale per output channel, zero point 0
            scale = onnx.numpy_helper.to_array(inits[n.input[1]])
            assert scale.ndim == 1 and scale.size > 1
            zp = inits[n.input[2]]
            assert not np.any(onnx.numpy_helper.to_array(zp).astype(np.float32))
        act_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
        assert act_q and all(not np.any(onnx.numpy_helper.to_array(inits[n.input[2]]).astype(np.float32))
                             for n in act_q)  # activations symmetric too (TensorRT needs zero point 0)
        producers = {o: n for n in model.graph.node for o in n.output}
        excluded = 0
        for n in model.graph.node:  # --quant-exclude default,final_layer (default: the SDTM skip-path linears)
            layer = layer_of(n.name)
            if (layer.startswith("final_layer") or layer.endswith(".merged_layer2")) and n.op_type in ("MatMul", "Gemm"):
                excluded += 1
                assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in n.input)
        assert excluded == 2 + 2  # final_layer: adaLN + linear; two SDTMs: one merged_layer2 each
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        assert opset >= (19 if prec == "fp8" else 18)
    dyn = onnx.load(str(quant_bundle / _art(stages[0], "int8-dynamic")["path"]))
    ops = {n.op_type for n in dyn.graph.node}
    assert "DynamicQuantizeLinear" in ops and ({"MatMulInteger", "DynamicQuantizeMatMul"} & ops)
    integer = [layer_of(n.name) for n in dyn.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]
    assert integer and not [x for x in integer if x.startswith("final_layer") or x.endswith("merged_layer2")]
    assert any(x.endswith("merged_layer1") for x in integer)
    # int8 weights in the 7-bit range: exact integer sums also where u8 x s8 products are paired in int16 (AVX2)
    w8 = [onnx.numpy_helper.to_array(i) for i in dyn.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert w8 and min(w.min() for w in w8) >= -64 and max(w.max() for w in w8) <= 64
    assert "7-bit range [-64, 64]" in _art(stages[0], "int8-dynamic")["quantization"]["weights"]
    assert _art(stages[0], "fp8")["check"]["by"].endswith("(float8 Q/DQ emulated in fp32)")


def test_runtime_uses_the_policy_by_default_and_overrides(quant_bundle, tmp_path):
    pipe = Pipeline.from_bundle(quant_bundle)
    assert pipe.runner.precisions == DEFAULTS
    assert Pipeline.from_bundle(quant_bundle, precision="fp32").runner.precisions == ["fp32"] * 3
    assert Pipeline.from_bundle(quant_bundle, precision="fp8,fp32:stages=2").runner.precisions == ["fp8", "fp8", "fp32"]
    assert Pipeline.from_bundle(quant_bundle, precision="fp32:stages=1").runner.precisions == \
        ["int8-dynamic", "fp32", "int8-static"]
    with pytest.raises(BundleError, match="no onnx/int8-static artifact for stage 0"):
        Pipeline.from_bundle(quant_bundle, precision="int8-static")
    kw = dict(steps=8, sampler="ddim", cfg_scale=4.0, seed=0)
    a = pipe([1, 7], **kw).samples
    b = Pipeline.from_bundle(quant_bundle, precision="fp32")([1, 7], **kw).samples
    assert np.isfinite(a).all() and error_stats(a, b)["rel_rms"] < 0.05  # a whole trajectory stays close to fp32
    prompts = tmp_path / "p.txt"
    prompts.write_text("3\n")
    p = run_cli("flexdit-run", prompts, "--bundle", quant_bundle, "-o", tmp_path / "o", "--steps", "4")
    assert "precision per stage: 0: int8-dynamic, 1: fp16, 2: int8-static" in p.stdout
    p = run_cli("flexdit-run", prompts, "--bundle", quant_bundle, "-o", tmp_path / "o", "--steps", "4",
                "--precision", "fp32:stages=0", "--force")  # the same -o again: replace the first run's images
    assert "precision per stage: 0: fp32, 1: fp16, 2: int8-static" in p.stdout
    for bad, msg in ((["--precision", "int8:stages=5"], "names stage 5"), (["--precision", "int4"], "unknown precision"),
                     (["--backend", "tensorrt"], "no tensorrt artifact for stage 0")):
        p = run_cli("flexdit-run", prompts, "--bundle", quant_bundle, "-o", tmp_path / "o2", *bad, check=False)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr
        assert p.stderr.strip().splitlines()[-1].startswith("flexdit-run: error:")


def test_bundles_without_a_policy_still_load(flex_bundle, tmp_path):
    """A manifest written before precision policies (no default_precision, calibration null)."""
    b = tmp_path / "old"
    shutil.copytree(flex_bundle, b)
    m = _manifest(b)
    assert [st["default_precision"] for st in m["stages"]] == ["fp32"] * 3 and m["calibration"] is None
    for st in m["stages"]:
        del st["default_precision"]
    (b / "manifest.json").write_text(json.dumps(m))
    jsonschema.validate(m, schema())
    assert Pipeline.from_bundle(b).runner.precisions == ["fp32"] * 3
    assert Pipeline.from_bundle(b, precision="fp32:stages=1").runner.precisions == ["fp32"] * 3


# ---------------------------------------------------------------- user errors
@pytest.mark.parametrize("args,msg", [
    (["--precision", "int9"], "unknown precision 'int9'"),
    (["--precision", "int8:stages=1"], "names stage 1, but the bundle has stages 0..0"),
    (["--precision", "int8:stages=0,fp16:stages=0"], "assigns stage 0 twice"),
    (["--extra-precisions", "fp12"], "unknown precision 'fp12'"),
    (["--precision", "int8", "--quant-exclude", "blocks.99"], "--quant-exclude: 'blocks.99' matches no layer"),
    (["--precision", "int8", "--quant-include", "dumbbell_blocks.*.nope"], "matches no layer"),
    (["--precision", "int8", "--quant-include", "x_embedder"], "'x_embedder' holds no linear layer"),
    (["--precision", "fp16", "--fp32-islands", "layernorm,attn_typo"], "--fp32-islands: 'attn_typo' matches no layer"),
    (["--precision", "int8-static", "--calib", "{tmp}/missing"], "no calibration set at"),
    (["--precision", "int8-static", "--calib-method", "mse"], "unknown calibration method 'mse'"),
    (["--precision", "int8", "--calib-images", "0"], "images must be at least 1"),
    (["--backend", "tensorrt"], "TensorRT is not installed"),
    (["--precision", "int8-dynamic", "--backend", "onnx", "--error-tol", "int8=x"], "is not PRECISION=NUMBER"),
    (["--onnxsim"], "--onnxsim is part of --optimize"),
    (["--optimize", "--optimize-level", "all"], "unknown optimisation level 'all'"),
])
def test_convert_user_errors(ref_ckpt, tmp_path, args, msg, capsys):
    """In-process (the CLI's own main) to keep the suite fast; the subprocess path is covered above."""
    from flexdit_export.cli import main
    out = tmp_path / "b"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    rc = main(["convert", str(ref_ckpt), "-o", str(out), "--num-heads", "4", "--schedule", "0:2", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("flexdit-export convert: error:") and msg in last, err
    assert sorted(x.name for x in tmp_path.iterdir()) == []  # no bundle, no calibration set, no temp dirs


def test_convert_shows_progress_through_long_phases(ref_ckpt, tmp_path):
    """A capture chunk reports its sampling steps (the held-out capture was silent for minutes),
    and every builder says what it starts."""
    p = run_cli("flexdit-export", "convert", ref_ckpt, "-o", tmp_path / "b", "--num-heads", "4", "--schedule", "0:2",
                "--precision", "fp16", "--calib-steps", "20", "--calib-images", "2", "--calib-holdout-images", "2")
    lines = p.stderr.splitlines()
    for split in ("calib", "holdout"):
        steps = [ln for ln in lines if ln.startswith(f"calibration capture ({split}): images 1-2 of 2: step ")]
        assert [ln.rsplit(" ", 1)[1] for ln in steps] == [f"{k}/20" for k in range(2, 20, 2)], lines
    assert lines.index("stage 0: building onnx fp32 ...") < lines.index("stage 0: building onnx fp16 ...")


def test_a_failed_quality_gate_publishes_nothing(ref_ckpt, tmp_path):
    out = tmp_path / "b"
    p = run_cli("flexdit-export", "convert", ref_ckpt, "-o", out, "--num-heads", "4", "--schedule", "0:2",
                "--precision", "int8", "--error-tol", "int8-dynamic=1e-6", "--calib-steps", "4",
                "--calib-images", "2", "--calib-holdout-images", "2", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "stage 0 int8-dynamic graph fails its quality gate: relative RMS error" in p.stderr.strip().splitlines()[-1]
    left = sorted(x.name for x in tmp_path.iterdir())
    assert left == ["b.calib"]  # only the (complete, reusable) calibration set; no bundle, no temp dir
    CalibSet.open(tmp_path / "b.calib")


def test_derived_graphs_need_their_fp32_source(quant_bundle, tmp_path):
    """A tampered derived graph is caught by the checksums like any other file."""
    b = tmp_path / "copy"
    shutil.copytree(quant_bundle, b)
    st = _manifest(b)["stages"][1]
    f = b / _art(st, "fp16")["path"]
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(b)


def test_quantised_shared_graphs_are_used_and_bit_identical(quant_bundle):
    """Shared graphs of every precision the compiler could make exact (it checks each at the
    level the runtime runs that precision at: basic for fp32/fp16, all for int8): the runtime
    opens them and samples exactly what the per-stage sessions give."""
    from flexdit_runtime import RuntimeSettings

    m = _manifest(quant_bundle)
    graphs = {g["precision"]: g for g in m.get("shared_graphs", [])}
    assert {"fp32", "int8-dynamic"} <= set(graphs), sorted(graphs)
    assert graphs["fp32"]["verified"]["graph_optimization"] == "basic"
    assert graphs["int8-dynamic"]["verified"]["graph_optimization"] == "all"
    for prec, g in graphs.items():
        a = Pipeline.from_bundle(quant_bundle, precision=prec, threads=1)
        b = Pipeline.from_bundle(quant_bundle, precision=prec, settings=RuntimeSettings(threads=1, shared_graphs=False))
        used = [d.get("shared_graph") for d in a.runner.describe()]
        assert used.count(g["path"]) == len(g["stages"]), (prec, used)
        kw = dict(steps=8, sampler="ddim", cfg_scale=3.0, seed=5)
        assert np.array_equal(a([1, 2, 3], **kw).samples, b([1, 2, 3], **kw).samples), prec


def test_quantisable_op_types_are_onnx_runtimes():
    """--quant-ops is checked against a fixed list (importing onnxruntime while the plan is checked
    would leave its session file in $TMPDIR): every name on it must be one the installed ONNX
    Runtime's quantisers handle (a newer one may handle more; the list is its 1.32 snapshot)."""
    from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry, QLinearOpsRegistry

    from flexdit_export.quantize import QUANTISABLE_OP_TYPES

    assert QUANTISABLE_OP_TYPES <= {"Gemm", *IntegerOpsRegistry, *QDQRegistry, *QLinearOpsRegistry}
    assert {"MatMul", "Gemm", "Conv"} <= QUANTISABLE_OP_TYPES
