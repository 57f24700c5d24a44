"""A bundle with every precision (session-scoped), shared by test_quantize.py and
test_tensorrt.py through ``pytest_plugins`` so it is built once. int8-dynamic is also built for
every stage, so the two sparse stages' int8 graphs can share one graph (checked at level all)."""

import pytest

from conftest import run_cli

POLICY = "int8:stages=0,fp16:stages=1,int8-static:stages=2"


@pytest.fixture(scope="session")
def quant_bundle(tmp_path_factory, ref_ckpt):
    out = tmp_path_factory.mktemp("quant") / "q"
    run_cli("flexdit-export", "convert", ref_ckpt, "-o", out, "--schedule", "600:2,300:3,0:dense", "--num-heads", "4",
            "--optimize", "--onnxsim", "--precision", POLICY, "--extra-precisions", "fp8,int8-dynamic",
            "--calib-steps", "10", "--calib-images", "8", "--calib-holdout-images", "4",
            "--quant-exclude", "default,final_layer")
    return out
