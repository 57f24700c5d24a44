"""The Ray Serve application: an HTTP API over one loaded bundle per replica.

    POST /v1/images      {"prompts": ["sneaker", 3], "seed": 0, "steps": 50, ...} -> PNGs (base64 JSON or image/png)
    GET  /v1/model       classes, sampling defaults, stages
    GET  /healthz        the replica's engine loop is alive
    GET  /readyz         loaded, verified and taking requests (503 while draining)
    GET  /metrics        Prometheus text (this replica)
    GET  /docs           the OpenAPI page (/openapi.json)

Each replica loads the bundle (checksums verified: a bundle that fails stops the replica from
ever becoming ready), runs one engine loop thread (``scheduler.Scheduler``) and answers requests
as their images finish. ``build_app`` makes the application for ``serve.run``, Ray's
``serve run flexdit_serve.app:build_app bundle=PATH`` or a Serve config file, so the same
application runs on a local Ray and on a multi-node cluster.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time
import asyncio
import base64
import threading
import time
import uuid
from typing import Any, List, Literal, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from flexdit_bundle.manifest import BundleError

from .config import ServeConfig
from .scheduler import BadRequest, Scheduler, ServeError, ShuttingDown, make_ticket

api = FastAPI(title="flexdit-serve", description="Class-conditional image generation from a flexdit-export bundle, "
              "with stage-aware continuous batching.", version="1")


SAMPLING = ("steps", "sampler", "cfg_scale", "eta", "spacing")  # Model.params' keywords


def _checked(default, json_type: dict, description: str):
    """A field that arrives as sent (no coercion: JSON true, 3.0 and "2" stay a boolean, a float
    and a string) and is checked by the runtime itself, with the Python API's rules and lines."""
    return Field(default, json_schema_extra=json_type, description=description)


class ImagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: List[Any] = _checked(..., {"items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                                  "class names (any case) or class ids")
    seed: Any = _checked(0, {"type": "integer", "minimum": 0},
                         "image i uses numpy default_rng([seed, i]), as flexdit-run")
    steps: Any = _checked(None, {"type": "integer"}, "sampling steps (default: the bundle's)")
    sampler: Any = _checked(None, {"type": "string"}, "ddpm | ddim | dpmpp-2m | unipc | euler (default: the bundle's)")
    cfg_scale: Any = _checked(None, {"type": "number"}, "classifier-free guidance scale; <= 1 turns it off")
    eta: Any = _checked(None, {"type": "number"}, "DDIM eta in [0, 1]")
    spacing: Any = _checked(None, {"type": "string"}, "timestep spacing (default: the sampler's)")
    timeout_s: Optional[float] = Field(None, gt=0, description="fail with 504 after this long (at most the server's)")
    response_format: Literal["base64", "png"] = Field("base64", description="png: the image itself (one prompt only)")
    id: Optional[str] = Field(None, max_length=200, description="echoed back, for the client's bookkeeping")


def _one_line(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    return JSONResponse({"error": _one_line(exc)[:500]}, status_code=422)


def _error(e: ServeError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return JSONResponse({"error": str(e)[:500]}, status_code=e.status, headers=headers)


@serve.deployment(max_constructor_retry_count=1, health_check_period_s=2, health_check_timeout_s=30)
@serve.ingress(api)
class FlexDiTServer:
    def __init__(self, config: dict):
        from flexdit_bundle.manifest import load_bundle
        from flexdit_runtime.device import resolve
        from flexdit_runtime.model import Model
        from flexdit_runtime.settings import RuntimeSettings

        from .metrics import Metrics

        self.config = cfg = ServeConfig.from_dict(config)
        # Raises (BundleError) on a bundle that fails verification: the replica never becomes ready.
        bundle = load_bundle(cfg.bundle, cfg.verify_checksums, defer_weights=True)
        backend, settings = resolve(bundle, cfg.device, cfg.backend,
                                    RuntimeSettings(threads=cfg.threads, shared_thread_pool=True))
        self.model = Model(bundle, settings, cfg.precision, backend)
        self.metrics = Metrics()
        self.scheduler = Scheduler(self.model, policy="none" if cfg.batching == "none" else "stage",
                                   max_inflight=cfg.max_inflight, max_queue=cfg.max_queue,
                                   max_wait_calls=cfg.max_wait_calls, metrics=self.metrics)
        self.max_images = min(cfg.max_images_per_request, self.scheduler.max_inflight)
        if cfg.batching == "request":
            # the same number of images in flight as the stage scheduler gets (one request = one image here)
            self._batched.set_max_batch_size(self.scheduler.max_inflight)
            self._batched.set_batch_wait_timeout_s(cfg.batch_wait_s)
        self._loop = threading.Thread(target=self.scheduler.serve_forever, name="flexdit-engine", daemon=True)
        self._loop.start()
        self.ready = True

    # ---- HTTP -------------------------------------------------------------------------------------

    @api.post("/v1/images", summary="generate images", responses={
        400: {"description": "bad prompt or option (one line)"}, 422: {"description": "malformed request"},
        429: {"description": "queue full: retry later"}, 503: {"description": "shutting down"},
        504: {"description": "timed out"}})
    async def images(self, body: ImagesRequest):
        start = time.monotonic()
        try:
            ticket = await self._run(body)
        except ServeError as e:
            return _error(e)
        if ticket.error is not None:
            return _error(ticket.error)
        res = ticket.result
        from flexdit_runtime.images import png_bytes  # (module globals are not all there in a Serve replica)

        pngs = await asyncio.to_thread(lambda: [png_bytes(img) for img in res.images])
        if body.response_format == "png":
            return Response(pngs[0], media_type="image/png",
                            headers={"X-Class-Id": str(res.class_ids[0]), "X-Label": res.labels[0]})
        return {"id": body.id, "seconds": round(time.monotonic() - start, 4), "seed": body.seed,
                "images": [{"index": i, "class_id": int(c), "label": lab, "png_base64": base64.b64encode(p).decode()}
                           for i, (c, lab, p) in enumerate(zip(res.class_ids, res.labels, pngs))]}

    @api.get("/v1/model", summary="what this bundle draws and how")
    async def model_info(self):
        m = self.model
        return {"classes": m.classes.names, "num_classes": m.classes.num_classes, "defaults": m.defaults.to_json(),
                "stages": [{"id": st.id, "t_min": st.t_min, "t_max": st.t_max, "batch": b}
                           for st, b in zip(m.bundle.stages, m.runner.batches)],
                "batching": self.config.batching, "max_images_per_request": self.max_images}

    @api.get("/healthz", summary="the engine loop is alive")
    async def healthz(self):
        if not self._loop.is_alive() and not self.scheduler.draining:
            return JSONResponse({"status": "engine loop stopped"}, status_code=500)
        return {"status": "ok"}

    @api.get("/readyz", summary="taking requests")
    async def readyz(self):
        if self.scheduler.draining or not self._loop.is_alive():
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ready", "queue": self.scheduler.queue_depth, "inflight": self.scheduler.inflight}

    @api.get("/metrics", summary="Prometheus metrics of this replica")
    async def metrics_text(self):
        from .metrics import CONTENT_TYPE_LATEST

        return Response(self.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    # ---- Ray Serve hooks ---------------------------------------------------------------------------

    def check_health(self):
        """Ray Serve restarts a replica whose engine loop died."""
        if not self._loop.is_alive() and not self.scheduler.draining:
            raise RuntimeError("the engine loop stopped")

    async def drain(self) -> str:
        """Stop admitting (503), give the requests here ``drain_s`` to finish, answer the rest
        503; returns once every request has its answer. flexdit-serve calls it on every replica
        (``DeploymentHandle.broadcast``) before it asks Ray to stop anything: Ray Serve's own
        shutdown removes the HTTP proxy at once, and otherwise ends a replica whose requests
        outlive its wait without letting them answer."""
        await asyncio.to_thread(self.scheduler.close, self.config.drain_s)
        return serve.get_replica_context().replica_tag

    def __del__(self):
        """Ray Serve stops the replica (after its own wait for ongoing requests): the same drain."""
        sched = getattr(self, "scheduler", None)
        if sched is not None:
            sched.close(self.config.drain_s)

    # ---- the three batching modes --------------------------------------------------------------

    async def _run(self, body: ImagesRequest):
        cfg = self.config
        if len(body.prompts) > self.max_images:
            raise BadRequest(f"{len(body.prompts)} prompts in one request; this server takes at most {self.max_images}")
        if body.response_format == "png" and len(body.prompts) != 1:
            raise BadRequest("response_format 'png' returns one image: send one prompt (or use base64)")
        if self.scheduler.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        try:  # what the client left out takes the Python API's own default
            params = self.model.params(**{k: getattr(body, k) for k in SAMPLING if k in body.model_fields_set})
        except BundleError as e:
            raise BadRequest(str(e)) from None
        timeout = min(body.timeout_s or cfg.timeout_s, cfg.timeout_s)
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def on_done(t):
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(t))

        ticket = make_ticket(self.model, uuid.uuid4().hex, body.prompts, params, body.seed, timeout, on_done)
        try:
            if cfg.batching == "request":
                self.scheduler.track(ticket)
                return await self._batched(ticket)
            self.scheduler.submit(ticket)
            return await done
        except asyncio.CancelledError:  # the client disconnected: its images leave the next call
            self.scheduler.cancel(ticket.id)
            raise

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _batched(self, tickets: list):
        """Ray Serve's request batching: whole trajectories of the batch's requests together."""
        await asyncio.to_thread(self.scheduler.run_whole, tickets)
        return tickets


def deployment_options(cfg: ServeConfig) -> dict:
    """Ray Serve options from the config: replicas, CPUs per replica, and a Ray-side queue bound
    so that requests beyond what the replicas hold are refused (503) instead of piling up."""
    from ray.serve.config import BackpressureConfig

    # The replica's scheduler is the authority on admission (429 beyond what it can finish in
    # time, or beyond --max-queue); Ray lets a few more requests through to hear that answer,
    # and refuses beyond (429 too) on its side.
    hold = (cfg.max_queue if cfg.max_queue is not None else 1024) + (cfg.max_inflight or 16) + 8
    return {"num_replicas": cfg.replicas,
            "ray_actor_options": {"num_cpus": cfg.ray_cpus if cfg.ray_cpus is not None else (cfg.threads or 1),
                                  "num_gpus": cfg.gpus},
            "max_ongoing_requests": hold, "max_queued_requests": hold,
            "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=1),
            "graceful_shutdown_timeout_s": cfg.drain_s, "graceful_shutdown_wait_loop_s": 0.5}


def build_app(args: dict):
    """The application for ``serve.run`` / ``serve run flexdit_serve.app:build_app bundle=PATH ...``."""
    cfg = args if isinstance(args, ServeConfig) else ServeConfig.from_dict(args)
    return FlexDiTServer.options(**deployment_options(cfg)).bind(cfg.to_dict())
