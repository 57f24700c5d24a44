"""``flexdit-export inspect``: what is in a bundle, as a table or as JSON."""

from __future__ import annotations

from flexdit_bundle.manifest import MANIFEST, SAMPLING_DEFAULTS, load_bundle


def summarise(bundle_path, verify_checksums: bool = True) -> dict:
    """The bundle as the JSON ``inspect --json`` prints (manifest parts in their manifest form)."""
    b = load_bundle(bundle_path, verify_checksums)
    m = b.manifest
    cfg = m.model.config
    N = (cfg.input_size // cfg.patch_size) ** 2
    stages = []
    for st in b.stages:
        stages.append({
            "id": st.id, "t_min": st.t_min, "t_max": st.t_max, "sparse_grid": st.sparse_grid,
            "tokens": st.tokens, "dense_tokens": N, "pruning_rate": round(1 - st.tokens / N, 4),
            "batch": st.batch, "gmacs_per_sample": round((st.macs or 0) / 1e9, 3),
            "default_precision": st.default_precision,
            "artifacts": [{"backend": a.backend, "precision": a.precision, "path": a.path, "bytes": _file_bytes(a),
                           "shared_bytes": _bound_bytes(b, a), "weight_file": a.weights.file if a.weights else None,
                           **{k: _json(v) for k, v in (("optimization", a.optimization), ("error", a.error),
                                                       ("check", a.check), ("quantization", a.quantization),
                                                       ("fp32_islands", a.fp32_islands), ("tensorrt", a.tensorrt))
                              if v is not None}}
                          for a in st.artifacts],
            "parity": st.parity or {},
        })
    dec = m.decoder
    weights, sizes = _weights_summary(b)
    return {"bundle": str(bundle_path), "format": m.format.to_json(), "created_by": m.created_by.to_json(),
            "model": {"family": m.model.family, "name": m.model.name, "num_classes": m.model.num_classes,
                      "config": cfg.to_json()},
            "diffusion": m.diffusion.to_json(), "stages": stages,
            "decoder": None if not dec else {"kind": dec.kind, "scale_factor": dec.scale_factor,
                                             "parity": dec.parity or {}},
            "output": m.output.to_json(), "weights": weights, "shared_graphs": _shared_graphs(b), "sizes": sizes,
            "total_bytes": sizes["total"],
            "calibration": _calib_brief(m.calibration),
            "quality": m.quality}


def _json(v):
    return v.to_json() if hasattr(v, "to_json") else v


def _file_bytes(a) -> int:
    """Bytes of an artifact's own files: the graph and its external data."""
    return (a.bytes or 0) + (a.external_data.bytes or 0 if a.external_data else 0)


def _bound_bytes(b, a) -> int:
    """Bytes of shared weight tensors a graph uses (stored once, in its precision's weight file)."""
    if not a.weights:
        return 0
    tensors = b.weight_files[a.weights.file].tensors
    return sum(tensors[i].bytes for i in set(a.weights.bindings.values()))


def _weights_summary(b) -> tuple[list, dict]:
    """Shared weight files (who uses them) and the bundle's bytes split into shared weights,
    per-stage graph files, decoder and manifest."""
    users = {}
    for st in b.stages:
        for a in st.artifacts:
            if a.weights:
                users.setdefault(a.weights.file, set()).add(st.id)
    weights = [{"id": w.id, "path": w.path, "bytes": w.bytes, "tensors": len(w.tensors),
                "sha256": w.sha256, "stages": sorted(users.get(w.id, ()))} for w in b.weight_files.values()]
    def files(entries):
        return sum(_file_bytes(a) for e in entries for a in e.artifacts)
    sizes = {"shared_weights": sum(w.bytes for w in b.weight_files.values()), "per_stage": files(b.stages),
             "shared_graphs": sum(g.bytes for g in b.shared_graphs.values()),
             "decoder": files([b.decoder]) if b.decoder else 0,
             "manifest": (b.root / MANIFEST).stat().st_size if (b.root / MANIFEST).exists() else 0}
    sizes["total"] = sum(sizes.values())
    return weights, sizes


def _shared_graphs(b) -> list:
    """Graphs that stand for several stage graphs (one session for those stages at run time)."""
    return [{"id": g.id, "path": g.path, "bytes": g.bytes, "precision": g.precision, "stages": list(g.stages),
             "stage_inputs": list(g.stage_inputs), "verified": g.verified.to_json()} for g in b.shared_graphs.values()]


def _calib_brief(c):
    if not c:
        return None
    return {"sha256": c.sha256, "path": c.extra.get("path"), "method": c.method,
            "settings": {k: c.settings.get(k) for k in ("sampler", "steps", "cfg_scale", "images", "holdout_images",
                                                        "seed", "max_rows")},
            "stages": [x.to_json() for x in c.stages]}


def _sampling_line(d: dict) -> str:
    """The runtime's defaults as it will run them (eta only where the sampler takes one)."""
    eta = f", eta {d['eta']:g}" if d["sampler"] == "ddim" else ""
    return (f"sampling defaults: {d['sampler']} {d['steps']} steps, cfg {d['cfg_scale']:g}{eta}"
            + (", clip x0" if d.get("clip_denoised") else ""))


def render(s: dict) -> str:
    """The table ``inspect`` prints, from ``summarise``'s JSON (its rows, not manifest entries)."""
    mb = lambda n: f"{n / 1e6:.1f} MB"
    rows = []
    for row in s["stages"]:
        arts = ", ".join(f"{e['backend']}/{e['precision']}{'*' if e['precision'] == row.get('default_precision') else ''} "
                         f"{mb(e['bytes'])}" + (f" (+{mb(e['shared_bytes'])} shared)" if e["shared_bytes"] else "")
                         for e in row["artifacts"])
        par = ", ".join(f"{k} {v['max_rel']:.1e}" for k, v in row["parity"].items())
        grid = "dense" if row["sparse_grid"] is None else f"s={row['sparse_grid']}"
        rows.append((row, grid, arts, par))
    width = max([len("artifacts")] + [len(r[2]) for r in rows])
    lines = [f"bundle {s['bundle']}  ({s['format']['name']} v{s['format']['version']}, {s['created_by']['tool']})",
             f"model: {s['model']['name']}  classes: {s['model']['num_classes']}  "
             f"diffusion: T={s['diffusion']['num_timesteps']} {s['diffusion']['variance_type']}, "
             f"cfg channels {s['diffusion']['cfg_channels']}",
             _sampling_line({**SAMPLING_DEFAULTS, **s['diffusion'].get('defaults', {})}),
             f"{'stage':>5} {'timesteps':>11} {'grid':>6} {'tokens':>9} {'prune':>6} {'batch':>5} {'GMAC':>8}  "
             f"{'artifacts':<{width}}  {'parity (max rel)'}"]
    for row, grid, arts, par in rows:
        lines.append(f"{row['id']:>5} {row['t_max']:>5}..{row['t_min']:<4} {grid:>6} {row['tokens']:>4}/{row['dense_tokens']:<4} "
                     f"{row['pruning_rate']:>6.2f} {row['batch']:>5} {row['gmacs_per_sample']:>8.3f}  {arts:<{width}}  {par}")
    if any("*" in r[2] for r in rows):
        lines.append("(* = the precision a stage loads by default)")
    details = []
    for row in s["stages"]:
        for e in row["artifacts"]:
            bits = []
            if "optimization" in e:
                o = e["optimization"]
                bits.append(f"optimised {o['level']}{' + onnxsim' if o.get('onnxsim') else ''} "
                            f"{o['nodes_before']} -> {o['nodes_after']} nodes")
            if "error" in e:
                bits.append(f"vs fp32 on held-out rows: rel RMS {e['error']['rel_rms']:.2e}, max rel {e['error']['max_rel']:.2e}")
            if "fp32_islands" in e:
                bits.append(f"{e['fp32_islands']['fp32_nodes']}/{e['fp32_islands']['total_nodes']} nodes kept fp32")
            if e.get("check", {}).get("status") == "built-not-run":
                bits.append("BUILT BUT NOT RUN: " + e["check"].get("reason", ""))
            if bits:
                details.append(f"  stage {row['id']} {e['backend']}/{e['precision']}: " + "; ".join(bits))
    lines.extend(details)
    c = s.get("calibration")
    if c:
        cs = c["settings"]
        lines.append(f"calibration {c['sha256'][:16]} ({c.get('path')}): {cs['images']} trajectories, {cs['sampler']} "
                     f"{cs['steps']} steps, cfg {cs['cfg_scale']}, seed {cs['seed']}; rows per stage "
                     + ", ".join(f"{x['id']}: {x['calib_rows']}+{x['holdout_rows']}" for x in c["stages"]))
    q = s.get("quality")
    if q:
        lines.append(f"end-to-end gate: {q['verdict']}")
    d = s["decoder"]
    lines.append("decoder: none (output written in model space: " + s["output"]["space"] + ")" if not d else
                 f"decoder: {d['kind']} scale {d['scale_factor']}, parity "
                 + ", ".join(f"{k} {v['max_rel']:.1e}" for k, v in d["parity"].items()))
    for w in s["weights"]:
        users = ", ".join(map(str, w["stages"]))
        lines.append(f"shared weights {w['id']}: {w['path']} {mb(w['bytes'])}, {w['tensors']} tensors, stored once, "
                     f"used by stages {users or '(none)'}")
    for g in s["shared_graphs"]:
        v = g["verified"]
        lines.append(f"shared graph {g['path']} ({g['precision']}, {g['bytes'] / 1e3:.0f} kB): one session for stages "
                     f"{', '.join(map(str, g['stages']))}; feeds {len(g['stage_inputs'])} stage constants; "
                     f"bit-identical to the stage graphs at ONNX Runtime level {v['graph_optimization']}")
    z = s["sizes"]
    lines.append(f"total size: {mb(z['total'])} = {mb(z['shared_weights'])} shared weights + {mb(z['per_stage'])} "
                 f"per-stage files" + (f" + {z['shared_graphs'] / 1e3:.0f} kB shared graphs" if z["shared_graphs"] else "")
                 + (f" + {mb(z['decoder'])} decoder" if z["decoder"] else "")
                 + f" + {z['manifest'] / 1e3:.0f} kB manifest")
    return "\n".join(lines)


def summarise_calib(path) -> dict:
    from flexdit_export.calib import CalibError, CalibSet

    from .errors import UserError
    try:
        return CalibSet.open(path).summary()
    except CalibError as e:
        raise UserError(str(e)) from None


def render_calib(s: dict) -> str:
    st = s["settings"]
    lines = [f"calibration set {s['path']}  sha256 {s['sha256']}",
             f"model {st['model_name']} ({st['model_sha256'][:12]}), {st['sampler']} {st['steps']} steps, cfg "
             f"{st['cfg_scale']}, {st['images']} + {st['holdout_images']} held-out trajectories, seed {st['seed']}",
             f"{'stage':>5} {'timesteps':>11} {'grid':>6} {'calib':>6} {'held':>5}  timesteps seen"]
    for x in s["stages"]:
        grid = "dense" if x["sparse_grid"] is None else f"s={x['sparse_grid']}"
        ts = x["t_values"]
        seen = ", ".join(map(str, ts)) if len(ts) <= 8 else f"{len(ts)} values, {ts[0]}..{ts[-1]}"
        lines.append(f"{x['id']:>5} {x['t_max']:>5}..{x['t_min']:<4} {grid:>6} {x['calib_rows']:>6} {x['holdout_rows']:>5}  {seen}")
    return "\n".join(lines)
