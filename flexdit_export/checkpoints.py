"""Read DiT / FlexDiT checkpoints in every format the spec names and infer their layout.

Formats: the reference training dict {model, ema, opt, args} (ema is used), bare state_dicts
(FlexDiT or official DiT), and the project's own directory (``model.safetensors`` +
``config.json``). Pickles are loaded with ``weights_only=True``; only argparse.Namespace is
allow-listed, because reference checkpoints store their training arguments in one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .model import SIZES, ConfigError, ModelConfig, build_model

PROJECT_FORMAT = "flexdit-checkpoint"
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"

# Released FlexDiT layouts (spec section 2): poolingformer, SDTMs, group, top blocks.
LAYOUT_PRESETS = {
    "256": (1, 4, [1, 3, 1, 1], 3),
    "512": (2, 4, [1, 3, 1, 1], 2),
    "default": (2, 4, [2, 2, 1, 1], 2),
}


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: dict
    source_format: str
    class_names: list | None = None
    notes: list = field(default_factory=list)
    sampling_defaults: dict = field(default_factory=dict)  # from the project format's config.json
    trained_schedule: str | None = None  # the schedule the model was trained with, if recorded

    def build(self):
        """The PyTorch model in eval mode with these weights (strict load)."""
        model = build_model(self.config)
        try:
            missing, unexpected = model.load_state_dict(self.state_dict, strict=False)
        except RuntimeError as e:  # shape mismatches
            detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
            raise UserError(f"checkpoint does not fit the {self.config.name} layout: {detail[:300]}") from None
        if missing or unexpected:
            detail = []
            if missing:
                detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
            if unexpected:
                detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
            raise UserError(f"checkpoint does not fit the {self.config.name} layout: keys " + ", ".join(detail))
        return model.eval()


def check_model_overrides(num_heads, semantic_size) -> None:
    """--num-heads / --semantic-size, when given, are positive integers (0 was silently ignored)."""
    for flag, v in (("--num-heads", num_heads), ("--semantic-size", semantic_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise UserError(f"{flag} must be a positive integer, got {v}")


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PICKLE_HINT = ("flexdit-export never runs code from a checkpoint (it loads with weights_only=True): save the "
                "weights as a state_dict (torch.save(model.state_dict(), PATH)) or as .safetensors")


def sniff(path: Path) -> str | None:
    """What a file that is not a readable checkpoint is, from its first bytes (None: unknown)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None  # a torch zip archive or a pickle: let torch say what is wrong
    if head.startswith((b"\x89HDF", b"\x89PNG", b"%PDF", b"\x1f\x8b")):
        return "not a PyTorch checkpoint (" + {b"\x89H": "HDF5", b"\x89P": "a PNG image", b"%P": "a PDF",
                                                b"\x1f\x8b": "gzip-compressed"}[head[:2]] + ")"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text.lstrip().startswith(("{", "[")):
        return "a JSON/text file, not a checkpoint"
    return "a text file, not a checkpoint"


def _torch_load(path: Path):
    kind = sniff(path)
    if kind is not None:
        raise UserError(f"cannot read checkpoint {path}: it is {kind} (expected a .pt/.pth file written by "
                        "torch.save, a .safetensors file or a project checkpoint directory)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors, truncated zips, foreign pickles
        raise UserError(f"cannot read checkpoint {path}: {_load_error(e)}") from None


def _load_error(e: Exception) -> str:
    """torch's message in one clean sentence: no ANSI codes, no advice to disable the safety."""
    text = _ANSI.sub("", str(e)).strip()
    if "Weights only load failed" in text or "weights_only" in text:
        m = re.search(r"unsupported (?:global:? )?GLOBAL ([\w.]+)", text, re.I) or re.search(r"Unsupported operand (\d+)", text)
        what = f"it needs {m.group(1)}" if m and not m.group(1).isdigit() else "it needs objects other than tensors"
        return f"the file is a pickle that tensors-only loading refuses ({what}); {_PICKLE_HINT}"
    first = text.splitlines()[0] if text else type(e).__name__
    if isinstance(e, (EOFError,)) or "Ran out of input" in first or "failed finding central directory" in first:
        return f"the file is truncated or not a PyTorch checkpoint ({first[:200]})"
    return first[:300]


def _unwrap(obj, path) -> tuple[dict, dict, str]:
    """-> (state_dict, training args as dict, format name)."""
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state_dict or training checkpoint")
    args = {}
    fmt = "state_dict"
    if "ema" in obj or "model" in obj:
        sd = obj.get("ema") if isinstance(obj.get("ema"), dict) else obj.get("model")
        fmt = "reference-training(ema)" if isinstance(obj.get("ema"), dict) else "reference-training(model)"
        a = obj.get("args")
        if isinstance(a, argparse.Namespace):
            args = vars(a)
        elif isinstance(a, dict):
            args = a
    else:
        sd = obj
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} does not contain a state_dict of tensors")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if all(k.startswith("_orig_mod.") for k in sd):
        sd = {k[len("_orig_mod."):]: v for k, v in sd.items()}
    return sd, args, fmt


def _count(sd, pattern) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(idx) + 1 if idx else 0


def infer_config(sd: dict, args: dict | None = None, **overrides) -> ModelConfig:
    """Read the architecture from the keys and shapes; ``args`` (training Namespace) and
    ``overrides`` (CLI flags, None = not given) fill what shapes cannot tell (heads, s)."""
    args = args or {}
    need = ["x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise UserError(f"not a DiT/FlexDiT checkpoint: missing {', '.join(missing)}")
    pw = sd["x_embedder.proj.weight"]
    if pw.ndim != 4 or pw.shape[2] != pw.shape[3]:
        raise UserError(f"not a DiT/FlexDiT checkpoint: x_embedder.proj.weight has shape {tuple(pw.shape)}")
    C, cin, p = int(pw.shape[0]), int(pw.shape[1]), int(pw.shape[2])
    n_tok = int(sd["pos_embed"].shape[1])
    grid = math.isqrt(n_tok)
    if grid * grid != n_tok or sd["pos_embed"].shape[-1] != C:
        raise UserError(f"pos_embed shape {tuple(sd['pos_embed'].shape)} is not a square grid of width {C}")
    out = int(sd["final_layer.linear.weight"].shape[0]) // (p * p)
    if out not in (cin, 2 * cin):
        raise UserError(f"final layer gives {out} channels for {cin} input channels (expected {cin} or {2 * cin})")
    has_flex = any(k.startswith(("poolingformer_blocks.", "dumbbell_blocks.", "normal_blocks.")) for k in sd)
    has_dit = any(k.startswith("blocks.") for k in sd)
    if has_flex == has_dit:
        raise UserError("not a DiT/FlexDiT checkpoint: found neither `blocks.*` (DiT) nor FlexDiT block keys"
                        if not has_flex else "checkpoint mixes DiT `blocks.*` and FlexDiT block keys")
    fc1 = next(v for k, v in sd.items() if k.endswith("mlp.fc1.weight"))
    heads = overrides.get("num_heads") or _heads_from_args(args, C) or _default_heads(C)
    common = dict(hidden_size=C, num_heads=int(heads), patch_size=p, input_size=grid * p, in_channels=cin,
                  learn_sigma=out == 2 * cin, num_classes=int(sd["y_embedder.embedding_table.weight"].shape[0]) - 1,
                  mlp_ratio=float(fc1.shape[0]) / C)
    try:
        if has_dit:
            return ModelConfig(family="dit", depth=_count(sd, r"blocks\.(\d+)\."), **common)
        npf = _count(sd, r"poolingformer_blocks\.(\d+)\.")
        nd = _count(sd, r"dumbbell_blocks\.(\d+)\.")
        groups = {tuple(_count(sd, rf"dumbbell_blocks\.{d}\.{kind}\.(\d+)\.") for kind in
                        ("token_merge_blocks", "semantic_blocks", "token_recover_blocks", "normal_blocks"))
                  for d in range(nd)}
        if len(groups) > 1:
            raise UserError(f"SDTMs have different block groups {sorted(groups)}; one group is supported")
        group = list(groups.pop()) if groups else [0, 0, 0, 0]
        ntop = _count(sd, r"normal_blocks\.(\d+)\.")
        s = overrides.get("semantic_size") or args.get("semantic_size") or min(8, grid)
        return ModelConfig(family="flexdit", depth=npf + nd * sum(group) + ntop, num_poolingformer=npf,
                           num_dumbbell=nd, dumbbell_group=group, num_normal_block=ntop, semantic_size=int(s), **common)
    except ConfigError as e:
        raise UserError(f"checkpoint layout is invalid: {e}") from None


def _width(sd: dict) -> int:
    w = sd.get("x_embedder.proj.weight")
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.ndim >= 1 else 0


def _heads_from_args(args, C: int) -> int | None:
    """Heads of the size named in the training args ('DiT-XL/2'), if its width matches."""
    m = re.match(r"(?:Flex)?DiT-(XL|L|B|S)/\d+", str(args.get("model", "")))
    return SIZES[m.group(1)][1] if m and SIZES[m.group(1)][0] == C else None


def _default_heads(C: int) -> int:
    for c, h, _ in SIZES.values():
        if c == C:
            return h
    return max(1, C // 64) if C % 64 == 0 else 1


def init_flexdit_from_dit(dit_sd: dict, dit_cfg: ModelConfig, layout: str, semantic_size: int | None = None):
    """FlexDiT state_dict whose block k takes DiT ``blocks.k`` (spec section 4): q = qkv rows
    [0, C), kv = rows [C, 3C), Poolingformer v = rows [2C, 3C); merged layers keep their init."""
    npf, nd, group, ntop = parse_layout(layout)
    try:
        cfg = ModelConfig(**{**dit_cfg.to_dict(), "family": "flexdit", "num_poolingformer": npf, "num_dumbbell": nd,
                             "dumbbell_group": group, "num_normal_block": ntop,
                             "semantic_size": semantic_size or min(8, dit_cfg.grid)})
    except ConfigError as e:
        raise UserError(f"--init-from-dit layout {layout!r}: {e}") from None
    template = build_model(cfg).state_dict()
    out = {k: v for k, v in dit_sd.items() if not k.startswith("blocks.")}
    C = cfg.hidden_size
    for k, prefix in enumerate(cfg.block_order()):
        src = f"blocks.{k}"
        for name in [n for n in template if n.startswith(prefix + ".")]:
            leaf = name[len(prefix) + 1:]
            if leaf.startswith("merged_layer"):
                out[name] = template[name]
            elif leaf.startswith("attn.q."):
                out[name] = dit_sd[f"{src}.attn.qkv.{leaf.split('.')[-1]}"][:C]
            elif leaf.startswith("attn.kv."):
                out[name] = dit_sd[f"{src}.attn.qkv.{leaf.split('.')[-1]}"][C:3 * C]
            elif leaf.startswith("attn.v."):
                out[name] = dit_sd[f"{src}.attn.qkv.{leaf.split('.')[-1]}"][2 * C:3 * C]
            else:
                out[name] = dit_sd[f"{src}.{leaf}"]
    return cfg, out


def parse_layout(text: str):
    """'256' / '512' / 'default' or 'P/DxG0,G1,G2,G3/T', e.g. '1/4x1,3,1,1/3'."""
    if text in LAYOUT_PRESETS:
        return LAYOUT_PRESETS[text]
    m = re.fullmatch(r"(\d+)/(\d+)x(\d+),(\d+),(\d+),(\d+)/(\d+)", text.strip())
    if not m:
        raise UserError(f"layout {text!r} is not one of {sorted(LAYOUT_PRESETS)} or P/DxG0,G1,G2,G3/T (e.g. 1/4x1,3,1,1/3)")
    v = [int(g) for g in m.groups()]
    return v[0], v[1], v[2:6], v[6]


def load_checkpoint(path, num_heads=None, semantic_size=None, init_from_dit: str | None = None,
                    fallback: dict | None = None) -> Checkpoint:
    """Load any supported checkpoint. ``init_from_dit`` (a layout) turns a DiT into a FlexDiT.
    ``num_heads``/``semantic_size`` are the user's flags: refused where they contradict what a
    project checkpoint records. ``fallback`` ({num_heads, semantic_size}) fills only what the
    checkpoint does not record (verify: the bundle's values)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    check_model_overrides(num_heads, semantic_size)
    fallback = fallback or {}
    overrides = {"num_heads": num_heads, "semantic_size": semantic_size,
                 "fallback_heads": fallback.get("num_heads"), "fallback_semantic": fallback.get("semantic_size")}
    class_names, notes, defaults, schedule = None, [], {}, None
    if path.is_dir() or path.suffix == ".safetensors" or path.name == CONFIG_FILE:
        sd, cfg, class_names, defaults, schedule, fmt = _load_project(path, overrides)
    else:
        if not os.access(path, os.R_OK):
            raise UserError(f"checkpoint is not readable: {path}")
        sd, args, fmt = _unwrap(_torch_load(path), path)
        cfg = infer_config(sd, args, num_heads=num_heads or _heads_from_args(args, _width(sd)) or fallback.get("num_heads"),
                           semantic_size=semantic_size or args.get("semantic_size") or fallback.get("semantic_size"))
    if init_from_dit:
        if cfg.family != "dit":
            raise UserError("--init-from-dit needs a DiT checkpoint, but this one is already a FlexDiT")
        cfg, sd = init_flexdit_from_dit(sd, cfg, init_from_dit, semantic_size)
        fmt += "+init-from-dit"
        notes.append("FlexDiT built from DiT weights without fine-tuning: valid for timing, not for quality")
    return Checkpoint(cfg, sd, fmt, class_names, notes, defaults, schedule)


def _load_project(path: Path, overrides):
    from safetensors.torch import load_file

    weights = path / WEIGHTS_FILE if path.is_dir() else (path.with_name(WEIGHTS_FILE) if path.name == CONFIG_FILE else path)
    cfg_path = weights.with_name(CONFIG_FILE)
    if not weights.exists():
        raise UserError(f"checkpoint weights not found: {weights}")
    try:
        sd = load_file(str(weights))
    except Exception as e:
        raise UserError(f"cannot read safetensors file {weights}: {str(e).splitlines()[0][:200]}") from None
    meta, class_names = {}, None
    if cfg_path.exists():
        try:
            meta = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read checkpoint config {cfg_path}: {e}") from None
        if not isinstance(meta, dict):
            raise UserError(f"{cfg_path} is not a checkpoint config (expected a JSON object, got {type(meta).__name__})")
        for key in ("model", "sampling"):
            if meta.get(key) is not None and not isinstance(meta[key], dict):
                raise UserError(f"{cfg_path}: {key!r} must be an object, got {type(meta[key]).__name__}")
        class_names = meta.get("class_names")
    recorded = meta.get("model") or {}
    for key, flag in (("num_heads", "--num-heads"), ("semantic_size", "--semantic-size")):
        given = overrides[key]
        if given is not None and recorded.get(key) is not None and given != recorded[key]:
            raise UserError(f"{flag} {given} contradicts the checkpoint's recorded {key.replace('_', ' ')} "
                            f"{recorded[key]} ({cfg_path}); leave {flag} out (the weights were trained with "
                            f"{recorded[key]})")
    inferred = infer_config(sd, {"semantic_size": recorded.get("semantic_size")},
                            num_heads=overrides["num_heads"] or recorded.get("num_heads") or overrides.get("fallback_heads"),
                            semantic_size=overrides["semantic_size"] or (None if recorded.get("semantic_size")
                                                                         else overrides.get("fallback_semantic")))
    if meta.get("model"):
        try:
            declared = ModelConfig.from_dict({**meta["model"], "num_heads": inferred.num_heads,
                                              "semantic_size": inferred.semantic_size})
        except (ConfigError, TypeError, ValueError) as e:
            raise UserError(f"{cfg_path}: its model config is invalid: {str(e).splitlines()[0][:200]}") from None
        if declared != inferred:
            raise UserError(f"{cfg_path} declares {declared.name} but the weights are {inferred.name}")
    return sd, inferred, class_names, dict(meta.get("sampling", {})), meta.get("schedule"), PROJECT_FORMAT


def save_checkpoint(model, out_dir, class_names=None, extra: dict | None = None) -> Path:
    """Write the project format: ``model.safetensors`` + ``config.json``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, str(out / WEIGHTS_FILE))
    meta = {"format": PROJECT_FORMAT, "version": 1, "model": model.cfg.to_dict(), "class_names": class_names}
    meta.update(extra or {})
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out
