"""flexdit-serve BUNDLE: the bundle behind an HTTP API on Ray Serve.

One machine (starts a local Ray):   flexdit-serve bundles/fashion --port 8000
An existing Ray cluster:            flexdit-serve /shared/bundles/fashion --address auto --replicas 4 --detach

Every failure a user can cause (bad option, missing or tampered bundle, Ray Serve not
installed, a port in use, a deployment that never becomes ready) ends with one line on stderr
and exit code 2. Ctrl-C / SIGTERM shut down gracefully: in-flight requests get ``--drain``
seconds to finish, the rest are answered with 503.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import warnings

import click

from flexdit_bundle.errors import FlexditError
from flexdit_bundle.manifest import BundleError, load_bundle
from flexdit_bundle.cli_support import FLOAT, INT, Choice, run
from flexdit_runtime.stage_engine import backend_choices

from .config import BATCHING, ConfigError, ServeConfig

PROG = "flexdit-serve"
APP_NAME = "flexdit"


class UserError(FlexditError):
    """A failure the user can fix, said in one line with exit status 2: the server's own, under
    the contract's hierarchy like the compiler's and the runtime's errors."""


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("bundle")
@click.option("--host", default="127.0.0.1", show_default=True, help="address the HTTP proxy listens on")
@click.option("--port", type=INT, default=8000, show_default=True)
@click.option("--batching", type=Choice(BATCHING), default="stage", show_default=True,
              help="stage: stage-aware continuous batching; request: Ray Serve's batching of whole trajectories; "
                   "none: one request at a time")
@click.option("--replicas", type=INT, default=1, show_default=True, help="replicas (each loads the bundle)")
@click.option("--threads", type=INT, default=None, help="engine threads (and Ray CPUs) per replica")
@click.option("--ray-cpus", type=FLOAT, default=None, help="CPUs Ray reserves per replica (default: --threads, else 1)")
@click.option("--backend", type=Choice(backend_choices()), default=None,
              help="engine kind, as flexdit-run --backend (default onnx, or what --device picks)")
@click.option("--device", type=Choice(("cpu", "cuda")), default=None, help="where the engines run, as flexdit-run --device")
@click.option("--gpus", type=FLOAT, default=0.0, show_default=True, help="GPUs Ray reserves per replica (0.5: two share one)")
@click.option("--precision", default=None, help="per-stage precision override, as flexdit-run --precision")
@click.option("--max-inflight", type=INT, default=None, help="images denoised at once per replica "
              "(default: the rows of one stage call)")
@click.option("--max-queue", type=INT, default=None, help="images waiting beyond that; more answer 429 "
              "(default: whatever the replica can finish within the request's time-out at its measured speed)")
@click.option("--max-wait-calls", type=INT, default=None, help="starvation bound: engine calls an image may wait "
              "between two of its steps (default 2 x stages)")
@click.option("--max-images", type=INT, default=16, show_default=True, help="prompts per request")
@click.option("--timeout", type=FLOAT, default=120.0, show_default=True, help="seconds a request may take, queue included")
@click.option("--drain", type=FLOAT, default=30.0, show_default=True, help="seconds in-flight requests get at shutdown")
@click.option("--address", default=None, help="an existing Ray cluster (e.g. auto, ray://head:10001); "
              "default: start a local Ray")
@click.option("--detach", is_flag=True, help="deploy and exit, leaving the application running on the cluster")
def command(bundle, host, port, batching, replicas, threads, ray_cpus, backend, device, gpus, precision, max_inflight, max_queue,
            max_wait_calls, max_images, timeout, drain, address, detach):
    """Serve BUNDLE over HTTP (POST /v1/images; /docs for the API)."""
    try:
        cfg = ServeConfig(bundle=os.path.abspath(bundle), batching=batching, replicas=replicas, threads=threads,
                          ray_cpus=ray_cpus, backend=backend, device=device, gpus=gpus, precision=precision, max_inflight=max_inflight, max_queue=max_queue,
                          max_wait_calls=max_wait_calls, max_images_per_request=max_images, timeout_s=timeout,
                          drain_s=drain)
    except ConfigError as e:
        raise UserError(str(e)) from None
    if not 0 < port < 65536:
        raise UserError(f"--port must be in 1..65535, got {port}")
    try:  # fail here, in one line, before starting Ray, on a bundle that cannot be trusted
        checked = load_bundle(cfg.bundle, verify_checksums=True, defer_weights=False)
        if cfg.device == "cuda" and not cfg.gpus:
            raise UserError("--device cuda needs --gpus (the GPUs Ray reserves per replica, e.g. 1 or 0.5)")
        check_engines(checked, cfg, local=address is None)
    except BundleError as e:
        raise UserError(str(e)) from None
    if detach and address is None:
        raise UserError("--detach needs --address (a local Ray ends with this process)")
    serve_app(cfg, host, port, address, detach)
    return 0


def check_engines(bundle, cfg: ServeConfig, local: bool) -> None:
    """Refuse, before Ray is contacted, a --device/--backend/--precision the replicas would refuse
    while loading, with flexdit-run's lines: the runtime's own checks, without opening an engine.

    What is checked where: the bundle is the same file set wherever the replicas run, so an
    unknown backend or precision, a precision spec naming stages the bundle lacks, a device the
    engine kind cannot run on, and a precision/engine kind the bundle has no artifact for are
    always errors. What depends on the machine (the engine kind's ``preflight``: its library
    installed, a CUDA GPU for ONNX Runtime or PyTorch, the TensorRT/AOTI build matching it; the
    engines and bf16 that ``--backend auto`` may choose from) is checked only when the replicas
    run here (no --address): a cluster's nodes may have hardware and engines this driver lacks,
    so there ``device.resolve`` assumes the availability probes succeed and the replicas check
    the rest."""
    from flexdit_runtime.device import ASSUME_AVAILABLE, resolve
    from flexdit_runtime.engines import precision_overrides, stage_artifacts
    from flexdit_runtime.settings import RuntimeSettings
    from flexdit_runtime.stage_engine import AUTO

    probes = None if local else ASSUME_AVAILABLE
    kind, settings = resolve(bundle, cfg.device, cfg.backend, RuntimeSettings(threads=cfg.threads), probes)
    policy = precision_overrides(bundle, cfg.precision, kind)  # unknown precisions, stage ids out of range
    wants = [policy.get(st.id, policy.get("*")) for st in bundle.stages]
    if kind == AUTO:  # here: the engines installed and this CPU's bf16; else the bundle's artifacts alone
        from flexdit_runtime.engine_select import candidates

        for st, want in zip(bundle.stages, wants):
            candidates(bundle, st, want, settings=settings, machine=local)
        return
    engine_cls, arts = stage_artifacts(bundle, kind, wants)  # the artifact each stage runs, as StageRunner picks it
    if local:  # this machine runs them: the refusals the engine's open() makes before it loads anything
        for st, art in zip(bundle.stages, arts):
            engine_cls.preflight(bundle, st, art, settings)


def serve_app(cfg: ServeConfig, host: str, port: int, address: str | None, detach: bool) -> None:
    try:
        import ray
        from ray import serve

        from .app import build_app
    except ImportError as e:
        raise UserError(f"flexdit-serve needs Ray Serve ({e.name or e} is missing): pip install \".[serve]\"") from None
    stop = threading.Event()
    # Ray's and Serve's start-up notices (Serve's own logger does not propagate to "ray"); errors
    # still show. Among them: "Connecting to existing Serve app ... New http_options ... will not
    # be applied", which serve.run logs after serve.start although the port was applied.
    for name in ("ray", "ray.serve"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if address is None:  # (a cluster's failure to answer stays the one error line below)
        say("starting a local Ray (this can take a minute)...")
    try:
        # Ray warns (UserWarning on stderr) before it raises, e.g. "Ray Client connection timed
        # out..." for an unreachable ray:// address: the error line below says it once
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except Exception as e:  # ray raises ConnectionError, RuntimeError, ...
        raise UserError(f"cannot start or reach Ray{f' at {address}' if address else ''}: {_first_line(e)}") from None
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own SIGTERM handler
        signal.signal(sig, lambda *_: stop.set())
    try:
        try:
            say(f"deploying {cfg.replicas} replica(s) (each loads and verifies the bundle)...")
            serve.start(http_options={"host": host, "port": port})
            serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
        except Exception as e:
            raise UserError(f"the deployment did not become ready: {_deploy_failure(serve, e)}") from None
        url = f"http://{host}:{port}"
        say(f"serving {cfg.bundle} at {url} ({cfg.replicas} replica(s), batching {cfg.batching}); "
            f"API: {url}/docs; Ctrl-C stops")
        if detach:
            return
        while not stop.wait(0.5):
            pass
        say(f"shutting down (in-flight requests get {cfg.drain_s:g} s)")
        stop_app(serve, cfg)
    finally:
        if not detach:
            ray.shutdown()


def say(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def stop_app(serve, cfg: ServeConfig) -> None:
    """Every replica drains while the HTTP proxy still carries its answers (200 within --drain,
    503 beyond it), then the application is deleted with nothing left in flight. Serve's own
    shutdown would remove the proxy first (every open connection dropped at once), and its
    ServeController.graceful_shutdown task is killed by ray.kill, which Ray reports as a failed
    task: a local Ray ends with ray.shutdown instead, and a cluster's Serve stays up."""
    try:
        handle = serve.get_app_handle(APP_NAME)
        drained = handle.broadcast("drain").results(timeout_s=cfg.drain_s + 30)
        say(f"{len(drained)} replica(s) drained")
    except Exception as e:  # a replica that died meanwhile has nothing left to answer
        say(f"drain incomplete ({_first_line(e)}); stopping anyway")
    serve.delete(APP_NAME)


def _deploy_failure(serve, e: Exception) -> str:
    """Why the replicas failed (their constructor's exception, from the Serve status), else Ray's message."""
    try:
        app = serve.status().applications[APP_NAME]
        text = "\n".join(d.message for d in app.deployments.values())
    except Exception:  # the status itself may be unavailable
        text = ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    cause = next((ln for ln in reversed(lines) if "BundleError" in ln or "Error:" in ln), None)
    return (cause.split("BundleError: ", 1)[-1] if cause else _first_line(e))[:400]


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    # Ray wraps the replica's own exception; its last line is the cause the user can act on
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    cause = next((ln for ln in reversed(lines) if "BundleError" in ln or "Error:" in ln), lines[0] if lines else "")
    return (cause or type(e).__name__)[:400]


def main(argv=None) -> int:
    try:
        return run(command, PROG, argv)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
