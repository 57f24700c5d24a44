"""Component I/O is declared once (flexdit_export.component_io): the exported graphs, the
manifest's tensor entries, the parity inputs and verify all take it from there, so a change to
a declaration shows up in every one of them, and a new component kind is one more declaration."""

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import flexdit_bundle
from factories import TINY_FLEX
from flexdit_bundle.spec import Stage
from flexdit_export import component_io
from flexdit_export.component_io import ComponentIO, Integers, Normal, TensorSpec
from flexdit_export.components import decoder_component, decoder_entry, stage_component, stage_entry
from flexdit_export.convert import ConvertOptions, convert
from flexdit_export.model import ModelConfig
from flexdit_export.plan import resolve_plan
from flexdit_export.vae import VAEDecoder


def _renamed(declare, names):
    """A declaration like ``declare``'s with tensors renamed by ``names`` (old -> new)."""
    def declare_renamed(*args, **kw):
        io = declare(*args, **kw)
        return ComponentIO(*(tuple(dataclasses.replace(s, name=names.get(s.name, s.name)) for s in specs)
                             for specs in (io.inputs, io.outputs)))
    return declare_renamed


def _json(entry):
    return entry.to_json() if hasattr(entry, "to_json") else entry  # a typed manifest node or its dict


def _graph_io(path):
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    dtype = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64"}

    def entries(values):
        return [{"name": v.name, "shape": [d.dim_value for d in v.type.tensor_type.shape.dim],
                 "dtype": dtype[v.type.tensor_type.elem_type]} for v in values]
    return {"inputs": entries(g.input), "outputs": entries(g.output)}


def test_stage_components_draw_and_describe_what_is_declared(ref_ckpt, tmp_path):
    plan = resolve_plan(ref_ckpt, tmp_path / "b", ConvertOptions(schedule="600:2,0:dense", num_heads=4, batch=3))
    for sid, st in enumerate(plan.stages):
        io = component_io.stage_io(plan.cfg, st, 3)
        comp = stage_component(plan, sid)
        assert (comp.input_names, comp.output_names) == (("x", "t", "y"), ("out",)) == (io.input_names, io.output_names)
        drawn = [comp.make_inputs(i) for i in range(3)]
        again = io.sampler(plan.seed * 1000 + sid)  # the component's draws are the declaration's, seeded per component
        for inputs in drawn:
            assert all(torch.equal(a, b) for a, b in zip(inputs, again(0)))
            assert [(list(v.shape), str(v.dtype)[6:]) for v in inputs] == [(e["shape"], e["dtype"]) for e in
                                                                           io.manifest_entries()["inputs"]]
        t = torch.cat([d[1] for d in drawn])
        assert st.t_min <= t.min() and t.max() <= st.t_max and t.unique().numel() > 1
        with torch.no_grad():
            out = comp.module(*drawn[0])
        assert list(out.shape) == io.manifest_entries()["outputs"][0]["shape"]  # the declared output is what it returns
        entry = stage_entry(plan, sid, [], {})
        assert {k: entry[k] for k in ("inputs", "outputs")} == io.manifest_entries()
        assert io.mismatch(entry) is None and io.mismatch(Stage.from_json(entry)) is None
        specs = io.manifest_specs()  # the contract's typed tensor entries, in the same JSON
        assert all(type(t) is flexdit_bundle.TensorSpec for t in specs["inputs"] + specs["outputs"])
        assert {k: [t.to_json() for t in v] for k, v in specs.items()} == io.manifest_entries()


def test_decoder_component_draws_and_describes_what_is_declared(monkeypatch):
    cfg = ModelConfig(**TINY_FLEX)
    vae = VAEDecoder({"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
                      "scaling_factor": 0.13025}).eval()
    plan = SimpleNamespace(cfg=cfg, decoder=vae, seed=3)
    io = component_io.decoder_io(cfg, vae)
    comp = decoder_component(plan)
    assert (comp.input_names, comp.output_names) == (("latent",), ("image",))
    (latent,) = comp.make_inputs(0)
    assert torch.equal(latent, io.sampler(plan.seed + 77)(0)[0])
    assert list(latent.shape) == [1, cfg.in_channels, cfg.input_size, cfg.input_size]
    with torch.no_grad():
        assert list(vae(latent).shape) == list(io.outputs[0].shape) == [1, 3, 2 * cfg.input_size, 2 * cfg.input_size]
    entry = decoder_entry(plan, [], {})
    assert {k: entry[k] for k in ("inputs", "outputs")} == io.manifest_entries()
    monkeypatch.setattr(component_io, "decoder_io", _renamed(component_io.decoder_io, {"image": "rgb"}))
    assert decoder_component(plan).output_names == ("rgb",) and decoder_entry(plan, [], {})["outputs"][0]["name"] == "rgb"


def test_a_changed_stage_declaration_shows_in_export_manifest_and_verify(ref_ckpt, tmp_path, monkeypatch):
    """Rename a stage's label input and output in the declaration alone: the ONNX graph, the
    manifest and verify's feeds all follow; verify against the unchanged declaration refuses the
    bundle by name instead of feeding the graph tensors it does not take."""
    from flexdit_export.verify import verify
    from flexdit_runtime import load_bundle

    monkeypatch.setattr(component_io, "stage_io", _renamed(component_io.stage_io, {"y": "label", "out": "eps"}))
    out = convert(ref_ckpt, tmp_path / "b", ConvertOptions(schedule="0:2", num_heads=4), log=lambda m: None)
    b = load_bundle(out)
    st = b.stages[0]
    declared = component_io.stage_io(ModelConfig(**b.manifest.model.config.to_json()), SimpleNamespace(t_min=0, t_max=999),
                                     st.batch).manifest_entries()
    assert [e["name"] for e in declared["inputs"]] == ["x", "t", "label"] and declared["outputs"][0]["name"] == "eps"
    assert {k: [_json(e) for e in getattr(st, k)] for k in ("inputs", "outputs")} == declared
    assert _graph_io(b.path(b.artifact(st, "onnx", "fp32"))) == declared
    r = verify(out, ref_ckpt, steps=2, num_images=2, log=lambda m: None)
    assert r["ok"] and r["stages"][0]["ok"] and r["stages"][0]["max_rel"] < 1e-4

    monkeypatch.undo()
    lines = []
    r = verify(out, ref_ckpt, steps=2, num_images=2, log=lines.append)
    assert not r["ok"] and not r["stages"][0]["ok"]
    assert r["stages"][0]["why"] == ("inputs x float32[2, 4, 16, 16], t float32[2], label int64[2] in the bundle, "
                                     "x float32[2, 4, 16, 16], t float32[2], y int64[2] declared for the checkpoint")
    assert "stage 0: FAIL: inputs x float32" in "\n".join(lines)


class _TinyTextEncoder(nn.Module):
    def __init__(self, vocab, width):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)

    def forward(self, input_ids, attention_mask):
        return self.emb(input_ids) * attention_mask.unsqueeze(-1).float()


def test_a_text_encoder_is_one_more_declaration(tmp_path):
    """Token ids and an attention mask in, embeddings out: declared as specs, the generic
    machinery exports it under those names and shapes, describes it and checks its parity."""
    from flexdit_export.export import export_onnx, parity_onnx

    B, L, vocab, width = 2, 7, 50, 16
    io = ComponentIO(inputs=(TensorSpec("input_ids", (B, L), "int64", Integers(0, vocab - 1)),
                             TensorSpec("attention_mask", (B, L), "int64", Integers(0, 1))),
                     outputs=(TensorSpec("embeddings", (B, L, width)),))
    torch.manual_seed(0)
    module = _TinyTextEncoder(vocab, width).eval()
    path = tmp_path / "text_encoder.onnx"
    export_onnx(module, io.sample(torch.Generator().manual_seed(0)), path, io.input_names, io.output_names)
    assert _graph_io(path) == io.manifest_entries() == {
        "inputs": [{"name": "input_ids", "shape": [B, L], "dtype": "int64"},
                   {"name": "attention_mask", "shape": [B, L], "dtype": "int64"}],
        "outputs": [{"name": "embeddings", "shape": [B, L, width], "dtype": "float32"}]}
    stats = parity_onnx(path, module, io.sampler(1), io.input_names, trials=2)
    assert stats["finite"] and stats["max_rel"] < 1e-6 and stats["samples"] == 2 * B


def test_tensor_specs_refuse_what_the_format_cannot_say():
    with pytest.raises(ValueError, match="dtype 'float64'"):
        TensorSpec("x", (1,), "float64")
    with pytest.raises(ValueError, match="tensor out declares no way to draw a sample"):
        TensorSpec("out", (1,)).sample(torch.Generator())
    assert TensorSpec("x", np.array([2, 3]), draw=Normal()).shape == (2, 3)
    io = ComponentIO((TensorSpec("x", (2,), draw=Normal()),), (TensorSpec("out", (2,)),))
    assert io.mismatch({"inputs": [{"name": "x", "shape": [2], "dtype": "float32"}], "outputs": []}) == \
        "outputs none in the bundle, out float32[2] declared for the checkpoint"
