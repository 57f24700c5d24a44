"""One copy of the weights per precision: the first step of ``finalize``.

Stage graphs differ only in their pooling tables; every other initializer is the same tensor
in every stage. This pass moves each initializer that two or more stage graphs of one
precision hold (and every large initializer of a single-graph precision) into one file,
``stages/weights.<precision>.bin``, stored once (content-deduplicated, 64-byte aligned), and
rewrites each graph to reference it as ONNX external data at the same offsets. Each graph
therefore stays a valid standalone ONNX model (``onnx.load``, ONNX Runtime, TensorRT's parser
all read it), while a runtime can map the file once and hand the same buffers to every stage
session (``flexdit_runtime.weights``). The manifest records the file (sha256, tensor table) and,
per artifact, which initializer binds to which tensor, so a runtime needs no ONNX parser.
Stage-specific constants (pooling tables, small index tensors) stay inside their graph.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path

from flexdit_bundle.files import sha256_file

ALIGNMENT = 64
MIN_SHARED_BYTES = 128  # smaller initializers (shape constants, scales) stay in their graph
WEIGHTS_DIR = "stages"


def _dtypes():
    from onnx import TensorProto as T

    return {T.FLOAT: "float32", T.FLOAT16: "float16", T.BFLOAT16: "bfloat16", T.INT8: "int8", T.UINT8: "uint8",
            T.INT32: "int32", T.INT64: "int64", T.BOOL: "bool"}


def _raw_bytes(t) -> bytes:
    """An initializer's data as little-endian raw bytes (what external data stores)."""
    from onnx import numpy_helper

    if t.HasField("raw_data"):
        return bytes(t.raw_data)
    return numpy_helper.to_array(t).tobytes()


def _set_external(t, location: str, offset: int, length: int) -> None:
    from onnx import TensorProto

    for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(f)
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = key, value
    t.data_location = TensorProto.EXTERNAL


def weight_file_name(precision: str) -> str:
    return f"{WEIGHTS_DIR}/weights.{precision}.bin"


def share_weights(root, manifest: dict) -> dict:
    """Rewrite the ONNX stage graphs under ``root`` so each precision's shared tensors live in
    one weight file; -> the manifest with ``weights`` and per-artifact bindings (sha256/bytes
    of rewritten graphs updated, ``source_sha256`` references remapped). Idempotent, for
    ``flexdit-export engines``, which finalizes a published bundle again: graphs that already
    reference a weight file are read back through it and shared again."""
    import onnx

    root = Path(root)
    groups = defaultdict(list)  # precision -> [artifact]
    for st in manifest["stages"]:
        for a in st["artifacts"]:
            if a["backend"] == "onnx":
                groups[a["precision"]].append(a)
    dtypes = _dtypes()
    renamed = {}  # old graph sha256 -> new
    weight_files = []
    for prec, arts in sorted(groups.items()):
        models = []
        for a in arts:
            path = root / a["path"]
            m = onnx.load(str(path), load_external_data=True)
            _drop_exporter_metadata(m)
            models.append(m)
        # How many graphs hold each tensor (by content): shared if more than one does, or if
        # this precision has a single graph (a dense bundle still stores its weights apart).
        def key(t):
            raw = _raw_bytes(t)
            return hashlib.sha256(raw).hexdigest() + f"|{t.data_type}|{tuple(t.dims)}", raw

        holders = defaultdict(set)
        for i, m in enumerate(models):
            for t in m.graph.initializer:
                if t.data_type in dtypes and len(_raw_bytes(t)) >= MIN_SHARED_BYTES:
                    holders[key(t)[0]].add(i)
        wanted = {k for k, h in holders.items() if len(h) > 1 or len(models) == 1}
        if not wanted:
            continue
        rel = weight_file_name(prec)
        target = root / rel
        tmp = target.with_name(target.name + ".new")
        index, tensors, offset = {}, [], 0
        bindings = [dict() for _ in models]
        with open(tmp, "wb") as f:
            for i, m in enumerate(models):
                for t in m.graph.initializer:
                    if t.data_type not in dtypes:
                        continue
                    k, raw = key(t)
                    if k not in wanted:
                        continue
                    if k not in index:
                        pad = (-offset) % ALIGNMENT
                        f.write(b"\0" * pad)
                        offset += pad
                        index[k] = len(tensors)
                        tensors.append({"offset": offset, "bytes": len(raw), "dtype": dtypes[t.data_type],
                                        "shape": [int(d) for d in t.dims]})
                        f.write(raw)
                        offset += len(raw)
                    e = tensors[index[k]]
                    _set_external(t, os.path.basename(rel), e["offset"], e["bytes"])
                    bindings[i][t.name] = index[k]
        os.replace(tmp, target)
        for a, m, b in zip(arts, models, bindings):
            path = root / a["path"]
            old = a["sha256"]
            _prune_value_info(m)  # after the rewrite: the proto no longer holds the weights
            onnx.save(m, str(path))  # every external tensor now points into the weight file
            ext = a.pop("external_data", None)
            if ext is not None and not _still_referenced(m, Path(ext["path"]).name):
                (root / ext["path"]).unlink(missing_ok=True)
            elif ext is not None:
                a["external_data"] = ext
            a["sha256"], a["bytes"] = sha256_file(path), path.stat().st_size
            a["weights"] = {"file": prec, "bindings": b}
            renamed[old] = a["sha256"]
        weight_files.append({"id": prec, "path": rel, "sha256": sha256_file(target), "bytes": target.stat().st_size,
                             "alignment": ALIGNMENT, "tensors": tensors})
    for st in manifest["stages"]:
        for a in st["artifacts"]:
            if a.get("source_sha256") in renamed:
                a["source_sha256"] = renamed[a["source_sha256"]]
                if a["backend"] == "tensorrt":
                    _restamp_engine(root / a["path"], a)
    rebuilt = {w["id"] for w in weight_files}  # files other builders wrote (AOTI) are kept as they are
    manifest["weights"] = weight_files + [w for w in manifest.get("weights") or [] if w["id"] not in rebuilt]
    return manifest


def _still_referenced(model, location: str) -> bool:
    return any(e.key == "location" and e.value == location
               for t in model.graph.initializer for e in t.external_data)


def _drop_exporter_metadata(model) -> None:
    """The dynamo exporter annotates every node with its Python stack trace, FX node and module
    scopes (~0.9 MB per stage graph of the Fashion model, 7% of its weights, repeated in every
    stage). Nothing reads them once ``export.name_nodes_by_layer`` has put the layer into each
    node's name, so the published graphs drop them."""
    for node in model.graph.node:
        del node.metadata_props[:]


def _prune_value_info(model) -> None:
    """Drop the intermediate type/shape annotations that ONNX shape inference derives again
    identically (every consumer infers them at load); keep the ones it cannot (e.g. after ONNX
    Runtime's fusions in optimised or fp16 graphs), so no information is lost. Annotations of
    initializers repeat the initializer's own type and dims."""
    import onnx

    weights = {t.name for t in model.graph.initializer}
    kept = [v for v in model.graph.value_info if v.name not in weights]
    del model.graph.value_info[:]
    try:
        inferred = {v.name: v.type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    except Exception:  # inference cannot run on this graph: keep every annotation
        inferred = {}
    model.graph.value_info.extend(v for v in kept if inferred.get(v.name) != v.type)


def _restamp_engine(path: Path, artifact: dict) -> None:
    """A TensorRT engine built before the sharing pass names its source graph by the graph's
    earlier hash in its header; the plan does not change, so only the header is rewritten."""
    from flexdit_bundle.engine_header import read_header, write_engine

    header, offset = read_header(path)
    plan = path.read_bytes()[offset:]
    write_engine(path, {**header, "source_sha256": artifact["source_sha256"]}, plan)
    artifact["sha256"], artifact["bytes"] = sha256_file(path), path.stat().st_size
