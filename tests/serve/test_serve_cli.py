"""The flexdit-serve command: one line and exit 2 for every bad input (before Ray starts), and
the one-command start of the README: serve, answer, stop on SIGTERM."""

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from conftest import run_cli
from test_serve import free_port


def test_bad_inputs_one_line_exit_2(serve_bundle, tmp_path):
    bad, gap = tmp_path / "tampered", tmp_path / "gap"
    shutil.copytree(serve_bundle, bad)
    shutil.copytree(serve_bundle, gap)
    (gap / "manifest.json").write_text((gap / "manifest.json").read_text().replace('"t_min": 0', '"t_min": 1', 1))
    weights = next((bad / "stages").glob("weights.*.bin"))
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # flipped, whatever the last byte was
    cases = [
        ([tmp_path / "missing"], "bundle directory not found"),
        ([bad], "checksum mismatch for stages/weights."),
        ([gap], "stages do not cover timesteps"),
        ([serve_bundle, "--batching", "fastest"], "invalid choice: 'fastest'"),
        ([serve_bundle, "--port", "0"], "--port must be in 1..65535"),
        ([serve_bundle, "--timeout", "nan"], "timeout_s must be a finite positive number"),
        ([serve_bundle, "--replicas", "0"], "--replicas must be an integer >= 1"),
        ([serve_bundle, "--detach"], "--detach needs --address"),
        ([serve_bundle, "--device", "cuda"], "--device cuda needs --gpus"),
        ([serve_bundle, "--device", "tpu"], "invalid choice: 'tpu'"),
    ]
    from flexdit_runtime.device import ort_cuda

    if ort_cuda():  # no usable CUDA provider here: refused like flexdit-run, before Ray starts
        cases.append(([serve_bundle, "--device", "cuda", "--gpus", "1"], "--device cuda: the bundle has no AOTI"))
    for args, needle in cases:
        start = time.monotonic()
        p = run_cli("flexdit-serve", *args, check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2, (args, p.stderr)
        assert len(lines) == 1 and lines[0].startswith("flexdit-serve: error: ") and needle in lines[0], (args, p.stderr)
        assert time.monotonic() - start < 30  # refused before any Ray cluster starts


def start_cli(bundle, tries: int = 3):
    """``flexdit-serve BUNDLE --port P`` until it is ready -> (process, url). Ray's own processes
    take free ports too, so a port picked a moment before may be gone: then pick another."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for _ in range(tries):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "flexdit_serve.cli", str(bundle), "--port", str(port),
                                 "--threads", "1", "--drain", "5"], stderr=subprocess.PIPE, text=True, env=env)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=5) as r:
                    if r.status == 200 and json.loads(r.read())["status"] == "ready":
                        return proc, url
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError, TimeoutError):
                pass
            if proc.poll() is not None:
                err = proc.stderr.read()
                assert proc.returncode == 2 and len(err.strip().splitlines()) == 1, err
                if "bind" in err:
                    break  # the port was taken: try another
                raise AssertionError(err)
            time.sleep(1)
        else:
            proc.kill()
            raise AssertionError("flexdit-serve never became ready")
    raise AssertionError(f"no free port in {tries} tries")


def test_one_command_serve_answer_and_stop(serve_bundle, tmp_path):
    proc, url = start_cli(serve_bundle)
    try:
        req = urllib.request.Request(f"{url}/v1/images", json.dumps({"prompts": [1], "seed": 4, "steps": 6}).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            served = base64.b64decode(json.loads(r.read())["images"][0]["png_base64"])
        (tmp_path / "p.txt").write_text("1\n")
        run_cli("flexdit-run", tmp_path / "p.txt", "--bundle", serve_bundle, "-o", tmp_path / "out", "--steps", 6, "--seed",
                4, "-q")
        assert served == next((tmp_path / "out").glob("000_*.png")).read_bytes()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            err = proc.communicate(timeout=120)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err
    assert "serving" in err and "shutting down" in err


def test_config_from_serve_run_arguments(serve_bundle):
    """``serve run flexdit_serve.app:build_app key=value ...`` passes strings; they are typed and
    checked like the command line's options."""
    from flexdit_serve.config import ConfigError, ServeConfig

    cfg = ServeConfig.from_dict({"bundle": str(serve_bundle), "replicas": "2", "threads": "1", "timeout_s": "30",
                                 "gpus": "0.5", "verify_checksums": "false", "batching": "request"})
    assert (cfg.replicas, cfg.threads, cfg.timeout_s, cfg.gpus, cfg.verify_checksums) == (2, 1, 30.0, 0.5, False)
    for bad, needle in [({"bundle": "b", "replicas": "two"}, "replicas='two' is not a valid value"),
                        ({"bundle": "b", "colour": "red"}, "unknown option(s) colour"),
                        ({"replicas": "1"}, "missing bundle=PATH"),
                        ({"bundle": "b", "batching": "eager"}, "unknown batching 'eager'"),
                        ({"bundle": "b", "gpus": "-1"}, "gpus must be a number >= 0")]:
        try:
            ServeConfig.from_dict(bad)
        except ConfigError as e:
            assert needle in str(e), (bad, str(e))
        else:
            raise AssertionError(f"{bad} was accepted")


UNREACHABLE = "ray://127.0.0.1:1"  # nothing listens there: Ray's client tries for ~30 s, then gives up
FAST_RAY_CLIENT = {"RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S": "1",  # Ray's own knobs (ray/util/client/worker.py):
                   "RAY_CLIENT_MAX_CONNECTION_TIMEOUT_S": "1"}  # 3 tries of 1 s instead of 5 + 10 + 15 s


def serve_cli(*args, timeout: float, env: dict | None = None):
    """flexdit-serve in a subprocess with Python's warnings left on (``run_cli`` turns them off,
    which would hide a warning Ray prints); TimeoutExpired if it outlives ``timeout``."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "PYTHONWARNINGS"}
    return subprocess.run([sys.executable, "-m", "flexdit_serve.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def one_error_line(p, needle: str) -> str:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "Warning" not in p.stderr, p.stderr
    assert len(lines) == 1 and lines[0].startswith("flexdit-serve: error: ") and needle in lines[0], p.stderr
    return lines[0][len("flexdit-serve: error: "):]


def trt_bundle(serve_bundle, tmp_path):
    """serve_bundle with (fake) TensorRT engines for every stage, as flexdit-export engines writes them."""
    from flexdit_export.tensorrt_build import engines_command

    b = tmp_path / "trt"
    shutil.copytree(serve_bundle, b)
    engines_command(b, None, tmp_path / "cache", env={"tensorrt_version": "10.3.0", "compute_capability": "8.9"},
                    build=lambda onnx, prec, timing, log: b"PLAN", log=lambda *a: None)
    return b


def test_precision_and_backend_refused_before_ray(serve_bundle, tmp_path):
    """--precision/--backend/--device are checked against the bundle before Ray is contacted, with
    or without --address, in flexdit-run's words. The address is unreachable: contacting it would
    take ~30 s (the subprocess timeout would end the test)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("1\n")
    cases = [
        (["--precision", "fp7"], "unknown precision 'fp7'"),
        (["--precision", "fp16"], "bundle has no onnx/fp16 artifact for stage 0"),
        (["--precision", "fp32:stages=0-7"], "names stage 3, but the bundle has stages 0..2"),
        (["--backend", "foo"], "argument --backend: invalid choice: 'foo'"),
        (["--backend", "tensorrt"], "bundle has no tensorrt artifact for stage 0"),
        (["--backend", "aoti"], "bundle has no aoti artifact for stage 0"),
        (["--backend", "openvino", "--precision", "fp16"], "the openvino backend runs fp32, bf16"),
        (["--backend", "auto", "--precision", "fp16"], "--backend auto: no installed engine runs stage 0 in fp16"),
        (["--device", "cpu", "--backend", "tensorrt"], "--device cpu: TensorRT engines run on a GPU only"),
        (["--device", "cuda", "--gpus", "1", "--backend", "openvino"], "--backend openvino runs on the CPU only"),
    ]
    for args, needle in cases:
        start = time.monotonic()
        msg = one_error_line(serve_cli(serve_bundle, *args, "--address", UNREACHABLE, timeout=20), needle)
        assert time.monotonic() - start < 15, args  # no connection attempt
        if "--gpus" in args:  # not a flexdit-run option
            continue
        # flexdit-run refuses the same options with the same line
        ref = run_cli("flexdit-run", prompts, "--bundle", serve_bundle, "-o", tmp_path / "out", *args, check=False)
        assert ref.returncode == 2 and ref.stderr.strip().splitlines()[-1].split(": error: ", 1)[1] == msg, ref.stderr
    # serving locally: the same refusals (--detach: refused right after them, should one be missed)
    for args, needle in cases[:3]:
        one_error_line(serve_cli(serve_bundle, *args, "--detach", timeout=20), needle)


def test_engines_missing_here_refused_only_when_serving_here(serve_bundle, tmp_path):
    """A bundle with TensorRT engines and no TensorRT on this machine: serving here is refused
    before Ray starts; a cluster's nodes may have TensorRT, so --address goes on to Ray."""
    from flexdit_runtime.tensorrt_engine import tensorrt_version

    b = trt_bundle(serve_bundle, tmp_path)
    if tensorrt_version() is None:
        one_error_line(serve_cli(b, "--backend", "tensorrt", "--detach", timeout=20), "TensorRT is not installed")
    p = serve_cli(b, "--backend", "tensorrt", "--precision", "fp32", "--address", UNREACHABLE, timeout=60,
                  env=FAST_RAY_CLIENT)
    one_error_line(p, f"cannot start or reach Ray at {UNREACHABLE}")
    one_error_line(serve_cli(b, "--backend", "tensorrt", "--precision", "fp16", "--address", UNREACHABLE, timeout=20),
                   "bundle has no tensorrt/fp16 artifact for stage 0")


def test_unreachable_cluster_one_line_no_ray_warning(serve_bundle):
    """Ray warns (UserWarning, with the source line) before it raises: only the error line shows."""
    p = serve_cli(serve_bundle, "--address", UNREACHABLE, timeout=60, env=FAST_RAY_CLIENT)
    one_error_line(p, f"cannot start or reach Ray at {UNREACHABLE}: ")
