"""C++ vs the Python runtime on the same bundle and the same noise: final samples bit-identical
(both run the same graphs at the same ONNX Runtime level: basic for fp32/fp16, all for int8;
the same float64 tables cast the same way), images identical. Cases: DDPM (sections) and DDIM
(eta 0 with DDIM striding, eta 0.5), all with classifier-free guidance, and the few-step solvers
dpmpp-2m, unipc and euler at 1..4 steps and longer runs, with and without guidance, with their
own spacing (linspace; euler's fractional timesteps) and sections/ddim; 3 images (a padded last
graph call), every trajectory of 4 or more steps crossing every stage of the bundle. One case per
solver also runs through flexdit-run itself (samples.npy of both CLIs); grid.png (upscaled) byte for byte.

usage: parity_vs_python.py REPO CLI BUNDLE [BUNDLE ...]
Noise: x_T and every step's noise are drawn here (numpy) and given to both runtimes: the C++
CLI through --init-noise/--step-noise, the Python Pipeline through init_noise/noise_fn. The
solvers draw no step noise: neither runtime gets any (a draw would show as a difference)."""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

repo, cli, bundles = Path(sys.argv[1]), str(Path(sys.argv[2]).resolve()), [Path(b) for b in sys.argv[3:]]
sys.path.insert(0, str(repo / "runtimes" / "python"))
from flexdit_bundle.manifest import load_bundle, stage_for  # noqa: E402
from flexdit_runtime import Pipeline  # noqa: E402
from flexdit_runtime.diffusion import solver_timesteps, space_timesteps  # noqa: E402
from flexdit_runtime.images import grid  # noqa: E402

CASES = [
    dict(name="ddpm12-cfg4", sampler="ddpm", steps=12, spacing="sections", eta=0.0, cfg_scale=4.0),
    dict(name="ddim10-eta0-cfg3", sampler="ddim", steps=10, spacing="ddim", eta=0.0, cfg_scale=3.0),
    dict(name="ddim9-eta0.5-cfg2.5", sampler="ddim", steps=9, spacing="sections", eta=0.5, cfg_scale=2.5),
]
# the solvers: spacing None = not given (the sampler's own, linspace); cli=True: also through flexdit-run
for solver, longer in (("dpmpp-2m", [(20, None, 4.0), (9, "sections", 1.0)]),
                       ("unipc", [(10, None, 1.0), (8, "ddim", 3.0)]),
                       ("euler", [(7, None, 4.0), (11, "linspace", 1.0)])):  # 11: t = 299.7 runs stage 0..299
    for steps, spacing, cfg in [(1, None, 4.0), (2, None, 1.0), (3, None, 2.5), (4, None, 1.0)] + longer:
        CASES.append(dict(name=f"{solver}{steps}-{spacing or 'default'}-cfg{cfg:g}", sampler=solver, steps=steps,
                          spacing=spacing, eta=None, cfg_scale=cfg, cli=(steps, spacing, cfg) == longer[0]))
IDS = [1, 7, 3]
TOL = 0.0  # bit-identical (was 1e-5 while the runtimes ran fp32 graphs at different levels)
failures, rows = 0, []
for bundle in bundles:
    b = load_bundle(bundle)
    cfg = b.model.config
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    T = b.diffusion.num_timesteps
    pipe = Pipeline.from_bundle(bundle, threads=1)
    for case in CASES:
        solver = case["eta"] is None
        if solver:  # fractional timesteps run the stage whose range holds floor(t)
            ts = solver_timesteps(case["sampler"], T, case["steps"], case["spacing"] or "linspace")
        else:
            ts = space_timesteps(T, f"ddim{case['steps']}" if case["spacing"] == "ddim" else str(case["steps"]))
        stages = {stage_for(b.stages, int(t)).id for t in ts}
        assert case["steps"] < 4 or stages == set(range(len(b.stages))), f"{case['name']} does not cross every stage: {stages}"
        rng = np.random.default_rng(abs(hash(case["name"])) % 2**32)
        init = rng.standard_normal((len(IDS),) + shape, dtype=np.float32)
        step = rng.standard_normal((case["steps"], len(IDS)) + shape, dtype=np.float32)
        py = pipe(IDS, steps=case["steps"], sampler=case["sampler"], cfg_scale=case["cfg_scale"], eta=case["eta"],
                  spacing=case["spacing"], init_noise=init, noise_fn=lambda k, idx: step[k][idx])
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            np.save(tmp / "init.npy", init)
            np.save(tmp / "step.npy", step)
            (tmp / "prompts.txt").write_text("".join(f"{i}\n" for i in IDS))
            args = [str(tmp / "prompts.txt"), "--bundle", str(bundle), "--steps", str(case["steps"]), "--sampler",
                    case["sampler"], "--cfg-scale", str(case["cfg_scale"]), "--init-noise", str(tmp / "init.npy"),
                    "--threads", "1", "--save-npy", "-q"]
            args += ["--spacing", case["spacing"]] if case["spacing"] else []
            args += [] if solver else ["--eta", str(case["eta"])]
            runs = {"flexdit-run-cpp": [cli, *args, "-o", str(tmp / "out")]}
            runs["flexdit-run-cpp"] += [] if solver else ["--step-noise", str(tmp / "step.npy")]
            if case.get("cli") and bundle == bundles[0]:
                runs["flexdit-run"] = [sys.executable, "-m", "flexdit_runtime.cli", *args, "-o", str(tmp / "out-py")]
            failed = False
            for prog, cmd in runs.items():
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0:
                    print(f"FAIL {bundle.name}/{case['name']}: {prog} exited {p.returncode}: {p.stderr.strip()}")
                    failed = True
            if failed:
                failures += 1
                continue
            cpp = np.load(tmp / "out" / "samples.npy")
            py_cli = np.load(tmp / "out-py" / "samples.npy") if "flexdit-run" in runs else None
            from PIL import Image

            imgs = np.stack([np.asarray(Image.open(f)) for f in sorted((tmp / "out").glob("0*.png"))])
            grid_png = np.asarray(Image.open(tmp / "out" / "grid.png"))
        want_grid = grid(py.images)  # the default upscaling, nearest neighbour
        grid_same = grid_png.size == want_grid.size and np.array_equal(grid_png.reshape(want_grid.shape), want_grid)
        err = float(np.abs(cpp.astype(np.float64) - py.samples).max() / np.abs(py.samples).max())
        img_diff = int(np.abs(imgs.astype(int) - py.images.astype(int).reshape(imgs.shape)).max())
        ok = cpp.shape == py.samples.shape and np.isfinite(cpp).all() and err <= TOL and img_diff == 0 and grid_same
        ok = ok and (py_cli is None or np.array_equal(py_cli, cpp))
        failures += not ok
        prec = ",".join(sorted(set(pipe.runner.precisions)))
        rows.append((bundle.name, prec, case["name"], err, img_diff))
        print(f"{'ok  ' if ok else 'FAIL'} {bundle.name} ({prec}) {case['name']}: max rel error {err:.2e}, "
              f"max image difference {img_diff}, grid.png {grid_png.shape[:2]} {'identical' if grid_same else 'DIFFERS'} "
              f"(stages crossed: {sorted(stages)})"
              + ("" if py_cli is None else f"; flexdit-run's samples.npy {'identical' if np.array_equal(py_cli, cpp) else 'DIFFER'}"))
print(f"{len(rows)} comparisons, {failures} failures")
sys.exit(1 if failures or not rows else 0)
