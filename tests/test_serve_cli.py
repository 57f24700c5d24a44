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
