"""Every checkpoint format, layout inference, DiT -> FlexDiT initialisation, safe loading."""

import os

import pytest
import torch

from factories import TINY_DIT, random_model, save_reference_training, save_state_dict
from flexdit_export.checkpoints import init_flexdit_from_dit, load_checkpoint, parse_layout, save_checkpoint
from flexdit_export.errors import UserError
from flexdit_export.model import ModelConfig


def _same_weights(sd_a, sd_b):
    assert sd_a.keys() == sd_b.keys()
    return all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_reference_training_format_uses_ema_and_args(tmp_path, tiny_flex_model):
    path = save_reference_training(tiny_flex_model, tmp_path / "ck.pt")
    ck = load_checkpoint(path)
    assert ck.source_format == "reference-training(ema)"
    assert _same_weights(ck.state_dict, tiny_flex_model.state_dict())
    c = ck.config
    assert (c.num_poolingformer, c.num_dumbbell, c.dumbbell_group, c.num_normal_block) == (1, 2, [1, 1, 1, 1], 1)
    assert (c.hidden_size, c.patch_size, c.input_size, c.num_classes, c.learn_sigma) == (64, 2, 16, 10, True)
    assert c.num_heads == 1  # C=64 and no known size: head dim 64, the DiT convention
    assert c.semantic_size == 3


def test_reference_args_give_the_heads_of_the_named_size(tmp_path):
    cfg = ModelConfig(family="flexdit", hidden_size=384, num_heads=6, depth=6, patch_size=4, input_size=16,
                      num_classes=4, num_poolingformer=1, num_dumbbell=1, dumbbell_group=[1, 1, 1, 1],
                      num_normal_block=1, semantic_size=2)
    path = save_reference_training(random_model(cfg), tmp_path / "s.pt", model_name="DiT-S/4")
    assert load_checkpoint(path).config.num_heads == 6


def test_bare_flexdit_state_dict_and_heads_override(tmp_path, tiny_flex_model):
    ck = load_checkpoint(save_state_dict(tiny_flex_model, tmp_path / "sd.pt"), num_heads=4)
    assert ck.config.family == "flexdit" and ck.config.num_heads == 4
    model = ck.build()
    x, t, y = torch.randn(1, 4, 16, 16), torch.tensor([10.0]), torch.tensor([2])
    with torch.no_grad():
        assert torch.equal(model(x, t, y, 3), tiny_flex_model(x, t, y, 3))


def test_official_dit_layout(tmp_path):
    m = random_model(TINY_DIT)
    sd = {k: v for k, v in m.state_dict().items()}
    assert any(k.startswith("blocks.0.attn.qkv") for k in sd)
    ck = load_checkpoint(save_state_dict(m, tmp_path / "DiT-XL-2-256x256.pt"), num_heads=4)
    assert ck.config.family == "dit" and ck.config.depth == 4 and ck.config.num_tokens == 64


def test_dit_xl_shapes_infer_sixteen_heads(tmp_path):
    cfg = ModelConfig(family="dit", hidden_size=1152, num_heads=16, depth=1, patch_size=2, input_size=4, num_classes=3)
    with torch.device("meta"):
        from flexdit_export.model import build_model
        sd = build_model(cfg).state_dict()
    from flexdit_export.checkpoints import infer_config
    assert infer_config(sd).num_heads == 16


def test_project_format_round_trip(tmp_path, tiny_flex_model):
    out = save_checkpoint(tiny_flex_model, tmp_path / "proj", class_names=[f"c{i}" for i in range(10)],
                          extra={"sampling": {"steps": 50}, "schedule": "500:2,0:dense"})
    ck = load_checkpoint(out)
    assert ck.source_format == "flexdit-checkpoint" and ck.class_names[3] == "c3"
    assert ck.config == tiny_flex_model.cfg and ck.sampling_defaults == {"steps": 50}
    assert ck.trained_schedule == "500:2,0:dense"
    assert _same_weights(ck.state_dict, tiny_flex_model.state_dict())
    # the safetensors file alone is readable too (layout from keys)
    assert load_checkpoint(out / "model.safetensors").config.depth == tiny_flex_model.cfg.depth


def test_init_from_dit_mapping():
    dit = random_model(TINY_DIT, seed=5)
    sd = dit.state_dict()
    cfg, flex_sd = init_flexdit_from_dit(sd, dit.cfg, "1/1x1,1,1,0/0", semantic_size=4)
    C = 64
    assert cfg.block_order() == ["poolingformer_blocks.0", "dumbbell_blocks.0.token_merge_blocks.0",
                                 "dumbbell_blocks.0.semantic_blocks.0", "dumbbell_blocks.0.token_recover_blocks.0"]
    assert torch.equal(flex_sd["poolingformer_blocks.0.attn.v.weight"], sd["blocks.0.attn.qkv.weight"][2 * C:])
    assert torch.equal(flex_sd["dumbbell_blocks.0.token_merge_blocks.0.attn.q.bias"], sd["blocks.1.attn.qkv.bias"][:C])
    assert torch.equal(flex_sd["dumbbell_blocks.0.token_merge_blocks.0.attn.kv.weight"], sd["blocks.1.attn.qkv.weight"][C:])
    assert torch.equal(flex_sd["dumbbell_blocks.0.semantic_blocks.0.attn.qkv.weight"], sd["blocks.2.attn.qkv.weight"])
    assert torch.equal(flex_sd["dumbbell_blocks.0.token_recover_blocks.0.mlp.fc2.weight"], sd["blocks.3.mlp.fc2.weight"])
    assert torch.equal(flex_sd["dumbbell_blocks.0.token_recover_blocks.0.merged_layer2.weight"], torch.eye(C))
    assert torch.count_nonzero(flex_sd["dumbbell_blocks.0.token_recover_blocks.0.merged_layer1.weight"]) == 0
    from flexdit_export.model import build_model
    build_model(cfg).load_state_dict(flex_sd, strict=True)


def test_layout_presets_and_errors():
    assert parse_layout("512") == (2, 4, [1, 3, 1, 1], 2)
    assert parse_layout("1/4x1,3,1,1/3") == (1, 4, [1, 3, 1, 1], 3)
    with pytest.raises(UserError, match="layout"):
        parse_layout("4x4")
    with pytest.raises(UserError, match="depth"):
        init_flexdit_from_dit(random_model(TINY_DIT).state_dict(), random_model(TINY_DIT).cfg, "512")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/flexdit-pwned",))


def test_pickled_code_is_never_executed(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"ema": {"x": torch.zeros(1)}, "payload": _Evil()}, path)
    if os.path.exists("/tmp/flexdit-pwned"):
        os.remove("/tmp/flexdit-pwned")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(path)
    assert not os.path.exists("/tmp/flexdit-pwned")


@pytest.mark.parametrize("content,match", [
    (b"not a zip or pickle", "cannot read checkpoint"),
    (None, "not a DiT/FlexDiT checkpoint"),
])
def test_bad_checkpoints(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    if content is None:  # a valid state_dict of another architecture (a ResNet-ish conv net)
        torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match=match):
        load_checkpoint(path)


def test_truncated_checkpoint(tmp_path, tiny_flex_model):
    path = save_state_dict(tiny_flex_model, tmp_path / "full.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(path)


def test_checkpoint_with_inconsistent_shapes(tmp_path, tiny_flex_model):
    sd = dict(tiny_flex_model.state_dict())
    sd["normal_blocks.0.mlp.fc1.weight"] = torch.zeros(10, 64)
    ck = load_checkpoint(save_state_dict_dict(sd, tmp_path / "x.pt"), num_heads=4)
    with pytest.raises(UserError):
        ck.build()


def save_state_dict_dict(sd, path):
    torch.save(sd, path)
    return path


def test_missing_file():
    with pytest.raises(UserError, match="not found"):
        load_checkpoint("/nonexistent/ck.pt")
