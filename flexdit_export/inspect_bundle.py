"""``flexdit-export inspect``: what is in a bundle, as a table or as JSON."""

from __future__ import annotations

from flexdit_runtime import load_bundle


def summarise(bundle_path, verify_checksums: bool = True) -> dict:
    b = load_bundle(bundle_path, verify_checksums)
    m = b.manifest
    cfg = m["model"]["config"]
    N = (cfg["input_size"] // cfg["patch_size"]) ** 2
    stages = []
    for st in b.stages:
        stages.append({
            "id": st["id"], "t_min": st["t_min"], "t_max": st["t_max"], "sparse_grid": st["sparse_grid"],
            "tokens": st["tokens"], "dense_tokens": N, "pruning_rate": round(1 - st["tokens"] / N, 4),
            "batch": st["batch"], "gmacs_per_sample": round(st.get("macs", 0) / 1e9, 3),
            "artifacts": [{"backend": a["backend"], "precision": a["precision"], "path": a["path"],
                           "bytes": a.get("bytes", 0) + a.get("external_data", {}).get("bytes", 0)} for a in st["artifacts"]],
            "parity": st.get("parity", {}),
        })
    total = sum(a["bytes"] for s in stages for a in s["artifacts"])
    dec = m["decoder"]
    if dec:
        total += sum(a.get("bytes", 0) for a in dec["artifacts"])
    return {"bundle": str(bundle_path), "format": m["format"], "created_by": m["created_by"],
            "model": {k: m["model"][k] for k in ("family", "name", "num_classes")} | {"config": cfg},
            "diffusion": m["diffusion"], "stages": stages,
            "decoder": None if not dec else {"kind": dec["kind"], "scale_factor": dec["scale_factor"],
                                             "parity": dec.get("parity", {})},
            "output": m["output"], "total_bytes": total}


def render(s: dict) -> str:
    mb = lambda n: f"{n / 1e6:.1f} MB"
    lines = [f"bundle {s['bundle']}  ({s['format']['name']} v{s['format']['version']}, {s['created_by']['tool']})",
             f"model: {s['model']['name']}  classes: {s['model']['num_classes']}  "
             f"diffusion: T={s['diffusion']['num_timesteps']} {s['diffusion']['variance_type']}, "
             f"cfg channels {s['diffusion']['cfg_channels']}",
             f"{'stage':>5} {'timesteps':>11} {'grid':>6} {'tokens':>9} {'prune':>6} {'batch':>5} {'GMAC':>8}  "
             f"{'artifacts':<30} {'parity (max rel)'}"]
    for st in s["stages"]:
        arts = ", ".join(f"{a['backend']}/{a['precision']} {mb(a['bytes'])}" for a in st["artifacts"])
        par = ", ".join(f"{k} {v['max_rel']:.1e}" for k, v in st["parity"].items())
        grid = "dense" if st["sparse_grid"] is None else f"s={st['sparse_grid']}"
        lines.append(f"{st['id']:>5} {st['t_max']:>5}..{st['t_min']:<4} {grid:>6} {st['tokens']:>4}/{st['dense_tokens']:<4} "
                     f"{st['pruning_rate']:>6.2f} {st['batch']:>5} {st['gmacs_per_sample']:>8.3f}  {arts:<30} {par}")
    d = s["decoder"]
    lines.append("decoder: none (output written in model space: " + s["output"]["space"] + ")" if not d else
                 f"decoder: {d['kind']} scale {d['scale_factor']}, parity "
                 + ", ".join(f"{k} {v['max_rel']:.1e}" for k, v in d["parity"].items()))
    lines.append(f"total size: {mb(s['total_bytes'])}")
    return "\n".join(lines)
