"""One ONNX Runtime graph for every stage of a precision: the step of ``finalize`` after
``share_weights``.

The stage graphs of one precision are node-for-node the same graph; they differ only in a few
small constants (the pooling table, the reshape targets that carry the token count, the
recovery gather index). A runtime that opens one session per stage pays ONNX Runtime's fixed
per-session cost (parse, graph optimisation, kernel creation, memory planning: tens of ms per
graph) once per stage, which dominates the load time of a small model. This pass writes, per
group of identical stage graphs, one more graph (``stages/shared.<precision>.onnx``) in which
those constants are graph inputs, so a runtime can open one session and feed each stage's
constants with its rows.

Exactness: with the token count no longer static, ONNX Runtime would stop fusing MatMul + Add
into Gemm (its fusion inserts the 2-D reshapes only for known shapes) and the results would
move by ~1e-6. The pass therefore writes those pairs as the explicit Reshape -> Gemm -> Reshape
that the fusion produces on the stage graphs, and then *checks* the result: every stage is run
through its own graph and through the shared graph (CPU provider, the optimisation level the
runtimes use for that precision, recorded in the manifest, random rows) and the shared graph is published only if every output
is bit-identical; otherwise it is left out and the bundle is exactly what it was. The stage
constants are appended to the precision's weight file (tensor table) and each stage artifact
names them (``shared_graph.inputs``); the per-stage graphs stay complete and standalone
(TensorRT, OpenVINO and the C++ runtime read them).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from flexdit_bundle.files import sha256_file
from flexdit_bundle.precision import cpu_optimization_level
from flexdit_bundle.spec import Artifact, Manifest, Stage, WeightTensor

from .share_weights import ALIGNMENT, _dtypes

# A shared graph is checked bit-identical to the stage graphs at the level the runtimes run that
# precision at on the CPU (``cpu_optimization_level``: basic for fp32/fp16, all for int8), and
# may be used only there. (fp32 graphs at `extended`/`all` differ by ~1e-6: other fusions there
# depend on static shapes.) fp8/bf16 ONNX graphs do not run on ONNX Runtime's CPU provider.
PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-static")
VERIFY_THREADS = (1, 2)


def shared_graph_name(precision: str, index: int) -> str:
    return f"stages/shared.{precision}.onnx" if index == 0 else f"stages/shared.{precision}.{index}.onnx"


def _signature(model) -> tuple:
    """The graph without its constants' values: nodes (op, inputs, outputs, attributes), I/O
    names and every initializer's name, type and shape."""
    g = model.graph
    nodes = tuple((n.op_type, n.domain, tuple(n.input), tuple(n.output), tuple(a.SerializeToString() for a in n.attribute))
                  for n in g.node)
    inits = tuple(sorted(t.name for t in g.initializer))
    return nodes, inits, tuple(i.name for i in g.input), tuple(o.name for o in g.output)


def _value(t) -> tuple:
    """Identity of an initializer's contents: external tensors by where they point, inline ones
    by type, shape and bytes."""
    from onnx import TensorProto, numpy_helper

    if t.data_location == TensorProto.EXTERNAL:
        return ("ext", tuple((e.key, e.value) for e in t.external_data))
    a = numpy_helper.to_array(t)
    return ("raw", t.data_type, tuple(a.shape), a.tobytes())


def add_shared_graphs(root, manifest: dict, log=None) -> dict:
    """Write the shared graphs of ``manifest``'s ONNX stage artifacts under ``root`` (after
    ``share_weights``); -> the manifest with ``shared_graphs`` and per-artifact ``shared_graph``.
    Idempotent (a published bundle is finalized again by ``flexdit-export engines``): earlier
    shared graphs are removed and rebuilt from the stage graphs, and stage constants the weight
    file already holds are not stored again."""
    import onnx

    root = Path(root)
    for old in manifest.pop("shared_graphs", None) or []:
        (root / old["path"]).unlink(missing_ok=True)
    for st in manifest["stages"]:
        for a in st["artifacts"]:
            a.pop("shared_graph", None)
    files = {w["id"]: w for w in manifest.get("weights") or []}
    groups = defaultdict(list)  # (precision, signature) -> [(stage, artifact, model)]
    for st in manifest["stages"]:
        for a in st["artifacts"]:
            if a["backend"] != "onnx" or a["precision"] not in PRECISIONS or "weights" not in a:
                continue
            if a["weights"]["file"] not in files or "external_data" in a:
                continue
            m = onnx.load(str(root / a["path"]), load_external_data=False)
            groups[(a["precision"], _signature(m))].append((st, a, m))
    entries = []
    per_precision = defaultdict(int)
    for (prec, _), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[1][0][0]["id"])):
        if len(members) < 2:
            continue
        made = _build(members)
        if made is None:
            continue
        model, inputs, values = made
        rel = shared_graph_name(prec, per_precision[prec])
        path = root / rel
        onnx.save(model, str(path))
        digest = sha256_file(path)
        diff = _verify(root, path, [(Stage.from_json(st), Artifact.from_json(a)) for st, a, _ in members], values)
        if diff is not None:
            path.unlink()
            if log:
                log(f"note: no shared {prec} graph for stages {[st['id'] for st, _, _ in members]}: {diff}")
            continue
        per_precision[prec] += 1
        first = members[0][1]
        kept = {t.name for t in model.graph.initializer}
        gid = rel.removeprefix("stages/").removesuffix(".onnx")
        entries.append({"id": gid, "precision": prec, "path": rel, "sha256": digest,
                        "bytes": path.stat().st_size, **({"opset": first["opset"]} if "opset" in first else {}),
                        "stages": [st["id"] for st, _, _ in members], "stage_inputs": inputs,
                        "verified": {"graph_optimization": cpu_optimization_level(prec), "threads": list(VERIFY_THREADS),
                                     "onnxruntime": _ort_version()},
                        "weights": {"file": first["weights"]["file"],
                                    "bindings": {k: v for k, v in first["weights"]["bindings"].items() if k in kept}}})
        indices = _append_tensors(root, files[first["weights"]["file"]], values)
        for (_, a, _), idx in zip(members, indices):
            a["shared_graph"] = {"id": gid, "inputs": idx}
    if entries:
        manifest["shared_graphs"] = entries
    return manifest


def _build(members):
    """-> (shared model, stage input names, [{name: array} per member]) or None when the graphs
    differ in anything but inline constants."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    firsts = {t.name: t for t in members[0][2].graph.initializer}
    varying = []
    for name, t in firsts.items():
        vals = [{x.name: x for x in m.graph.initializer}[name] for _, _, m in members]
        if len({_value(v) for v in vals}) > 1:
            if any(v.data_location == TensorProto.EXTERNAL for v in vals):
                return None  # stages bound to different weights: not one graph
            varying.append(name)
    values = [{n: numpy_helper.to_array({x.name: x for x in m.graph.initializer}[n]).copy() for n in varying}
              for _, _, m in members]
    model = onnx.ModelProto()
    model.CopyFrom(members[0][2])
    g = model.graph
    keep = [t for t in g.initializer if t.name not in varying]
    del g.initializer[:]
    g.initializer.extend(keep)
    for name in varying:
        a = values[0][name]
        g.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype),
                                                     [f"{name}.d{k}" for k in range(a.ndim)]))
    del g.value_info[:]  # shapes that held the token count are no longer static
    _explicit_gemm(g)
    return model, varying, values


def _explicit_gemm(g) -> int:
    """MatMul(X, W) + Add(., b) with constant 2-D W and 1-D b -> Reshape(X, [-1, K]) -> Gemm ->
    Reshape back to X's leading dims + [N]: what ONNX Runtime's MatMulAddFusion makes of the
    pair when X's shape is static, written out so it happens with a free token dimension too."""
    from onnx import helper, numpy_helper

    init = {t.name: t for t in g.initializer}
    consumers = defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    outputs = {o.name for o in g.output}
    nodes, fused, count, consts = [], set(), 0, {}

    def const(name, value):
        if name not in consts:
            consts[name] = numpy_helper.from_array(np.array(value, np.int64), name)
        return name

    for n in g.node:
        if id(n) in fused:
            continue
        add = None
        if n.op_type == "MatMul" and not n.domain and n.input[1] in init and len(init[n.input[1]].dims) == 2:
            users = consumers[n.output[0]]
            if len(users) == 1 and users[0].op_type == "Add" and n.output[0] not in outputs:
                other = [i for i in users[0].input if i != n.output[0]]
                if len(other) == 1 and other[0] in init and len(init[other[0]].dims) == 1:
                    add = users[0]
        if add is None:
            nodes.append(n)
            continue
        count += 1
        x, w, b = n.input[0], n.input[1], [i for i in add.input if i != n.output[0]][0]
        k, m = init[w].dims
        p = f"gemm{count}"  # short: the graph is stored in every bundle
        nodes += [
            helper.make_node("Reshape", [x, const(f"gemm.rows.{k}", [-1, k])], [f"{p}.x2"], name=f"{p}.in"),
            helper.make_node("Gemm", [f"{p}.x2", w, b], [f"{p}.y2"], name=n.name),
            helper.make_node("Shape", [x], [f"{p}.shape"], name=f"{p}.shape"),
            helper.make_node("Slice", [f"{p}.shape", const("gemm.zero", [0]), const("gemm.last", [-1])], [f"{p}.lead"],
                             name=f"{p}.lead"),
            helper.make_node("Concat", [f"{p}.lead", const(f"gemm.cols.{m}", [m])], [f"{p}.out_shape"], axis=0,
                             name=f"{p}.out_shape"),
            helper.make_node("Reshape", [f"{p}.y2", f"{p}.out_shape"], list(add.output), name=f"{p}.out"),
        ]
        fused.add(id(add))
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(consts.values())
    return count


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def check_published(root, manifest: Manifest) -> list[dict]:
    """``flexdit-export verify``: run every published shared graph against the stage graphs it
    stands for again (the constants read back from the weight file) -> [{id, stages, ok, why}]."""
    root = Path(root)
    files = {w.id: w for w in manifest.weights or ()}
    out = []
    for g in manifest.shared_graphs or ():
        w = files[g.weights.file]
        members, values = [], []
        for st in manifest.stages:
            for a in st.artifacts:
                if a.shared_graph is not None and a.shared_graph.id == g.id:
                    members.append((st, a))
                    values.append({n: _read_tensor(root / w.path, w.tensors[i])
                                   for n, i in a.shared_graph.inputs.items()})
        why = _verify(root, root / g.path, members, values)
        out.append({"id": g.id, "path": g.path, "stages": [st.id for st, _ in members], "ok": why is None, "why": why})
    return out


def _read_tensor(path: Path, t: WeightTensor) -> np.ndarray:
    with open(path, "rb") as f:
        f.seek(t.offset)
        return np.frombuffer(f.read(t.bytes), dtype=t.dtype).reshape(t.shape).copy()


def _verify(root: Path, shared: Path, members: list[tuple[Stage, Artifact]], values) -> str | None:
    """None when the shared graph gives every member's ((stage, artifact)) outputs bit for bit
    (``values``: each member's stage constants); else why not."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feeds = []
    for st, _ in members:
        f = {}
        for e in st.inputs:
            shape = list(e.shape)
            if e.dtype.startswith("int"):
                f[e.name] = rng.integers(0, 2, shape).astype(e.dtype)
            elif e.name == "t":
                f[e.name] = rng.uniform(st.t_min, st.t_max, shape).astype(e.dtype)
            else:
                f[e.name] = rng.standard_normal(shape).astype(e.dtype)
        feeds.append(f)
    level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[
        cpu_optimization_level(members[0][1].precision)]
    for threads in VERIFY_THREADS:
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 4
        try:
            one = ort.InferenceSession(str(shared), so, providers=["CPUExecutionProvider"])
            for (st, a), f, vals in zip(members, feeds, values):
                own = ort.InferenceSession(str(root / a.path), so, providers=["CPUExecutionProvider"])
                want = own.run(None, f)
                got = one.run(None, {**f, **vals})
                for x, y in zip(want, got):
                    if x.shape != y.shape or not np.array_equal(x, y, equal_nan=True):
                        err = float(np.max(np.abs(x.astype(np.float64) - y))) if x.shape == y.shape else float("nan")
                        return f"stage {st.id} differs from its own graph by {err:.1e} at {threads} thread(s)"
        except Exception as e:  # onnxruntime raises its own types; the stage graphs stay usable
            return f"ONNX Runtime cannot run it ({str(e).splitlines()[0][:200]})"
    return None


def _append_tensors(root: Path, wfile: dict, values: list) -> list:
    """Append the stage constants (``[{name: array}]``) to the weight file, equal contents
    stored once; -> ``[{name: tensor index}]`` in the same order."""
    known = set(_dtypes().values())
    path = root / wfile["path"]
    offset, stored, out = wfile["bytes"], {}, []
    align = wfile.get("alignment", ALIGNMENT)
    wanted = {(str(v.dtype), tuple(v.shape)) for vals in values for v in vals.values()}
    with open(path, "rb") as f:  # constants the file already holds (a second pass) are not stored again
        for i, t in enumerate(wfile["tensors"]):
            if (t["dtype"], tuple(t["shape"])) in wanted:
                f.seek(t["offset"])
                stored.setdefault((t["dtype"], tuple(t["shape"]), f.read(t["bytes"])), i)
    with open(path, "ab") as f:
        for vals in values:
            idx = {}
            for name, value in vals.items():
                if str(value.dtype) not in known:
                    raise ValueError(f"cannot store a {value.dtype} stage constant in a weight file")
                raw = np.ascontiguousarray(value).tobytes()
                key = (str(value.dtype), tuple(value.shape), raw)
                if key not in stored:
                    pad = (-offset) % align
                    f.write(b"\0" * pad + raw)
                    offset += pad
                    stored[key] = len(wfile["tensors"])
                    wfile["tensors"].append({"offset": offset, "bytes": len(raw), "dtype": str(value.dtype),
                                             "shape": [int(d) for d in value.shape]})
                    offset += len(raw)
                idx[name] = stored[key]
            out.append(idx)
    wfile["bytes"], wfile["sha256"] = path.stat().st_size, sha256_file(path)
    return out
