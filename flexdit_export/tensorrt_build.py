"""One TensorRT engine per stage, from the bundle's ONNX graphs, with a timing cache and a
content-keyed engine cache.

- Graph choice: the stage's graph of the wanted precision. fp16, int8-static (QDQ) and fp8
  (QDQ) graphs carry their own precision, so they are built with a *strongly typed* network
  (TensorRT keeps the graph's types instead of choosing its own); fp32 graphs are built plainly.
  int8-dynamic graphs use ONNX Runtime-only operators and are refused.
- Engine cache: ``<cache>/<key>.engine``, key = sha256 of (graph sha256, precision, strongly
  typed, TensorRT version, GPU compute capability, builder recipe version). A rebuild happens
  only when one of those changes.
- Timing cache: one file per TensorRT version and compute capability, loaded before and saved
  after every build, so kernels timed once are not timed again.
- Every engine is written with the header of ``flexdit_runtime.tensorrt_engine`` (TensorRT
  version, compute capability, precision, source graph hash), which the runtime checks before
  it deserialises anything.

The build follows the TensorRT 10 Python API (``Builder``, ``OnnxParser``,
``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, ``create_timing_cache``,
``build_serialized_network``). TensorRT cannot be installed where this was written: the build
itself is unverified; the keys, caches, headers, bundle entries and refusals around it are tested.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from flexdit_bundle.manifest import BundleError, load_bundle
from flexdit_bundle.precision import PrecisionError, parse_policy
from flexdit_bundle.spec import Artifact, Stage
from flexdit_bundle.engine_header import NOT_INSTALLED, read_header, write_engine
from flexdit_runtime.tensorrt_engine import environment

from .errors import UserError

RECIPE_VERSION = 1  # bump when the build settings below change
WORKSPACE_BYTES = 4 << 30
DEFAULT_CACHE = Path(os.environ.get("FLEXDIT_ENGINE_CACHE", Path.home() / ".cache" / "flexdit-export" / "tensorrt"))


def require_tensorrt(env: dict | None = None) -> dict:
    env = env if env is not None else environment()
    if env.get("tensorrt_version") is None:
        raise UserError(NOT_INSTALLED.format(what="built") + "; the bundle's ONNX graphs run without it (--backend onnx)")
    if env.get("compute_capability") is None:
        raise UserError("no NVIDIA GPU found (nvidia-smi): TensorRT engines are built on the GPU they will run on")
    return env


def strongly_typed(precision: str) -> bool:
    return precision != "fp32"


def cache_key(graph_sha256: str, precision: str, env: dict) -> str:
    fields = {"graph": graph_sha256, "precision": precision, "strongly_typed": strongly_typed(precision),
              "tensorrt": env["tensorrt_version"], "compute_capability": env["compute_capability"],
              "recipe": RECIPE_VERSION, "workspace": WORKSPACE_BYTES}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def timing_cache_path(cache_dir: Path, env: dict) -> Path:
    return cache_dir / f"timing-trt{env['tensorrt_version']}-sm{env['compute_capability']}.cache"


def build_plan(onnx_path, precision: str, timing_cache: Path, log=print) -> bytes:
    """Parse the ONNX graph and build a serialized engine (TensorRT 10 API; unverified here)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed(precision) else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {Path(onnx_path).name}: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT failed to build an engine from {Path(onnx_path).name} (see its log above)")
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = timing_cache.with_name(timing_cache.name + f".tmp-{os.getpid()}")
    tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    os.replace(tmp, timing_cache)
    return bytes(plan)


def engine_for(onnx_path, graph_sha256: str, precision: str, env: dict, cache_dir=None, timing_cache=None,
               log=print, build=build_plan) -> Path:
    """The cached engine for this graph/precision/TensorRT/GPU, built on a miss."""
    cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    key = cache_key(graph_sha256, precision, env)
    path = cache_dir / f"{key}.engine"
    if path.is_file():
        try:
            header, _ = read_header(path)
            if header.get("cache_key") == key:
                log(f"TensorRT: engine cache hit {path.name} ({precision})")
                return path
        except BundleError:
            pass  # a damaged entry is rebuilt
    log(f"TensorRT: building {precision} engine from {Path(onnx_path).name} "
        f"(TensorRT {env['tensorrt_version']}, compute capability {env['compute_capability']})")
    plan = build(onnx_path, precision, Path(timing_cache) if timing_cache else timing_cache_path(cache_dir, env), log)
    header = {"tensorrt_version": env["tensorrt_version"], "compute_capability": env["compute_capability"],
              "precision": precision, "strongly_typed": strongly_typed(precision), "source_sha256": graph_sha256,
              "cache_key": key}
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", dir=cache_dir)
    os.close(fd)
    write_engine(tmp, header, plan)
    os.replace(tmp, path)
    return path


def _engine_precision(st: Stage, want: str) -> str:
    have = {a.precision for a in st.artifacts if a.backend == "onnx"}
    if want == "int8-dynamic":
        if "int8-static" not in have:
            raise UserError(f"stage {st.id}: its int8-dynamic graph uses ONNX Runtime-only operators; TensorRT needs "
                            "an int8-static (QDQ) graph: convert with --extra-precisions int8-static")
        want = "int8-static"
    if want not in have:
        raise UserError(f"stage {st.id} has no onnx/{want} graph to build a TensorRT engine from "
                        f"(it has: {', '.join(sorted(have))})")
    return want


def copy_engine(w, what: str, src: Artifact | dict, precision: str, env: dict, cache_dir=None, timing_cache=None,
                log=print, build=build_plan) -> Path:
    """The engine of the bundle graph ``src`` (an onnx artifact of the bundle being written by
    ``w``; typed, or as a builder assembled it), built or taken from the cache, copied next to
    it; -> its path in the bundle."""
    src = Artifact.from_json(src)
    if src.external_data is not None:
        raise UserError(f"{what}: building engines from graphs with external weights is not supported")
    cached = engine_for(w.tmp / src.path, src.sha256, precision, env, cache_dir, timing_cache, log, build)
    dst = w.path(f"{Path(src.path).parent.as_posix()}/{Path(src.path).name.split('.')[0]}.{precision}.engine")
    shutil.copyfile(cached, dst)
    return dst


def engine_artifact(w, engine: Path, precision: str, src: Artifact | dict) -> dict:
    """The manifest entry (JSON, as builders give theirs) of an engine built from ``src``."""
    header, _ = read_header(engine)
    return w.artifact([engine], "tensorrt", precision, source_sha256=Artifact.from_json(src).sha256,
                      tensorrt={k: header[k] for k in ("tensorrt_version", "compute_capability", "cache_key",
                                                       "strongly_typed")})


def add_engines(w, stages, policy: dict, env: dict, cache_dir=None, timing_cache=None, log=print,
                build=build_plan) -> tuple[Stage, ...]:
    """Build (or take from the cache) one engine per stage at its policy precision in the bundle
    being written by ``w`` (a ``BundleWriter``); -> the stages with it in place of any engine of
    that precision."""
    out = []
    for st in stages:
        prec = _engine_precision(st, policy[st.id])
        src = next(a for a in st.artifacts if a.backend == "onnx" and a.precision == prec)
        dst = copy_engine(w, f"stage {st.id}", src, prec, env, cache_dir, timing_cache, log, build)
        kept = tuple(a for a in st.artifacts if not (a.backend == "tensorrt" and a.precision == prec))
        out.append(dataclasses.replace(st, artifacts=kept + (Artifact.from_json(engine_artifact(w, dst, prec, src)),)))
    return tuple(out)


def engines_command(bundle_path, precision_spec=None, cache_dir=None, timing_cache=None, force=False, log=print,
                    env=None, build=build_plan) -> Path:
    """``flexdit-export engines BUNDLE``: add engines for this machine to an existing bundle
    (rewritten atomically)."""
    from .bundle import BundleWriter

    env = require_tensorrt(env)
    bundle = load_bundle(bundle_path)
    stages = bundle.stages
    if any(a.backend == "tensorrt" for st in stages for a in st.artifacts) and not force:
        raise UserError(f"{bundle_path} already has TensorRT engines (use --force to rebuild them for this machine)")
    try:
        policy = parse_policy(precision_spec, len(stages), "tensorrt", default=None) if precision_spec else {}
    except PrecisionError as e:
        raise UserError(str(e)) from None
    policy = {st.id: policy.get(st.id, st.default_precision or "fp32") for st in stages}
    stages = tuple(dataclasses.replace(st, artifacts=tuple(a for a in st.artifacts if a.backend != "tensorrt"))
                   for st in stages)
    with BundleWriter.updating(bundle_path) as w:
        stages = add_engines(w, stages, policy, env, cache_dir, timing_cache, log, build)
        listed = {a.path for st in stages for a in st.artifacts}
        for f in (w.tmp / "stages").glob("*.engine"):  # engines of a previous build the manifest no longer lists
            if f.relative_to(w.tmp).as_posix() not in listed:
                f.unlink()
        manifest = dataclasses.replace(bundle.manifest, stages=stages).to_json()
        manifest.pop("format", None)
        from .finalize import finalize

        return w.commit(finalize(w.tmp, manifest))
