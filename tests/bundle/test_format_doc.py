"""docs/bundle-format.md: its field reference is what tools/gen_format_doc.py generates from the
schema (regenerating gives the same text), every field is described, and the prose names the
format version, precisions and engine magic the code uses."""

import copy
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

from flexdit_bundle import FORMAT_VERSION
from flexdit_bundle.engine_header import MAGIC
from flexdit_bundle.manifest import READABLE_VERSIONS, schema
from flexdit_bundle.precision import ALIASES, PRECISIONS

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "bundle-format.md"


def _gen():
    spec = importlib.util.spec_from_file_location("gen_format_doc", REPO / "tools" / "gen_format_doc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_doc_field_reference_is_generated_from_the_schema():
    gen = _gen()
    doc = DOC.read_text()
    text, seen = gen.render(schema())
    assert gen.splice(doc, text) == doc, "docs/bundle-format.md is out of date: run python3 tools/gen_format_doc.py"
    assert seen.missing == [], f"fields without a description: {seen.missing}"
    assert set(gen.DESCRIPTIONS) <= seen.paths, f"descriptions for fields that do not exist: {set(gen.DESCRIPTIONS) - seen.paths}"
    assert subprocess.run([sys.executable, str(REPO / "tools" / "gen_format_doc.py"), "--check"]).returncode == 0


def test_a_schema_change_makes_the_doc_stale():
    gen = _gen()
    doc = DOC.read_text()
    s = copy.deepcopy(schema())
    s["properties"]["diffusion"]["properties"]["foo_steps"] = {"type": "integer", "minimum": 3, "description": "bar"}
    text, seen = gen.render(s)
    assert "| `foo_steps` | integer | no | >= 3 | bar |" in text
    assert gen.splice(doc, text) != doc
    s["$defs"]["tensor"]["properties"]["undocumented"] = {"type": "string"}
    assert gen.render(s)[1].missing == ["$defs.tensor.undocumented"]
    s["$defs"]["tensor"]["required"].append("layout")
    assert "| `name` | string | yes |" in gen.render(s)[0]


def test_every_schema_property_has_a_row():
    text, _ = _gen().render(schema())

    def walk(node):
        if isinstance(node, dict):
            for key, sub in node.get("properties", {}).items():
                yield key
                yield from walk(sub)
            for k in ("items", "additionalProperties"):
                yield from walk(node.get(k))
            for sub in node.get("oneOf", []):
                yield from walk(sub)
            for sub in node.get("$defs", {}).values():
                yield from walk(sub)

    for key in set(walk(schema())):
        assert f"| `{key}` |" in text, key


def test_prose_matches_the_code():
    doc = DOC.read_text()
    assert f"(version {FORMAT_VERSION})" in doc.splitlines()[0]
    for v in READABLE_VERSIONS:
        assert re.search(rf"^- \*\*{v}\*\*", doc, re.M), f"format version {v} is not described"
    section = doc.split("## 8. Precision grammar")[1].split("## 9.")[0]
    for name in PRECISIONS + tuple(ALIASES):
        assert f"`{name}`" in section, name
    assert json.dumps(MAGIC.decode()).strip('"') in doc and "uint32 little-endian" in doc
