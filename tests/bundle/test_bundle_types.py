"""The typed bundle model (flexdit_bundle.spec): it and the manifest schema cannot drift apart, and
every manifest the project reads or writes survives from_json -> to_json unchanged, byte for byte."""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import onnx
import pytest

from flexdit_bundle import load_bundle, spec
from flexdit_bundle.files import sha256_file
from flexdit_bundle.manifest import schema
from flexdit_bundle.spec import OBJ, Manifest, Node, Seq, field_kind, is_nullable, is_required

CONFORMANCE = Path(__file__).resolve().parents[2] / "flexdit_bundle" / "conformance"
TINY = CONFORMANCE / "tiny-bundle"


def _resolve(node: dict, root: dict) -> dict:
    while "$ref" in node:
        target = root
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = target
    return node


def _unwrap(node: dict, root: dict) -> tuple[dict, bool]:
    """A property's schema without its null alternative, and whether null is allowed."""
    node = _resolve(node, root)
    if "oneOf" in node:
        forms = [_resolve(f, root) for f in node["oneOf"]]
        rest = [f for f in forms if f.get("type") != "null"]
        assert len(rest) == 1, node
        return rest[0], len(rest) < len(forms)
    types = node.get("type")
    if isinstance(types, list):
        rest = [t for t in types if t != "null"]
        assert len(rest) == 1, node
        return {**node, "type": rest[0]}, "null" in types
    return node, False


def _is_object(node: dict) -> bool:
    return node.get("type") == "object" or "properties" in node


def _check(cls, node: dict, root: dict, where: str, seen: set) -> None:
    seen.add(cls)
    props = node.get("properties", {})
    assert set(cls.props()) == set(props), f"{where}: {cls.__name__} fields differ from the schema's properties"
    for name, sub in props.items():
        at = f"{where}.{name}"
        assert is_required(cls, name) == (name in node.get("required", [])), f"{at}: required differs"
        sub, nullable = _unwrap(sub, root)
        assert is_nullable(cls, name) == nullable, f"{at}: nullable differs"
        kind = field_kind(cls, name)
        if _is_object(sub) and sub.get("properties"):
            assert isinstance(kind, type) and issubclass(kind, Node), f"{at}: the schema has an object with properties"
            _check(kind, sub, root, at, seen)
        elif _is_object(sub):
            assert kind == OBJ, f"{at}: a free-form object in the schema"
        elif sub.get("type") == "array":
            assert isinstance(kind, Seq), f"{at}: an array in the schema"
            items, _ = _unwrap(sub["items"], root)
            if _is_object(items) and items.get("properties"):
                assert isinstance(kind.item, type) and issubclass(kind.item, Node), f"{at}: array of objects"
                _check(kind.item, items, root, f"{at}[]", seen)
            else:
                assert kind.item is None, f"{at}: array of scalars"
        else:
            assert kind is None, f"{at}: a scalar in the schema"


def test_schema_objects_and_dataclasses_agree():
    root = schema()
    seen = set()
    _check(Manifest, root, root, "manifest", seen)
    every = {c for c in vars(spec).values() if isinstance(c, type) and issubclass(c, Node) and c is not Node}
    assert every == seen, f"types the schema does not describe: {sorted(c.__name__ for c in every - seen)}"


def _round_trip(manifest_file: Path) -> Manifest:
    text = manifest_file.read_text()
    d = json.loads(text)
    m = Manifest.from_json(d)
    assert m.to_json() == d
    assert json.dumps(m.to_json(), indent=2) + "\n" == text, "key order or layout changed"
    assert Manifest.from_json(m.to_json()) == m
    return m


def _vector_bundles() -> set:
    found = set()
    for f in (CONFORMANCE / "vectors").rglob("*.json"):
        doc = json.loads(f.read_text())
        if isinstance(doc, dict) and "bundle" in doc:
            found.add((f.parent / doc["bundle"]).resolve())
    return found


def test_round_trip_of_the_conformance_bundles():
    bundles = _vector_bundles()
    assert TINY.resolve() in bundles
    for b in bundles:
        _round_trip(b / "manifest.json")
        assert load_bundle(b).manifest.to_json() == json.loads((b / "manifest.json").read_text())


def test_round_trip_of_a_fresh_conversion(flex_bundle):
    m = _round_trip(flex_bundle / "manifest.json")
    b = load_bundle(flex_bundle)
    assert b.manifest == m
    # the typed reads agree with the JSON they came from
    d = json.loads((flex_bundle / "manifest.json").read_text())
    assert [st.batch for st in b.stages] == [st["batch"] for st in d["stages"]]
    assert [a.path for a in b.all_files()] == [a["path"] for a in _json_files(d)]


def _json_files(d: dict):
    yield from d.get("weights") or []
    yield from d.get("shared_graphs") or []
    for entry in d["stages"] + ([d["decoder"]] if d["decoder"] else []):
        for a in entry["artifacts"]:
            yield a
            if "external_data" in a:
                yield a["external_data"]


def test_absent_stays_absent_and_extras_stay_in_place():
    d = json.loads((TINY / "manifest.json").read_text())
    d["calibration"] = None
    d["stages"][0]["artifacts"][0] = {"note": 1, **d["stages"][0]["artifacts"][0], "error": {"rel_rms": 0.5}}
    d["model"]["config"]["depth_extra"] = [1, 2]
    m = Manifest.from_json(d)
    out = m.to_json()
    assert out == d and list(out) == list(d) and out["calibration"] is None and "quality" not in out
    assert list(out["stages"][0]["artifacts"][0]) == list(d["stages"][0]["artifacts"][0])
    a = m.stages[0].artifacts[0]
    assert a.extra == {"note": 1} and a.error.extra == {"rel_rms": 0.5} and a.error.measured_on is None
    assert m.model.config.extra["depth_extra"] == [1, 2]
    out["stages"][0]["batch"] = 99
    out["model"]["config"]["depth_extra"].append(3)
    assert m.to_json() == d, "to_json hands out copies"
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.stages[0].batch = 3


def test_built_in_code_writes_fields_in_schema_order_and_leaves_none_out():
    st = spec.TensorSpec(name="x", shape=(2, 4, 8, 8), dtype="float32")
    assert st.to_json() == {"name": "x", "shape": [2, 4, 8, 8], "dtype": "float32"}
    a = spec.Artifact(backend="onnx", precision="fp32", path="stages/a.onnx", sha256="0" * 64, bytes=3)
    assert list(a.to_json()) == ["backend", "precision", "path", "sha256", "bytes"]
    d = dataclasses.replace(Manifest.from_json(json.loads((TINY / "manifest.json").read_text())), shared_graphs=None)
    assert "shared_graphs" not in d.to_json()


def test_typed_nodes_refuse_dict_reads():
    """The manifest is read by attribute only: a node is no mapping, and equals no dict."""
    m = load_bundle(TINY).manifest
    st = m.stages[0]
    for node in (m, st, st.inputs[0], st.artifacts[0], m.model.config):
        with pytest.raises(TypeError):
            node["id"]
        with pytest.raises(TypeError):
            "id" in node
        with pytest.raises(TypeError):
            dict(node)
        assert not any(hasattr(node, name) for name in ("get", "keys", "items", "values"))
    assert st.inputs[0] != st.inputs[0].to_json() and st.inputs[0] == spec.TensorSpec.from_json(st.inputs[0].to_json())


# Where outside the contract package Python reads a manifest by key: on a loaded bundle, through
# the accessors that hand out typed entries, or on variables named the way the code names manifest
# stages and artifacts (with keys only those carry, so the calibration set's and the plan's stage
# dicts, which share t_min/t_max/sparse_grid, do not count). Assignments into JSON being assembled
# for ``finalize`` are writes, not reads.
_STAGE_KEYS = "artifacts|batch|inputs|outputs|default_precision|parity|macs|tokens"
_ARTIFACT_KEYS = ("backend|precision|path|sha256|bytes|opset|external_data|source_sha256|optimization|fp32_islands|"
                  "quantization|error|check|tensorrt|aoti|weights|shared_graph")
_TYPED_PARTS = ("model|diffusion|decoder|model\\.config|diffusion\\.defaults|sampling_defaults|created_by|calibration|"
                "external_data|optimization|quantization|tensorrt|aoti|compat|shared_graph|verified")
_Q = "[\"']"
MANIFEST_KEY_READS = {
    "the manifest read by key": r"\.manifest(\[|\.(get|keys|items)\()",
    "a stage, artifact or tensor of the bundle read by key":
        rf"\.(stages|artifacts|inputs|outputs|graph_entries|weights|shared_graphs)\[[^\[\]]*\]\[{_Q}",
    "stage_for's or artifact()'s entry read by key": rf"\b(stage_for|artifact)\([^()]*\)\[{_Q}",
    "a typed part read by key": rf"\.({_TYPED_PARTS})(\[{_Q}|\.get\({_Q})",
    "a stage read by key": rf"\b(st|stage)(\[{_Q}({_STAGE_KEYS}){_Q}\]|\.get\({_Q}({_STAGE_KEYS}){_Q})",
    "an artifact read by key": rf"\b(a|art|artifact)(\[{_Q}({_ARTIFACT_KEYS}){_Q}\]|\.get\({_Q}({_ARTIFACT_KEYS}){_Q})",
}
_WRITE = re.compile(r"\s*(,\s*[\w.]+\[[^\[\]]*\]\s*)*=(?!=)")


def manifest_key_reads(text: str) -> list[str]:
    """``line: what`` for each read of a manifest by key in Python source ``text``."""
    found = []
    for i, line in enumerate(text.splitlines(), 1):
        code = line.split("#")[0]
        for what, pattern in MANIFEST_KEY_READS.items():
            if any(not _WRITE.match(code, m.end()) for m in re.finditer(pattern, code)):
                found.append(f"{i}: {what}: {line.strip()}")
    return found


def test_key_reads_pattern_catches_what_it_should():
    reads = ['m = bundle.manifest["stages"]', "w = b.manifest.get('weights')", 'x = b.stages[0]["artifacts"]',
             'sid = b.stage_for(t)["id"]', 'cfg = b.model["config"]', 'n = bundle.model.config["depth"]',
             'if st["batch"] > 2:', 'p = a["backend"] == "onnx"', "f = art.get('weights')", 'c = artifact["aoti"]',
             'k = a.aoti["compat"]']
    legit = ['a["sha256"], a["bytes"] = digest, size', 'st = {"id": 0, "t_min": 0}', 'lo = st["t_min"]',
             'sid = st["id"]', 'v = opts.defaults["sampler"]', 'n = self.config.get("latent_channels", 4)',
             'ts = x["t_values"]', 'a = args["bundle"]', 'if a["status"] == 200:', 'p = bundle.artifact(st).path',
             'a["external_data"] = {"path": p}', '    # st["batch"] in a comment']
    assert [bool(manifest_key_reads(s)) for s in reads] == [True] * len(reads)
    assert [s for s in legit if manifest_key_reads(s)] == []


# The compiler's passes over the manifest JSON its builders assembled, before finalize parses it
# into the typed Manifest once: the serialised form, on purpose.
ASSEMBLED_JSON = {"flexdit_export/share_weights.py", "flexdit_export/shared_graph.py",
                  "flexdit_export/manifest_builder.py"}


def test_no_manifest_key_reads_outside_the_contract():
    """The compiler, runtimes, server, examples, benchmarks and tools read the typed manifest by
    attribute; JSON edits of a manifest file are for tests (and the C++ runtime's tests)."""
    root = Path(__file__).resolve().parents[2]
    found, assembled = [], set()
    for top in ("flexdit_export", "runtimes/python", "examples", "benchmarks", "tools"):
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root)
            if "tests" in rel.parts or any(p.startswith(("build", ".")) for p in rel.parts):
                continue
            hits = manifest_key_reads(path.read_text())
            if rel.as_posix() in ASSEMBLED_JSON:
                assembled |= {rel.as_posix()} if hits else set()
            else:
                found += [f"{rel}:{hit}" for hit in hits]
    assert found == [], "manifest read by key (use the typed attributes):\n" + "\n".join(found)
    assert assembled == ASSEMBLED_JSON, "no longer reads the assembled JSON by key: drop it from ASSEMBLED_JSON"


def test_a_v1_manifest_loads(tmp_path):
    """Format v1: every graph self-contained, no weights or shared graphs; it loads as it is and
    writes back without the v2 keys."""
    root = tmp_path / "v1"
    shutil.copytree(TINY, root)
    m = json.loads((root / "manifest.json").read_text())
    for st in m["stages"]:
        for a in st["artifacts"]:
            path = root / a["path"]
            onnx.save(onnx.load(str(path)), str(path))  # external data read in
            a.pop("weights")
            a.pop("shared_graph", None)
            a["sha256"], a["bytes"] = sha256_file(path), path.stat().st_size
    for w in m.pop("weights") + m.pop("shared_graphs"):
        (root / w["path"]).unlink()
    m["format"]["version"] = 1
    (root / "manifest.json").write_text(json.dumps(m))
    b = load_bundle(root)
    assert b.manifest.format.version == 1 and b.manifest.weights is None and b.manifest.shared_graphs is None
    assert b.weight_files == {} and b.shared_graphs == {}
    assert all(a.weights is None for st in b.stages for a in st.artifacts)
    assert b.manifest.to_json() == m
