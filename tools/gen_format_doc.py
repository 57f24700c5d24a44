"""Write the manifest field reference of docs/bundle-format.md from flexdit_bundle/manifest.schema.json.

    python3 tools/gen_format_doc.py           # rewrite the generated part of the doc in place
    python3 tools/gen_format_doc.py --check   # exit 1 if the doc is out of date with the schema

Only the text between the BEGIN/END GENERATED markers is written; the prose around it is by
hand. Every field's type, constraints, requirement and description come from the schema (a
field without a ``description`` is an error; ``DESCRIPTIONS`` can stand in for one while a
schema change is being written, and should stay empty).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "flexdit_bundle" / "manifest.schema.json"
DOC = REPO / "docs" / "bundle-format.md"
BEGIN = "<!-- BEGIN GENERATED: manifest field reference (tools/gen_format_doc.py; edit the schema, not this) -->"
END = "<!-- END GENERATED: manifest field reference -->"

# Descriptions of schema nodes that have no ``description`` yet, keyed by the section path the
# reference uses ("model.config.hidden_size", "stages[].t_min", "$defs.artifact.path", ...).
# A schema description always wins; the doc test fails on keys that name no field.
DESCRIPTIONS: dict[str, str] = {}


def _ref_name(ref: str) -> str:
    return ref.split("/")[-1]


def _anchor(section: str) -> str:
    return "field-" + "".join(c if c.isalnum() else "-" for c in section).strip("-").lower()


def _is_object(node: dict) -> bool:
    return isinstance(node, dict) and "properties" in node


def _unwrap(node: dict):
    """The inline object behind a node (itself, an array's items, the non-null branch of a
    oneOf), with the suffix its section path gets, or None."""
    if _is_object(node):
        return node, ""
    if node.get("type") == "array" and _is_object(node.get("items", {})):
        return node["items"], "[]"
    for sub in node.get("oneOf", []):
        got = _unwrap(sub)
        if got:
            return got
    return None


def _type(node: dict) -> str:
    if "$ref" in node:
        name = _ref_name(node["$ref"])
        return f"[{name}](#{_anchor('$defs.' + name)})"
    if "const" in node:
        return f"`{json.dumps(node['const'])}`"
    if "enum" in node:
        return "one of " + ", ".join(f"`{json.dumps(v)}`" for v in node["enum"])
    if "oneOf" in node:
        return " or ".join(_type(s) for s in node["oneOf"])
    t = node.get("type")
    if t == "array":
        items = node.get("items")
        return "array" + (f" of {_type(items)}" if items else "")
    if t == "object" and isinstance(node.get("additionalProperties"), dict) and not node.get("properties"):
        return f"object of {_type(node['additionalProperties'])}"
    if isinstance(t, list):
        return " or ".join(t)
    return t or "any"


def _constraints(node: dict) -> str:
    out = []
    for s in node.get("oneOf", []):
        c = _constraints(s)
        if c:
            out.append(c)
    if "minimum" in node:
        out.append(f">= {node['minimum']}")
    if "exclusiveMinimum" in node:
        out.append(f"> {node['exclusiveMinimum']}")
    if "maximum" in node:
        out.append(f"<= {node['maximum']}")
    if "exclusiveMaximum" in node:
        out.append(f"< {node['exclusiveMaximum']}")
    if "minItems" in node and node.get("minItems") == node.get("maxItems"):
        out.append(f"exactly {node['minItems']} items")
    else:
        if "minItems" in node:
            out.append(f">= {node['minItems']} items")
        if "maxItems" in node:
            out.append(f"<= {node['maxItems']} items")
    if "pattern" in node:
        out.append(f"matches `{node['pattern']}`")
    items = node.get("items")
    if isinstance(items, dict) and not _is_object(items) and "$ref" not in items:
        c = _constraints(items)
        if c:
            out.append(f"items {c}")
    if node.get("type") == "object" and isinstance(node.get("additionalProperties"), dict) and node.get("properties") is None:
        c = _constraints(node["additionalProperties"])
        if c:
            out.append(f"values {c}")
    return "; ".join(out)


class _Seen:
    """What a render went through: every section and field path, the DESCRIPTIONS keys it
    needed (no description in the schema), and the paths described nowhere."""

    def __init__(self):
        self.paths, self.supplied, self.missing = set(), set(), []

    def describe(self, node: dict, path: str) -> str:
        self.paths.add(path)
        if node.get("description"):
            return node["description"]
        if path in DESCRIPTIONS:
            self.supplied.add(path)
            return DESCRIPTIONS[path]
        self.missing.append(path)
        return ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _sections(node: dict, path: str, out: list, seen: _Seen) -> None:
    """Append the section of one object node and, after it, those of its inline sub-objects."""
    rows, subs = [], []
    required = set(node.get("required", []))
    for key, sub in node.get("properties", {}).items():
        sub_path = f"{path}.{key}" if path != "(manifest)" else key
        inner = _unwrap(sub)
        kind = _type(sub)
        if inner:
            target, suffix = inner
            kind = "array of objects" if suffix else kind
            kind += f", see [{sub_path}{suffix}](#{_anchor(sub_path + suffix)})"
            subs.append((target, sub_path + suffix))
        desc = seen.describe(sub, sub_path)
        rows.append(f"| `{key}` | {_cell(kind)} | {'yes' if key in required else 'no'} | "
                    f"{_cell(_constraints(sub))} | {_cell(desc)} |")
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and node.get("properties"):
        rows.append(f"| *(any other key)* | {_cell(_type(extra))} | no | {_cell(_constraints(extra))} | |")
    out.append(f'<a id="{_anchor(path)}"></a>\n#### `{path}`\n')
    out.append(seen.describe(node, path) + "\n")
    out.append("| field | type | required | constraints | meaning |\n|---|---|---|---|---|")
    out.extend(rows)
    out.append("")
    for target, sub_path in subs:
        _sections(target, sub_path, out, seen)


def render(schema: dict) -> tuple[str, _Seen]:
    """-> (generated markdown, what it went through)."""
    seen = _Seen()
    out = [BEGIN, "", f"Generated from `flexdit_bundle/manifest.schema.json` (`{schema.get('$id', '')}`).", "",
           "### Manifest fields", ""]
    _sections(schema, "(manifest)", out, seen)
    out += ["### Shared definitions", ""]
    for name, node in schema.get("$defs", {}).items():
        path = f"$defs.{name}"
        if _is_object(node):
            _sections(node, path, out, seen)
            continue
        out.append(f'<a id="{_anchor(path)}"></a>\n#### `{path}`\n')
        out.append(seen.describe(node, path) + "\n")
        out.append(f"Type: {_type(node)}." + (f" Constraints: {_constraints(node)}." if _constraints(node) else ""))
        out.append("")
    out.append(END)
    return "\n".join(out) + "\n", seen


def splice(doc: str, generated: str) -> str:
    head, sep, rest = doc.partition(BEGIN)
    if not sep or END not in rest:
        raise SystemExit(f"{DOC} has no generated section (markers {BEGIN!r} ... {END!r})")
    tail = rest.partition(END)[2]
    return head + generated.rstrip("\n") + tail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the doc differs from what the schema generates")
    p.add_argument("--missing", action="store_true",
                   help="print, as JSON, the descriptions this script supplies for schema fields that lack one")
    a = p.parse_args(argv)
    generated, seen = render(json.loads(SCHEMA.read_text()))
    if a.missing:
        print(json.dumps({k: DESCRIPTIONS[k] for k in DESCRIPTIONS if k in seen.supplied}, indent=1))
        return 0
    if seen.missing:
        print("fields without a description (add one to the schema): " + ", ".join(seen.missing), file=sys.stderr)
        return 1
    old = DOC.read_text()
    new = splice(old, generated)
    if a.check:
        if new != old:
            print(f"{DOC.relative_to(REPO)} is out of date with the schema: run python3 tools/gen_format_doc.py",
                  file=sys.stderr)
            return 1
        return 0
    if new != old:
        DOC.write_text(new)
        print(f"updated {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
