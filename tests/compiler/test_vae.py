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


@pytest.fixture(scope="module")
def decoder_bound_bundle(tiny_vae_dir, tmp_path_factory):
    """A valid bundle whose VAE decoder reads its weights from a shared weight file (the format
    allows a decoder artifact to carry ``weights`` bindings, laid out as convert lays out stage
    weight files; convert itself keeps decoder weights inside the graph today)."""
    import os

    import onnx

    from factories import random_model, save_state_dict
    from flexdit_bundle.files import sha256_file
    from flexdit_bundle.manifest import load_bundle
    from flexdit_export.model import ModelConfig
    from flexdit_export.share_weights import ALIGNMENT, _dtypes, _raw_bytes, _set_external

    root = tmp_path_factory.mktemp("decbound")
    cfg = ModelConfig(family="flexdit", hidden_size=32, num_heads=2, patch_size=2, input_size=8, in_channels=4,
                      num_classes=5, depth=3, num_poolingformer=1, num_dumbbell=1, dumbbell_group=[1, 0, 1, 0],
                      num_normal_block=0, semantic_size=2)
    ck = save_state_dict(random_model(cfg, scale=0.03), root / "m.pt")
    out = root / "bundle"
    run_cli("flexdit-export", "convert", ck, "-o", out, "--vae", tiny_vae_dir[0], "--num-heads", "2")
    m = json.loads((out / "manifest.json").read_text())
    art = m["decoder"]["artifacts"][0]
    graph = onnx.load(str(out / art["path"]), load_external_data=True)
    rel, dtypes, tensors, bindings, off = "decoder/weights.dec.bin", _dtypes(), [], {}, 0
    with open(out / rel, "wb") as f:
        for t in graph.graph.initializer:
            raw = _raw_bytes(t)
            if t.data_type not in dtypes or len(raw) < 128:
                continue
            pad = (-off) % ALIGNMENT
            f.write(b"\0" * pad)
            off += pad
            bindings[t.name] = len(tensors)
            tensors.append({"offset": off, "bytes": len(raw), "dtype": dtypes[t.data_type],
                            "shape": [int(d) for d in t.dims]})
            f.write(raw)
            _set_external(t, os.path.basename(rel), off, len(raw))
            off += len(raw)
    onnx.save(graph, str(out / art["path"]))
    art.update(sha256=sha256_file(out / art["path"]), bytes=os.path.getsize(out / art["path"]),
               weights={"file": "dec", "bindings": bindings})
    m["weights"].append({"id": "dec", "path": rel, "sha256": sha256_file(out / rel), "bytes": os.path.getsize(out / rel),
                         "alignment": ALIGNMENT, "tensors": tensors})
    (out / "manifest.json").write_text(json.dumps(m, indent=1))
    load_bundle(out)  # schema and every checksum
    assert len(bindings) > 20
    return out


DECODER_OUTLIVES_MODEL = r"""
import gc, sys
import numpy as np
from flexdit_runtime import Model, RuntimeSettings
m = Model.from_bundle(sys.argv[1], RuntimeSettings(threads=1))
dec = m.decoder
z = np.random.default_rng(0).standard_normal((2, 4, 8, 8), dtype=np.float32)
before = dec(z)
del m
gc.collect()
junk = [np.full(1 << 16, 0.01, np.float32) for _ in range(256)]  # reuse whatever memory the model gave back
assert np.array_equal(dec(z), before)
print("ok")
"""


def test_decoder_on_shared_weights_keeps_them_alive(decoder_bound_bundle):
    """ONNX Runtime decodes on the shared buffers in place: a decoder kept after its Model is
    gone must still give the same bits (it used to decode from freed memory)."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", DECODER_OUTLIVES_MODEL, str(decoder_bound_bundle)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", (p.returncode, p.stderr[-2000:])


def test_modified_decoder_weight_file_is_refused_in_one_line(decoder_bound_bundle, tmp_path):
    """Same size, other bytes: the runtime's deferred sha256 check covers the decoder's weight
    file too (it used to be started but never awaited, and images came out wrong silently)."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(decoder_bound_bundle, bad)
    with open(bad / "decoder" / "weights.dec.bin", "r+b") as f:
        f.seek(1024)
        f.write(bytes(4096))
    prompts = tmp_path / "p.txt"
    prompts.write_text("1\n")
    p = run_cli("flexdit-run", prompts, "--bundle", bad, "-o", tmp_path / "img", "--steps", "2", check=False)
    assert p.returncode != 0 and "checksum mismatch for decoder/weights.dec.bin" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "img").exists() or not any((tmp_path / "img").iterdir())
