"""Write the manifest field reference of docs/bundle-format.md from flexdit_bundle/manifest.schema.json.

    python3 tools/gen_format_doc.py           # rewrite the generated part of the doc in place
    python3 tools/gen_format_doc.py --check   # exit 1 if the doc is out of date with the schema

Only the text between the BEGIN/END GENERATED markers is written; the prose around it is by
hand. Every field's type, constraints and requirement come from the schema; its description
from the schema's ``description``, or, for fields whose schema entry has none yet, from
``DESCRIPTIONS`` below (to be moved into the schema; a field with neither is an error).
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
DESCRIPTIONS = {
    "format": "Identifies the file as a bundle manifest and the format version it follows.",
    "format.name": "Always flexdit-bundle; a reader refuses any other value.",
    "format.version": "Format version (integer). This version writes 2; readers accept 1 and 2 and refuse newer versions with a message to upgrade.",
    "created_by": "Provenance: the tool that wrote the bundle and the library versions it used.",
    "created_by.tool": "Name and version of the writer, e.g. 'flexdit-export 0.1.0'.",
    "model": "The network the stage graphs were compiled from.",
    "model.family": "flexdit (Poolingformer, SDTMs, top blocks; token density per stage) or dit (plain DiT blocks; every stage dense).",
    "model.name": "Human-readable model name, e.g. FlexDiT-XL/2 or FlexDiT-C32h2d4/2.",
    "model.config": "Architecture of the network; a runtime reads in_channels and input_size (latent shape) and learn_sigma (output channels) from here.",
    "model.config.hidden_size": "Transformer width C.",
    "model.config.num_heads": "Attention heads.",
    "model.config.patch_size": "Patch size p; the dense token grid is input_size / p per side.",
    "model.config.input_size": "Latent (or pixel) height and width H = W of the sampler state.",
    "model.config.in_channels": "Channels Cin of the sampler state x; the first Cin output channels are eps.",
    "model.config.learn_sigma": "true: the model outputs 2 * Cin channels, the last Cin are the learned-range variance interpolation v.",
    "model.config.num_classes": "Number of real classes (same as model.num_classes).",
    "model.config.depth": "Total transformer blocks.",
    "model.num_classes": "Number of real classes; class labels are 0..num_classes-1.",
    "model.null_class": "The label row used for the unconditional half of classifier-free guidance (num_classes for DiT-style models).",
    "model.class_names": "Class names by label, or null when unknown (prompts are then class ids).",
    "model.source": "Where the weights came from (checkpoint file name, format, notes); informational.",
    "diffusion": "The Gaussian diffusion the model was trained with; the sampler rebuilds its tables from these numbers.",
    "diffusion.num_timesteps": "Training timesteps T; the graphs take original timesteps 0..T-1.",
    "diffusion.beta_schedule": "linear: betas = linspace(beta_start * 1000 / T, beta_end * 1000 / T, T) in float64.",
    "diffusion.beta_start": "First beta of the linear schedule at T = 1000 (scaled by 1000 / T).",
    "diffusion.beta_end": "Last beta of the linear schedule at T = 1000 (scaled by 1000 / T).",
    "diffusion.variance_type": "learned_range: log variance interpolated by the model's v channels between the clipped posterior log variance and log beta (improved DDPM); fixed_large / fixed_small: fixed variances.",
    "diffusion.prediction_type": "epsilon: the first Cin output channels predict the noise.",
    "diffusion.defaults": "What a runtime samples with when the caller does not say (each key optional; absent keys fall back to ddpm, 250 steps, cfg_scale 4, eta 0, no clipping).",
    "diffusion.defaults.sampler": "Default sampler.",
    "diffusion.defaults.steps": "Default number of sampling steps (respaced kept timesteps).",
    "diffusion.defaults.cfg_scale": "Default guidance scale; guidance runs only when it is > 1.",
    "diffusion.defaults.eta": "Default DDIM eta (0: deterministic).",
    "diffusion.defaults.clip_denoised": "Clip the predicted x0 to [-1, 1] at every step (pixel-space models).",
    "stages": "The stage graphs, one per timestep range; together they cover 0..T-1 exactly once.",
    "stages[]": "One stage: the graphs that serve the original timesteps t_min..t_max.",
    "stages[].id": "Stage id; ids are exactly 0..n-1.",
    "stages[].t_min": "Lowest original timestep this stage serves (inclusive).",
    "stages[].t_max": "Highest original timestep this stage serves (inclusive, < T).",
    "stages[].sparse_grid": "Side s of the sparse token grid of the SDTMs in this stage, or null for a dense stage.",
    "stages[].tokens": "Tokens the SDTM semantic blocks run on (s * s, or the dense N for a dense stage); informational.",
    "stages[].batch": "Fixed batch dimension B of every graph input and output of this stage.",
    "stages[].inputs": "Graph inputs in this order: latent x (B, Cin, H, W), timestep t (B,), class label y (B,); bind them by these names and dtypes.",
    "stages[].outputs": "Graph outputs: [model output (B, Cout, H, W)]; read it by this name.",
    "stages[].artifacts": "The files that implement this stage, one per backend and precision.",
    "stages[].parity": "Error of each artifact against the PyTorch stage measured at conversion, keyed 'backend/precision'; informational.",
    "stages[].macs": "Multiply-accumulates of one forward of one batch row; informational.",
    "decoder": "null (the sampler output is the result) or the VAE decoder graph that maps latents to images.",
    "decoder.kind": "sd-vae: the Stable Diffusion VAE decoder.",
    "decoder.scale_factor": "The VAE's latent scale (0.18215 for SD VAEs); the decoder graph divides by it itself, so a runtime passes the final samples unchanged.",
    "decoder.inputs": "Decoder graph inputs: [latent (B, Cin, H, W)], bound by name.",
    "decoder.outputs": "Decoder graph outputs: [image (B, 3, 8H, 8W)] in [-1, 1].",
    "decoder.artifacts": "The decoder graph files, one per backend and precision.",
    "decoder.parity": "Decoder graph error against PyTorch at conversion; informational.",
    "output": "How to turn the final result into images.",
    "output.space": "pixel: the sampler state is the image; latent: no decoder, samples stay in latent space; decoded: images come from the decoder.",
    "output.value_range": "[lo, hi] of the result values that map to pixel 0 and 255.",
    "calibration": "The calibration set that static quantisation used, or null/absent when nothing was calibrated.",
    "$defs.tensor": "A graph input or output.",
    "$defs.tensor.name": "Name of the graph input or output; a runtime binds by this name.",
    "$defs.tensor.shape": "Static shape (every dimension fixed).",
    "$defs.tensor.dtype": "Element type the graph expects or produces.",
    "$defs.artifact": "One file that implements a stage (or the decoder) for one backend and precision.",
    "$defs.artifact.backend": "onnx: an ONNX graph for ONNX Runtime; tensorrt: a wrapped TensorRT plan (engine header); torchscript: a TorchScript module (PyTorch only).",
    "$defs.artifact.precision": "Precision of the graph's computation.",
    "$defs.artifact.path": "File path relative to the bundle directory ('/'-separated, no '..', not absolute; must resolve inside the bundle).",
    "$defs.artifact.sha256": "Lower-case hex sha256 of the file's bytes.",
    "$defs.artifact.bytes": "File size in bytes.",
    "$defs.artifact.opset": "ONNX opset of the graph.",
    "$defs.artifact.external_data": "A per-artifact ONNX external-data file (weights not shared with other stages), checksummed like the graph.",
    "$defs.artifact.external_data.path": "External-data file path relative to the bundle directory, same rules as artifact paths.",
    "$defs.artifact.external_data.sha256": "Lower-case hex sha256 of the external-data file.",
    "$defs.artifact.external_data.bytes": "Size of the external-data file in bytes.",
    "$defs.artifact.optimization": "Offline graph optimisation applied at conversion; informational.",
    "$defs.artifact.optimization.level": "ONNX Runtime optimisation level used offline.",
    "$defs.artifact.optimization.onnxsim": "Whether onnxsim simplified the graph.",
    "$defs.artifact.optimization.nodes_before": "Graph nodes before optimisation.",
    "$defs.artifact.optimization.nodes_after": "Graph nodes after optimisation.",
    "$defs.artifact.quantization": "How an int8 graph was quantised; informational.",
    "$defs.artifact.quantization.mode": "dynamic (int8 weights, activations quantised at run time) or static-qdq (QuantizeLinear/DequantizeLinear pairs with calibrated scales).",
    "$defs.artifact.quantization.calibration_sha256": "sha256 of the calibration set the static scales came from.",
    "$defs.artifact.quantization.op_types": "Operator types that were quantised.",
    "$defs.artifact.quantization.include": "Node names quantised by explicit request.",
    "$defs.artifact.quantization.exclude": "Node names kept in float.",
    "$defs.artifact.check.status": "passed: executed and compared at conversion; built-not-run: built, never executed here.",
    "$defs.artifact.check.by": "What ran the check (e.g. onnxruntime CPU, TensorRT).",
    "$defs.artifact.check.reason": "Why the artifact was not run (built-not-run).",
    "$defs.artifact.tensorrt": "TensorRT engines: what the plan was built for; the engine file's own header must agree.",
    "$defs.artifact.tensorrt.tensorrt_version": "TensorRT version that built the plan; a plan runs only with that version.",
    "$defs.artifact.tensorrt.compute_capability": "GPU compute capability the plan was built for, e.g. '8.9'.",
    "$defs.artifact.tensorrt.cache_key": "Key of the engine cache entry (hash of the source graph and build settings).",
    "$defs.artifact.tensorrt.strongly_typed": "Whether the network was built strongly typed (precision taken from the graph's QDQ/casts).",
    "$defs.artifact.weights.file": "id of the shared weight file (an entry of the manifest's weights) that holds this graph's initializers.",
    "$defs.artifact.weights.bindings": "ONNX initializer name -> index into that file's tensors.",
    "$defs.precision": "Precision names; int8 is an alias of the backend's default int8 form (int8-dynamic for ONNX Runtime, int8-static for TensorRT).",
    "$defs.calibration": "A calibration set: real stage inputs captured from denoising trajectories at each stage's own timesteps.",
    "$defs.calibration.method": "Static quantisation calibration method (e.g. minmax, entropy, percentile).",
    "$defs.calibration.settings": "Sampler settings and sizes that produced the set; informational.",
    "$defs.calibration.stages": "Rows captured per stage.",
    "$defs.calibration.stages[]": "The calibration rows of one stage.",
    "$defs.calibration.stages[].id": "Stage id.",
    "$defs.calibration.stages[].t_values": "Original timesteps the stage's rows were captured at.",
    "$defs.calibration.stages[].calib_rows": "Rows used to calibrate.",
    "$defs.calibration.stages[].holdout_rows": "Rows held out to measure the quantisation error.",
    "$defs.weight_file.path": "File path relative to the bundle directory (stages/weights.<precision>.bin), same rules as artifact paths.",
    "$defs.weight_file.sha256": "Lower-case hex sha256 of the whole file.",
    "$defs.weight_file.bytes": "File size in bytes.",
    "$defs.weight_file.tensors": "The tensors stored in the file, by index (bindings refer to these indices).",
    "$defs.weight_tensor": "One raw tensor inside a shared weight file: little-endian, C order, no header.",
    "$defs.weight_tensor.offset": "Byte offset of the tensor in the file; a multiple of the file's alignment.",
    "$defs.weight_tensor.bytes": "Byte length; equals the element size of dtype times the product of shape, and offset + bytes <= the file's bytes.",
    "$defs.weight_tensor.dtype": "Element type.",
    "$defs.weight_tensor.shape": "Dimensions (empty for a scalar).",
}


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
