"""The compiler's shape: options -> plan (all checks, nothing written) -> builders keyed by
(backend, precision) -> manifest, with quality gates as plug-ins."""

import dataclasses
import json

import pytest

from flexdit_bundle.precision import PRECISIONS
from flexdit_export.builders import REGISTRY, Builder, builder_for
from flexdit_export.convert import ConvertOptions, convert
from flexdit_export.errors import UserError
from flexdit_export.plan import resolve_plan
from flexdit_export.quality_gates import QualityGate, load_gate


def test_registry_covers_every_backend_and_precision():
    assert {p for b, p in REGISTRY if b == "onnx"} == set(PRECISIONS)
    assert {p for b, p in REGISTRY if b == "tensorrt"} == set(PRECISIONS) - {"int8-dynamic"}
    assert ("torchscript", "fp32") in REGISTRY
    for (backend, precision), cls in REGISTRY.items():
        assert issubclass(cls, Builder) and cls().key == (backend, precision)
    with pytest.raises(UserError, match="no builder for precision fp16 on torchscript"):
        builder_for("torchscript", "fp16")


def test_plan_resolves_once_and_writes_nothing(ref_ckpt, tmp_path):
    opts = ConvertOptions(schedule="600:2,0:dense", num_heads=4, formats=("onnx", "torchscript"),
                          precision="int8:stages=0", extra_precisions=("fp16",), calib_settings={"images": 2})
    plan = resolve_plan(ref_ckpt, tmp_path / "b", opts)
    assert plan.builds[0] == (("onnx", "fp32"), ("torchscript", "fp32"), ("onnx", "fp16"), ("onnx", "int8-dynamic"))
    assert plan.builds[1] == (("onnx", "fp32"), ("torchscript", "fp32"), ("onnx", "fp16"))
    assert dict(plan.policy) == {0: "int8-dynamic", 1: "fp32"}
    assert plan.calibration.existing is None and plan.calibration.settings.images == 2
    assert plan.calibration.target == tmp_path / "b.calib"
    assert plan.sampling_defaults["sampler"] == "ddpm" and plan.quant.exclude == ("*.merged_layer2",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.batch = 4
    with pytest.raises(TypeError):
        plan.policy[0] = "fp32"
    assert list(tmp_path.iterdir()) == []
    fp32 = resolve_plan(ref_ckpt, tmp_path / "b", ConvertOptions(schedule="0:2", num_heads=4))
    assert fp32.calibration is None and fp32.builds[0] == (("onnx", "fp32"),)


class RecordingGate:
    name = "recording"

    def __init__(self, passed=True, refuse=False):
        self.passed, self.refuse, self.seen = passed, refuse, []

    def check_model(self, cfg):
        if self.refuse:
            raise UserError(f"the recording gate cannot judge {cfg.name}")

    def run(self, bundle, *, seed, log):
        first = bundle.stages[0].artifacts[0].path
        self.seen.append((bundle.stages[0].id, seed, (bundle.root / first).is_file()))
        return {"passed": self.passed, "verdict": "passed" if self.passed else "FAILED (on purpose)", "seen": 1}


def test_quality_gates_are_plug_ins(ref_ckpt, tmp_path):
    assert isinstance(RecordingGate(), QualityGate)
    opts = ConvertOptions(schedule="0:2", num_heads=4, seed=5)
    gate = RecordingGate()
    out = convert(ref_ckpt, tmp_path / "ok", opts, log=lambda m: None, gates=[gate])
    assert gate.seen == [(0, 5, True)]  # it judged the finished bundle before it was published
    assert json.loads((out / "manifest.json").read_text())["quality"] == {"passed": True, "verdict": "passed",
                                                                          "seen": 1}
    with pytest.raises(UserError, match="fails the end-to-end quality gate: FAILED \\(on purpose\\)"):
        convert(ref_ckpt, tmp_path / "bad", opts, log=lambda m: None, gates=[RecordingGate(passed=False)])
    refusing = RecordingGate(refuse=True)
    with pytest.raises(UserError, match="cannot judge"):
        convert(ref_ckpt, tmp_path / "refused", opts, log=lambda m: None, gates=[refusing])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"] and refusing.seen == []


def test_gate_loading_by_name():
    gate = load_gate("fashion-mnist", per_class=3)
    assert gate.name == "fashion-mnist" and isinstance(gate, QualityGate)
    with pytest.raises(UserError, match="at least 1 image per class"):
        load_gate("fashion-mnist", per_class=-1)
    with pytest.raises(UserError, match="needs the optional package no_such_gate_pkg"):
        load_gate("no_such_gate_pkg.gates:Gate")


def test_finalize_runs_once_before_the_gates(ref_ckpt, tmp_path, monkeypatch):
    """Weight sharing, shared graphs and validation run once, and the gates judge their result:
    the bundle that is published."""
    from flexdit_bundle.manifest import Bundle
    from flexdit_export import finalize

    calls = []

    def counted(name):
        real = getattr(finalize, name)
        return lambda *a, **k: calls.append(name) or real(*a, **k)

    for name in ("share_weights", "add_shared_graphs", "validate_manifest"):
        monkeypatch.setattr(finalize, name, counted(name))

    class ManifestGate(RecordingGate):
        def run(self, bundle, *, seed, log):
            self.seen.append(bundle.manifest)
            return {"passed": True, "verdict": "passed"}

    gate = ManifestGate()
    opts = ConvertOptions(schedule="600:2,300:3,0:dense", num_heads=4)
    out = convert(ref_ckpt, tmp_path / "b", opts, log=lambda m: None, gates=[gate])
    assert calls == ["share_weights", "add_shared_graphs", "validate_manifest"]
    published = json.loads((out / "manifest.json").read_text())
    assert published["weights"][0]["id"] == "fp32" and published["shared_graphs"][0]["stages"] == [0, 1]
    assert published["quality"] == {"passed": True, "verdict": "passed"}
    unjudged = Bundle(out, {k: v for k, v in published.items() if k != "quality"})
    assert gate.seen == [unjudged.manifest]
    assert list(published)[-2:] == ["quality", "shared_graphs"]  # where the manifests written before have it


def test_builders_hand_over_their_weight_files(ref_ckpt, tmp_path, monkeypatch):
    """A weight file a builder wrote itself is handed over by its ``weight_files``, not on its artifact."""
    from flexdit_export.builders import REGISTRY, BuildContext, onnx_fp32
    from flexdit_export.bundle import BundleWriter
    from flexdit_export.components import stage_component
    from flexdit_export.convert import build_component

    entry = {"id": "extra", "path": "stages/extra.bin", "sha256": "0" * 64, "bytes": 0, "alignment": 64, "tensors": []}

    class WithFile(onnx_fp32.OnnxFp32):
        def weight_files(self, comp, ctx):
            return [entry]

    monkeypatch.setitem(REGISTRY, ("onnx", "fp32"), WithFile)
    plan = resolve_plan(ref_ckpt, tmp_path / "b", ConvertOptions(schedule="0:2", num_heads=4))
    with pytest.raises(RuntimeError, match="not published"), BundleWriter(tmp_path / "b") as w:
        ctx = BuildContext(plan=plan, writer=w, work=w.scratch(), calib=None, log=lambda m: None)
        artifacts, parity, files = build_component(stage_component(plan, 0), plan.builds[0], ctx)
        raise RuntimeError("not published")
    assert files == {"extra": entry} and list(parity) == ["onnx/fp32"] and "_weight_file" not in artifacts[0]
    assert list(tmp_path.iterdir()) == []
