"""The SD-VAE decoder rebuilt in plain PyTorch against diffusers' AutoencoderKL, and a bundle
that carries it."""

import json

import pytest
import torch

from conftest import run_cli
from flexdit_export.errors import UserError
from flexdit_export.vae import load_vae_decoder

import diffusers  # noqa: E402  the independent oracle for the VAE decoder (a dev dependency)


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=8, sample_size=32)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # break symmetric inits
    out = tmp_path_factory.mktemp("vae") / "sd-vae-tiny"
    vae.eval().save_pretrained(out)
    return out, vae


def test_decoder_matches_diffusers(tiny_vae_dir):
    path, vae = tiny_vae_dir
    ours = load_vae_decoder(path)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref = vae.decode(z / vae.config.scaling_factor).sample
        got = ours(z)
    assert got.shape == (2, 3, 16, 16)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5


def test_legacy_attention_names_are_read(tiny_vae_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    path, vae = tiny_vae_dir
    sd = load_file(str(path / "diffusion_pytorch_model.safetensors"))
    legacy = {}
    for k, v in sd.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if ".attentions." in k and f".{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
        legacy[k] = v
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(legacy, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_vae_decoder(tmp_path)(z), load_vae_decoder(path)(z))


def test_vae_errors(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        load_vae_decoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(UserError, match="diffusion_pytorch_model"):
        load_vae_decoder(tmp_path)


def test_bundle_with_decoder_writes_decoded_images(tiny_vae_dir, tmp_path):
    from factories import random_model, save_state_dict
    from flexdit_export.model import ModelConfig
    vae_dir, _ = tiny_vae_dir
    cfg = ModelConfig(family="flexdit", hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=4,
                      num_classes=5, depth=3, num_poolingformer=1, num_dumbbell=1, dumbbell_group=[1, 0, 1, 0],
                      num_normal_block=0, semantic_size=2)
    ck = save_state_dict(random_model(cfg, scale=0.03), tmp_path / "m.pt")
    out = tmp_path / "bundle"
    run_cli("flexdit-export", "convert", ck, "-o", out, "--vae", vae_dir, "--num-heads", "2")
    s = json.loads(run_cli("flexdit-export", "inspect", out, "--json").stdout)
    assert s["decoder"]["kind"] == "sd-vae" and s["decoder"]["parity"]["onnx/fp32"]["max_rel"] < 1e-4
    assert s["output"]["space"] == "decoded"
    prompts = tmp_path / "p.txt"
    prompts.write_text("1\n4\n")
    run_cli("flexdit-run", prompts, "--bundle", out, "-o", tmp_path / "img", "--steps", "3")
    from PIL import Image
    assert Image.open(tmp_path / "img" / "000_1.png").size == (16, 16)
    r = json.loads(run_cli("flexdit-export", "verify", out, "--ckpt", ck, "--json", "--steps", "3").stdout)
    assert r["ok"] and r["trajectory"]["psnr_db"] > 40
