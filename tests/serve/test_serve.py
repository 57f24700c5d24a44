"""flexdit-serve on a local Ray started by this module: the HTTP API, images equal to
flexdit-run's files, bad requests, back-pressure, time-outs, cancellation, metrics, and faults
(a replica killed mid-request, a bundle that fails verification, shutdown with requests in flight)."""

import base64
import http.client
import json
import shutil
import socket
import threading
import time

import pytest

from conftest import run_cli

import ray  # .[dev] installs .[serve]: these tests never skip
from ray import serve

from flexdit_serve.app import build_app
from flexdit_serve.config import ServeConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(tries: int = 5) -> int:
    """Serve's HTTP proxy on a free port. Ray's own processes also take free ports, so a port
    picked a moment before can be gone: pick again."""
    for attempt in range(tries):
        port = free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            return port
        except Exception:  # Ray wraps "Failed to bind to address" in its task errors
            serve.shutdown()
            if attempt == tries - 1:
                raise


@pytest.fixture(scope="module")
def cluster():
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=4)
    port = start_serve()
    yield port
    serve.shutdown()
    ray.shutdown()


def deploy(cluster, name, bundle, **options):
    cfg = ServeConfig(bundle=str(bundle), ray_cpus=0.5, threads=1, **options)
    serve.run(build_app(cfg), name=name, route_prefix=f"/{name}")
    return cluster


@pytest.fixture(scope="module")
def app(cluster, serve_bundle):
    deploy(cluster, "t", serve_bundle, drain_s=5)
    return cluster


def call(port, path, body=None, method=None, timeout=120, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = raw if raw is not None else (json.dumps(body) if body is not None else None)
    conn.request(method or ("POST" if data is not None else "GET"), path, data,
                 {"Content-Type": "application/json"} if data is not None else {})
    r = conn.getresponse()
    out = r.status, r.read(), dict(r.getheaders())
    conn.close()
    return out


def pngs(payload: bytes) -> list[bytes]:
    return [base64.b64decode(im["png_base64"]) for im in json.loads(payload)["images"]]


def test_images_equal_flexdit_run_files(app, serve_bundle, tmp_path):
    (tmp_path / "p.txt").write_text("3\n1\n")
    run_cli("flexdit-run", tmp_path / "p.txt", "--bundle", serve_bundle, "-o", tmp_path / "out", "--steps", 12,
            "--seed", 21, "-q")
    want = [f.read_bytes() for f in sorted((tmp_path / "out").glob("0*.png"))]
    results = {}

    def client(key, body):
        results[key] = call(app, "/t/v1/images", body)

    # other requests share the calls; the answer must not depend on them
    threads = [threading.Thread(target=client, args=(i, {"prompts": [i % 4], "seed": i, "steps": 9 + i}))
               for i in range(3)]
    threads.append(threading.Thread(target=client, args=("mine", {"prompts": [3, "1"], "seed": 21, "steps": 12,
                                                                  "id": "abc"})))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    status, payload, _ = results["mine"]
    assert status == 200, payload
    body = json.loads(payload)
    assert body["id"] == "abc" and [im["class_id"] for im in body["images"]] == [3, 1]
    assert pngs(payload) == want
    assert all(results[i][0] == 200 for i in range(3))
    status, png, headers = call(app, "/t/v1/images", {"prompts": [3], "seed": 21, "steps": 12, "response_format": "png"})
    assert status == 200 and headers["content-type"] == "image/png" and png == want[0]


def test_solver_requests_equal_flexdit_run_files(app, serve_bundle, tmp_path):
    """Requests of the few-step solvers and of DDPM share the server's stage calls; each answer is
    still the image flexdit-run draws with that solver alone."""
    (tmp_path / "p.txt").write_text("2\n")
    settings = [("dpmpp-2m", 6), ("unipc", 5), ("euler", 7), ("ddpm", 8)]
    want = {}
    for sampler, steps in settings:
        out = tmp_path / f"{sampler}-{steps}"
        run_cli("flexdit-run", tmp_path / "p.txt", "--bundle", serve_bundle, "-o", out, "--sampler", sampler,
                "--steps", steps, "--seed", 5, "-q")
        want[sampler] = next(out.glob("000_*.png")).read_bytes()
    results = {}

    def client(sampler, steps):
        results[sampler] = call(app, "/t/v1/images", {"prompts": [2], "seed": 5, "steps": steps, "sampler": sampler})

    threads = [threading.Thread(target=client, args=s) for s in settings]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for sampler, _ in settings:
        status, payload, _ = results[sampler]
        assert status == 200, payload
        assert pngs(payload) == [want[sampler]], sampler
    status, payload, _ = call(app, "/t/v1/images", {"prompts": [2], "sampler": "euler", "eta": 0.5})
    assert status == 400 and b"eta" in payload


def test_service_endpoints(app):
    assert call(app, "/t/healthz")[0] == 200
    status, body, _ = call(app, "/t/readyz")
    assert status == 200 and json.loads(body)["status"] == "ready"
    status, body, _ = call(app, "/t/v1/model")
    info = json.loads(body)
    assert status == 200 and len(info["stages"]) == 3 and info["batching"] == "stage"
    status, body, _ = call(app, "/t/openapi.json")
    assert status == 200 and "/v1/images" in json.loads(body)["paths"]
    assert call(app, "/t/docs")[0] == 200
    status, body, headers = call(app, "/t/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("flexdit_queue_depth", "flexdit_inflight_images", "flexdit_batch_fill_bucket", "flexdit_step_seconds",
                 "flexdit_images_total", "flexdit_images_per_second", "flexdit_request_seconds"):
        assert name in text, name


@pytest.mark.parametrize("body,status,needle", [
    (None, 422, "invalid request"),  # not JSON at all (raw below)
    ({"prompts": []}, 400, "no prompts given"),
    ({"prompts": "sneaker"}, 422, "prompts"),
    ({"prompts": [1], "seed": -1}, 400, "--seed must be at least 0, got -1"),
    ({"prompts": [1], "bogus": 1}, 422, "bogus"),
    ({"prompts": [1], "steps": 0}, 400, "--steps must be in 1..1000, got 0"),
    ({"prompts": ["no such class"]}, 400, "not a class id"),
    ({"prompts": [99999]}, 400, "outside"),
    ({"prompts": [1], "sampler": "heun"}, 400, "unknown sampler"),
    ({"prompts": [1], "cfg_scale": "nan"}, 400, "finite"),
    ({"prompts": [1, 2], "response_format": "png"}, 400, "one prompt"),
    ({"prompts": [1] * 17}, 400, "at most"),
])
def test_malformed_requests_get_one_clear_4xx(app, body, status, needle):
    got, payload, _ = call(app, "/t/v1/images", body, raw="{not json" if body is None else None)
    assert got == status, payload
    msg = json.loads(payload)["error"]
    assert needle in msg and "\n" not in msg and len(msg) <= 500


def test_backpressure_timeout_and_cancellation(cluster, serve_bundle):
    port = deploy(cluster, "bp", serve_bundle, max_inflight=1, max_queue=1, timeout_s=60)
    slow = {"prompts": [0], "steps": 1000, "seed": 1}
    results = []

    def client():
        t0 = time.monotonic()
        status, payload, headers = call(port, "/bp/v1/images", slow)
        results.append((status, time.monotonic() - t0, headers))

    threads = [threading.Thread(target=client) for _ in range(5)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    refused = [r for r in results if r[0] == 429]
    assert len(refused) >= 2, [r[0] for r in results]
    assert all(r[1] < 5 for r in refused), "a full queue must answer at once"
    assert all(r[2].get("retry-after") == "1" for r in refused)
    assert {r[0] for r in results} <= {200, 429}
    # a request that outlives its own time-out gets 504, wherever it is
    status, payload, _ = call(port, "/bp/v1/images", {**slow, "timeout_s": 0.3})
    assert status == 504 and "timed out" in json.loads(payload)["error"]
    # a client that goes away: its request is cancelled, not finished for nobody
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/bp/v1/images", json.dumps(slow), {"Content-Type": "application/json"})
    time.sleep(1.0)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = call(port, "/bp/metrics")[1].decode()
        if 'flexdit_requests_total{outcome="cancelled"} 1.0' in text:
            break
        time.sleep(0.5)
    assert 'flexdit_requests_total{outcome="cancelled"} 1.0' in text
    assert 'flexdit_requests_total{outcome="timedout"} 1.0' in text
    serve.delete("bp")


def _replica_actors(app_name):
    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app_name}#")]


def test_killed_replica_loses_no_request_silently(cluster, serve_bundle):
    port = deploy(cluster, "k", serve_bundle)
    out = {}

    def client():
        out["r"] = call(port, "/k/v1/images", {"prompts": [1], "steps": 600, "seed": 3}, timeout=90)

    t = threading.Thread(target=client)
    t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until the request is being denoised
        if json.loads(call(port, "/k/readyz")[1]).get("inflight"):
            break
        time.sleep(0.1)
    (actor,) = _replica_actors("k")
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    t.join(90)
    assert not t.is_alive(), "the client was left hanging"
    status, payload, _ = out["r"]
    assert status >= 500 or (status == 200 and len(pngs(payload)) == 1), (status, payload[:200])
    deadline = time.monotonic() + 60  # Serve replaces the replica; the service answers again
    while time.monotonic() < deadline:
        status = call(port, "/k/v1/images", {"prompts": [1], "steps": 3}, timeout=30)[0]
        if status == 200:
            break
        time.sleep(1)
    assert status == 200
    serve.delete("k")


def test_bundle_failing_verification_never_becomes_ready(cluster, serve_bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(serve_bundle, bad)
    weights = next((bad / "stages").glob("weights.*.bin"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="Deploying application bad failed"):
        deploy(cluster, "bad", bad)
    app = serve.status().applications["bad"]
    assert str(app.status).endswith("DEPLOY_FAILED"), app.status
    why = " ".join(d.message for d in app.deployments.values())
    assert "sha256" in why or "checksum" in why, why[-500:]
    assert call(cluster, "/bad/readyz")[0] != 200
    serve.delete("bad")


def _in_flight(port, prefix):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if json.loads(call(port, f"{prefix}/readyz")[1]).get("inflight"):
            return
        time.sleep(0.05)
    raise AssertionError("the request never started")


@pytest.mark.parametrize("drain,steps,expect", [(30, 150, 200), (1, 1000, 500)])
def test_shutdown_answers_in_flight_requests(cluster, serve_bundle, drain, steps, expect):
    """Shutdown with a request in flight: it finishes within the drain time (200, a real image)
    or is failed explicitly (5xx with a message); the client is never left hanging."""
    name = f"g{drain}"
    port = deploy(cluster, name, serve_bundle, drain_s=drain)
    out = []
    t = threading.Thread(target=lambda: out.append(call(port, f"/{name}/v1/images",
                                                         {"prompts": [2] * 8, "steps": steps, "seed": 5}, timeout=120)))
    t.start()
    _in_flight(port, f"/{name}")
    serve.delete(name)
    t.join(120)
    assert not t.is_alive(), "the client was left hanging"
    status, payload, _ = out[0]
    if expect == 200:
        assert status == 200 and len(pngs(payload)) == 8
    else:
        assert status >= 500, status
