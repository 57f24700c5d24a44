"""One-GPU benchmark of issue 9: DiT-XL/2 and FlexDiT-XL/2 (random weights) per stage call and
per image, PyTorch eager fp32 / eager bf16 (autocast) / torch.compile of the dense DiT (bf16
autocast) against this project's AOTInductor packages run as CUDA graphs (bf16 autocast recipe,
flexdit_export.builders.aoti), with MFU against a bf16 matrix product timed in the same run.

    python3 benchmarks/gpu_bench.py --device cuda --out OUT       # the GPU check (< 6 min on an H100)
    python3 benchmarks/gpu_bench.py --device cpu --tiny --out OUT # the same code paths on a tiny model
    python3 benchmarks/gpu_bench.py --device cpu --tiny --skip-compile --out OUT  # the suite's quick run (no compiles)

Phases (so compiles never disturb timings): (1) every AOTI package is compiled in its own
subprocess, several at once (a crash, e.g. the bf16 segfault of issue 9, costs that package
only and is reported); torch.compile of the dense DiT runs in this process; (2) timings,
interleaved per configuration (each round times every candidate once); (3) the trajectory of one
request (50 DDIM steps, CFG, paper4) through the runtime's device loop
(flexdit_runtime.torch_sampler.run_on_device with AotiStageEngine: CUDA graph per stage), timed
end to end, so the time outside the stage engines is measured, not assumed.
Per image = sum over the 50 steps of the call time of the step's stage / images per call
(batch / 2 with CFG). Decoder excluded. Writes OUT/gpu_bench.json and OUT/gpu_bench.md.
A --budget-s deadline skips what would not fit and says so in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "runtimes" / "python"), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

XL = dict(hidden_size=1152, num_heads=16, depth=28)
LAYOUTS = {"512": (2, 4, [1, 3, 1, 1], 2), "256": (1, 4, [1, 3, 1, 1], 3)}  # checkpoints.LAYOUT_PRESETS
TINY = dict(hidden_size=64, num_heads=4, depth=4)
TINY_LAYOUT = (1, 1, [1, 1, 1, 0], 0)
STEPS, CFG_SCALE = 50, 4.0


def configs(tiny: bool) -> list[dict]:
    """(name, image px, latent size, batch, body, flex layout)."""
    if tiny:
        return [dict(name="tiny-256", px=64, latent=8, batch=2, body=TINY, layout=TINY_LAYOUT)]
    return [dict(name="512px-b16", px=512, latent=64, batch=16, body=XL, layout=LAYOUTS["512"]),
            dict(name="256px-b2", px=256, latent=32, batch=2, body=XL, layout=LAYOUTS["256"])]


def model_cfg(c: dict, family: str):
    from flexdit_export.model import ModelConfig

    if family == "dit":
        return ModelConfig(family="dit", input_size=c["latent"], **c["body"])
    p, d, g, t = c["layout"]
    return ModelConfig(family="flexdit", input_size=c["latent"], num_poolingformer=p, num_dumbbell=d,
                       dumbbell_group=list(g), num_normal_block=t, semantic_size=8 if not c["body"] is TINY else 2,
                       **c["body"])


def build(cfg, device):
    from flexdit_export.model import build_model
    from timing import random_weights

    return random_weights(build_model(cfg), seed=0).to(device)


def grids(c: dict, cfg) -> dict:
    """The FlexDiT stages to time: released (s = semantic size) and paper4's four."""
    from flexdit_export.schedule import parse_schedule

    paper4 = parse_schedule("paper4", T=1000, grid=cfg.grid, family="flexdit", semantic_size=cfg.semantic_size)
    return {"released": [cfg.semantic_size], "paper4": [st.sparse_grid for st in paper4],
            "paper4_stages": [(st.t_min, st.t_max, st.sparse_grid) for st in paper4]}


def stage_module(model, s):
    from flexdit_export.schedule import Stage
    from flexdit_export.stages import StageModule

    return StageModule(model, Stage(0, 999, s)).eval()


def inputs(cfg, batch, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    return tuple(v.to(device) for v in (x, t, y))


# ---------------------------------------------------------------- phase 1: AOTI compiles (subprocesses)

def compile_one(job: dict) -> None:
    """Child process: compile one package (bf16 autocast recipe) into job['path']."""
    from flexdit_export.builders.aoti import compile_package, prepared_model, runnable

    c = next(x for x in configs(job["tiny"]) if x["name"] == job["config"])
    cfg = model_cfg(c, job["family"])
    model = prepared_model(build(cfg, "cpu"), job["precision"], job["device"])
    mod = runnable(stage_module(model, job["s"]).to(job["device"]), job["precision"], job["device"])
    secs = compile_package(mod, inputs(cfg, c["batch"], job["device"]), job["path"])
    print(json.dumps({"seconds": secs}))


def compile_all(jobs: list[dict], parallel: int, deadline: float, log) -> dict:
    def run(job):
        left = deadline - time.time()
        if left < 30:
            return job["key"], {"status": "skipped", "reason": "time budget"}
        t0 = time.time()
        env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": str(max(1, (os.cpu_count() or 2) // parallel))}
        try:
            p = subprocess.run([sys.executable, __file__, "--compile-job", json.dumps(job)], capture_output=True,
                               text=True, timeout=left, env=env)
        except subprocess.TimeoutExpired:
            return job["key"], {"status": "failed", "reason": "time budget (killed)"}
        if p.returncode != 0:
            tail = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][:300]
            return job["key"], {"status": "failed", "reason": f"exit {p.returncode}: {tail}"}
        return job["key"], {"status": "ok", "seconds": round(time.time() - t0, 1), "path": job["path"]}

    out = {}
    with ThreadPoolExecutor(parallel) as pool:
        for key, res in pool.map(run, jobs):
            out[key] = res
            log(f"compile {key}: {res['status']} {res.get('seconds', res.get('reason', ''))}")
    return out


# ---------------------------------------------------------------- phase 2: timings

def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(cands: dict, device, rounds: int, warmup: int = 2) -> dict:
    times = {k: [] for k in cands}
    with torch.inference_mode():
        for r in range(warmup + rounds):
            for k, fn in cands.items():
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                if r >= warmup:
                    times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def matmul_peak(device) -> float:
    """Measured bf16 matrix-product throughput (TFLOP/s) on this device, same run."""
    n = 8192 if device == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = interleaved({"mm": lambda: a @ b}, device, rounds=10 if device == "cuda" else 3)["mm"]
    return 2 * n ** 3 / (ms / 1e3) / 1e12


def aoti_engine(path, model_consts: dict, batch: int, cfg, device: str, sid: int):
    """The runtime's AotiStageEngine on a package compiled here, bound to the shared tensors of
    one in-process model (every stage package uses the same device tensors)."""
    from flexdit_bundle.spec import Stage
    from flexdit_runtime.aoti_engine import AotiStageEngine, bind_constants, environment, load_package

    runner = load_package(path, device)
    bind_constants(runner, model_consts)
    H = cfg.input_size
    env = environment(device)
    art = {"backend": "aoti", "precision": "bf16", "path": str(path), "sha256": "0" * 64,  # not a bundle: no hash
           "aoti": {"device": device, "recipe": "autocast-bf16",
                    "compat": {k: env[k] for k in ("key", "torch", "cuda", "compute_capability", "cpu_isa") if k in env}}}
    stage = Stage.from_json({"id": sid, "t_min": 0, "t_max": 999, "sparse_grid": None,
                             "tokens": (H // cfg.patch_size) ** 2, "batch": batch,
                             "inputs": [{"name": "x", "dtype": "float32", "shape": [batch, cfg.in_channels, H, H]},
                                        {"name": "t", "dtype": "float32", "shape": [batch]},
                                        {"name": "y", "dtype": "int64", "shape": [batch]}],
                             "outputs": [{"name": "out", "dtype": "float32", "shape": [batch, cfg.out_channels, H, H]}],
                             "artifacts": [art]})
    eng = AotiStageEngine(stage, stage.artifacts[0], runner, device, model_consts, env)
    if device == "cuda":
        eng.capture()
    return eng


class EagerEngine:
    """A stage module behind the interface the runtime's device loop calls (``run_device``), for
    --skip-compile runs: the loop and its timing are exercised without a compiled package."""

    def __init__(self, module, batch: int, device: str):
        self.module, self.batch, self.device = module, batch, device
        self.graph, self.graph_error = None, None

    def run_device(self, x, t, y):
        with torch.inference_mode():
            return self.module(x, t, y)


def per_image(call_ms: dict, stage_of_step: list, batch: int) -> float:
    """ms per image: sum over steps of the step's stage call / images per call (CFG: batch/2)."""
    return sum(call_ms[s] for s in stage_of_step) / max(1, batch // 2)


def trajectory(engines_by_s: dict, paper4_stages: list, cfg, batch: int, device: str, rounds: int) -> dict:
    """One request of batch/2 images, 50 DDIM steps with CFG, through the runtime's device loop."""
    from flexdit_runtime.diffusion import Diffusion, linear_betas, space_timesteps
    from flexdit_runtime.request import Request
    from flexdit_runtime.sampling_params import SamplingParams
    from flexdit_runtime import torch_sampler

    class Runner:
        engines = [engines_by_s[s] for _, _, s in paper4_stages]

        @staticmethod
        def stage_for(t):
            return next(i for i, (lo, hi, _) in enumerate(paper4_stages) if lo <= t <= hi)

    class M:  # what run_on_device reads of a Model (the manifest parts as the typed bundle's attributes)
        runner = Runner
        cfg = SimpleNamespace(in_channels=4)
        bundle = SimpleNamespace(diffusion=SimpleNamespace(cfg_channels="first3"), model=SimpleNamespace(null_class=1000))

    params = SamplingParams(steps=STEPS, sampler="ddim", cfg_scale=CFG_SCALE, eta=0.0, spacing="ddim",
                            clip_denoised=False)
    d = Diffusion(linear_betas(1000), space_timesteps(1000, f"ddim{STEPS}"), "learned_range")
    n = batch // 2
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    times, engine_s = [], []
    for r in range(rounds + 1):
        rngs = [np.random.default_rng([0, i]) for i in range(n)]
        x = np.stack([g.standard_normal(shape, dtype=np.float32) for g in rngs])
        req = Request(list(range(n)), params, d, x, 0, list(range(n)), rngs, None, shape)
        sync(device)
        t0 = time.perf_counter()
        torch_sampler.run_on_device(M, req, None)
        sync(device)
        if r:  # the first is warm-up
            times.append(time.perf_counter() - t0)
            engine_s.append(sum(req.stage_seconds.values()))
    total = statistics.median(times)
    eng = statistics.median(engine_s)
    return {"ms_per_image": total * 1e3 / n, "trajectory_ms": total * 1e3, "engine_ms": eng * 1e3,
            "outside_engines_fraction": max(0.0, 1 - eng / total), "images": n, "finite": bool(np.isfinite(req.x).all())}


def run(args) -> dict:
    device, tiny = args.device, args.tiny
    start = time.time()
    deadline = start + args.budget_s
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    pkg_dir = out_dir / "packages"
    pkg_dir.mkdir(exist_ok=True)
    logf = open(out_dir / "gpu_bench.log", "w")

    def log(msg):
        line = f"[{time.time() - start:6.1f}s] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")

    env = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["compute_capability"] = "%d.%d" % torch.cuda.get_device_capability()
        try:
            import triton
            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    log(f"environment: {env}")
    cfgs = [c for c in configs(tiny) if not args.configs or c["name"] in args.configs]
    # phase 1: AOTI packages, FlexDiT stages (released + paper4) and the dense DiT, bf16 recipe
    jobs = []
    plan = {}
    for c in cfgs:
        fcfg = model_cfg(c, "flexdit")
        g = grids(c, fcfg)
        plan[c["name"]] = g
        ss = list(dict.fromkeys(g["released"] + g["paper4"]))
        for fam, s_list in (("flexdit", ss), ("dit", [None])):
            for s in s_list:
                key = f"{c['name']}/{fam}/{'dense' if s is None else f's{s}'}"
                jobs.append({"key": key, "config": c["name"], "family": fam, "s": s, "precision": args.precision,
                             "device": device, "tiny": tiny, "path": str(pkg_dir / (key.replace('/', '_') + ".pt2"))})
    compile_deadline = start + args.budget_s * args.compile_share
    if args.skip_compile:
        compiled = {j["key"]: {"status": "skipped", "reason": "--skip-compile"} for j in jobs}
        log(f"phase 1: {len(jobs)} AOTI packages skipped (--skip-compile)")
    else:
        log(f"phase 1: {len(jobs)} AOTI packages, {args.parallel} at a time")
        compiled = compile_all(jobs, args.parallel, compile_deadline, log)
    peak = matmul_peak(device)
    log(f"bf16 matmul: {peak:.3g} TFLOP/s")
    results = {"environment": env, "bf16_matmul_tflops": peak, "precision": args.precision, "steps": STEPS,
               "cfg_scale": CFG_SCALE, "compiles": compiled, "configs": {}, "skipped": []}
    if args.skip_compile:
        results["skipped"].append("torch.compile of the dense DiT and the AOTI packages (--skip-compile); the runtime "
                                  "device loop ran with eager fp32 stage modules")
    from flexdit_export.flops import forward_macs

    for c in cfgs:
        if time.time() > deadline - 20:
            results["configs"][c["name"]] = {"skipped": "time budget"}
            continue
        B = c["batch"]
        dcfg, fcfg = model_cfg(c, "dit"), model_cfg(c, "flexdit")
        g = plan[c["name"]]
        ss = list(dict.fromkeys(g["released"] + g["paper4"]))
        dit, flex = build(dcfg, device), build(fcfg, device)
        xin = inputs(dcfg, B, device)
        cands, macs = {}, {}
        ac = torch.autocast(device, dtype=torch.bfloat16)

        def eager(mod, bf16):
            def f():
                if bf16:
                    with torch.autocast(device, dtype=torch.bfloat16):
                        return mod(*xin)
                return mod(*xin)
            return f

        dit_stage = stage_module(dit, None)
        cands["DiT eager fp32"] = eager(dit_stage, False)
        cands["DiT eager bf16"] = eager(dit_stage, True)
        macs["DiT"] = forward_macs(dcfg, None, "implementation") * B
        flex_stages = {s: stage_module(flex, s) for s in ss}
        for s, m in flex_stages.items():
            cands[f"FlexDiT s={s} eager fp32"] = eager(m, False)
            cands[f"FlexDiT s={s} eager bf16"] = eager(m, True)
            macs[f"s={s}"] = forward_macs(fcfg, s, "implementation") * B
        # torch.compile of the dense DiT: the baseline a user would pick
        if not args.skip_compile and time.time() < deadline - 60:
            t0 = time.time()
            try:
                compiled_dit = torch.compile(dit_stage, mode=args.compile_mode)

                def comp():
                    with torch.autocast(device, dtype=torch.bfloat16):
                        return compiled_dit(*xin)
                with torch.inference_mode():
                    comp()
                    comp()
                cands["DiT torch.compile bf16"] = comp
                results.setdefault("torch_compile_seconds", {})[c["name"]] = round(time.time() - t0, 1)
            except Exception as e:  # report, keep going
                results.setdefault("errors", []).append(f"{c['name']} torch.compile: {str(e).splitlines()[0][:200]}")
        # this project's AOTI packages (+ CUDA graph on cuda), bound to shared model tensors
        engines = {}
        prepared = {}
        from flexdit_export.builders.aoti import constants_of, prepared_model, runnable
        for fam, mdl, s_list in (("flexdit", flex, ss), ("dit", dit, [None])):
            key0 = f"{c['name']}/{fam}/"
            pm = prepared_model(mdl, args.precision, device)
            prepared[fam] = pm
            for s in s_list:
                key = key0 + ("dense" if s is None else f"s{s}")
                if compiled.get(key, {}).get("status") != "ok":
                    continue
                consts = constants_of(runnable(stage_module(pm, s), args.precision, device))
                try:
                    engines[(fam, s)] = aoti_engine(compiled[key]["path"], consts, B, fcfg if fam == "flexdit" else dcfg,
                                                    device, len(engines))
                except Exception as e:
                    results.setdefault("errors", []).append(f"{key} load: {str(e).splitlines()[0][:200]}")
        for (fam, s), e in engines.items():
            name = "DiT AOTI" if fam == "dit" else f"FlexDiT s={s} AOTI"
            name += " +CUDA graph" if e.graph is not None else ""
            cands[name] = (lambda e=e: e.run_device(*xin))
        # parity of the AOTI packages vs the fp32 eager stage (rel RMS)
        fidelity = {}
        with torch.inference_mode():
            for (fam, s), e in engines.items():
                ref = (dit_stage if fam == "dit" else flex_stages[s])(*xin).float()
                got = e.run_device(*xin).float()
                fidelity[f"{fam} s={s}"] = float(((got - ref).pow(2).mean() / ref.pow(2).mean()).sqrt())
        log(f"{c['name']}: timing {len(cands)} candidates")
        ms = interleaved(cands, device, rounds=args.rounds)
        # per image, 50 DDIM steps with CFG: which stage serves each step
        from flexdit_runtime.diffusion import space_timesteps
        ts = space_timesteps(1000, f"ddim{STEPS}")
        p4 = g["paper4_stages"]
        stage_of = [next(s for lo, hi, s in p4 if lo <= t <= hi) for t in ts]
        rel = g["released"][0]
        img = {}
        for tag in ("eager fp32", "eager bf16"):
            img[f"DiT {tag}"] = per_image({None: ms[f"DiT {tag}"]}, [None] * len(ts), B)
            img[f"FlexDiT paper4 {tag}"] = per_image({s: ms[f"FlexDiT s={s} {tag}"] for s in ss}, stage_of, B)
            img[f"FlexDiT released {tag}"] = per_image({rel: ms[f"FlexDiT s={rel} {tag}"]}, [rel] * len(ts), B)
        if "DiT torch.compile bf16" in ms:
            img["DiT torch.compile bf16"] = per_image({None: ms["DiT torch.compile bf16"]}, [None] * len(ts), B)
        aoti_ms = {s: ms[k] for (fam, s), e in engines.items() for k in ms
                   if fam == "flexdit" and k.startswith(f"FlexDiT s={s} AOTI")}
        if all(s in aoti_ms for s in set(stage_of)):
            img["FlexDiT paper4 AOTI (sum of stage calls)"] = per_image(aoti_ms, stage_of, B)
        if rel in aoti_ms:
            img["FlexDiT released AOTI (sum of stage calls)"] = per_image(aoti_ms, [rel] * len(ts), B)
        dit_aoti = [ms[k] for k in ms if k.startswith("DiT AOTI")]
        if dit_aoti:
            img["DiT AOTI (sum of stage calls)"] = per_image({None: dit_aoti[0]}, [None] * len(ts), B)
        traj = None
        if all(("flexdit", s) in engines for s in set(stage_of)) and time.time() < deadline - 15:
            traj = trajectory({s: engines[("flexdit", s)] for s in set(stage_of)}, p4, fcfg, B, device,
                              rounds=2 if not tiny else 1)
            img["FlexDiT paper4 AOTI trajectory (runtime device loop)"] = traj["ms_per_image"]
        elif args.skip_compile and time.time() < deadline - 15:
            # the same device loop, its engines eager fp32 stage modules (no package was built)
            traj = trajectory({s: EagerEngine(flex_stages[s], B, device) for s in set(stage_of)}, p4, fcfg, B, device,
                              rounds=1)
            traj["engines"] = "eager fp32"
            img["FlexDiT paper4 eager fp32 trajectory (runtime device loop)"] = traj["ms_per_image"]
        mfu = {}
        for k, v in ms.items():
            mk = "DiT" if k.startswith("DiT") else k.split()[1]
            if mk in macs:
                mfu[k] = 2 * macs[mk] / (v / 1e3) / (peak * 1e12)
        results["configs"][c["name"]] = {"batch": B, "px": c["px"], "ms_per_call": ms, "mfu_vs_measured_bf16_matmul": mfu,
                                         "ms_per_image": img, "trajectory": traj, "aoti_rel_rms_vs_fp32": fidelity,
                                         "stage_of_step": stage_of, "macs_per_call": macs,
                                         "cuda_graphs": {f"{f} s={s}": e.graph is not None for (f, s), e in engines.items()},
                                         "cuda_graph_errors": {f"{f} s={s}": e.graph_error for (f, s), e in engines.items()
                                                               if e.graph_error}}
        del dit, flex, engines, prepared, cands
        if device == "cuda":
            torch.cuda.empty_cache()
    results["wall_seconds"] = round(time.time() - start, 1)
    (out_dir / "gpu_bench.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / "gpu_bench.md").write_text(markdown(results))
    log(f"wrote {out_dir / 'gpu_bench.json'} and gpu_bench.md in {results['wall_seconds']} s")
    return results


def markdown(r: dict) -> str:
    e = r["environment"]
    card = e.get("gpu") or f"CPU ({e['cpu']}, {e['cpus']} cores)"
    lines = [f"# gpu_bench: {card}", "",
             f"torch {e['torch']}, CUDA {e.get('cuda')}, triton {e.get('triton')}, compute capability "
             f"{e.get('compute_capability')}; bf16 matmul measured {r['bf16_matmul_tflops']:.3g} TFLOP/s (MFU base); "
             f"AOTI precision {r['precision']}; {r['steps']} DDIM steps, CFG {r['cfg_scale']}; decoder excluded. "
             f"Wall {r.get('wall_seconds')} s.", ""]
    for name, c in r["configs"].items():
        if "skipped" in c:
            lines += [f"## {name}: skipped ({c['skipped']})", ""]
            continue
        lines += [f"## {name} (batch {c['batch']})", "", "| candidate | ms / call | MFU |", "|---|---:|---:|"]
        for k, v in c["ms_per_call"].items():
            m = c["mfu_vs_measured_bf16_matmul"].get(k)
            lines.append(f"| {k} | {v:.2f} | {'' if m is None else f'{100 * m:.0f}%'} |")
        lines += ["", "| per image (50 DDIM steps + CFG) | ms / image | images/s | vs DiT torch.compile |", "|---|---:|---:|---:|"]
        base = c["ms_per_image"].get("DiT torch.compile bf16")
        for k, v in c["ms_per_image"].items():
            lines.append(f"| {k} | {v:.2f} | {1e3 / v:.2f} | {'' if not base else f'{base / v:.2f}x'} |")
        t = c.get("trajectory")
        if t:
            lines += ["", f"Runtime device loop ({t.get('engines', 'AOTI engines')}): {t['trajectory_ms']:.1f} ms per "
                          f"trajectory of {t['images']} images, "
                          f"engines {t['engine_ms']:.1f} ms, outside the engines {100 * t['outside_engines_fraction']:.1f}%."]
        lines += ["", "AOTI rel RMS vs fp32 eager: " + ", ".join(f"{k} {v:.2e}" for k, v in c["aoti_rel_rms_vs_fp32"].items()),
                  "CUDA graphs: " + json.dumps(c["cuda_graphs"]) + (" errors: " + json.dumps(c["cuda_graph_errors"])
                                                                   if c["cuda_graph_errors"] else ""), ""]
    fails = {k: v for k, v in r["compiles"].items() if v["status"] != "ok"}
    if fails:
        lines += ["## packages not built", ""] + [f"- {k}: {v['status']} ({v.get('reason')})" for k, v in fails.items()]
    for what in r.get("skipped", []):
        lines.append(f"- skipped: {what}")
    for err in r.get("errors", []):
        lines.append(f"- error: {err}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 4-block model at 64 px, batch 2 (CPU smoke run)")
    ap.add_argument("--out", default="gpu_bench_out")
    ap.add_argument("--configs", nargs="*", help="subset of: 512px-b16 256px-b2 (tiny: tiny-256)")
    ap.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16", help="AOTI package recipe")
    ap.add_argument("--parallel", type=int, default=None, help="AOTI compiles at once (default: cpus/2, at most 8)")
    ap.add_argument("--budget-s", type=float, default=330, help="wall-clock deadline for the whole run (default 330)")
    ap.add_argument("--compile-share", type=float, default=0.55, help="share of the budget for AOTI compiles")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10 on cuda, 3 on cpu)")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode of the DiT baseline")
    ap.add_argument("--skip-compile", action="store_true",
                    help="no AOTI packages and no torch.compile (the suite's quick run; says so in the output)")
    ap.add_argument("--compile-job", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.compile_job:
        return compile_one(json.loads(args.compile_job))
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no GPU (use --device cpu --tiny for the smoke run)")
    if args.device == "cpu" and not args.tiny:
        ap.error("--device cpu runs the tiny model only (add --tiny); XL on a CPU takes hours")
    args.parallel = args.parallel or max(1, min(8, (os.cpu_count() or 2) // 2))
    args.rounds = args.rounds or (10 if args.device == "cuda" else 3)
    run(args)


if __name__ == "__main__":
    main()
