"""C++ vs the Python runtime on the same bundle and the same noise: final samples bit-identical
(both run the same graphs at the same ONNX Runtime level: basic for fp32/fp16, all for int8;
the same float64 tables cast the same way), images identical. Cases: DDPM (sections) and DDIM
(eta 0 with DDIM striding, eta 0.5), all with classifier-free guidance, 3 images (a padded last
graph call), every trajectory crossing every stage of the bundle; grid.png (upscaled) byte for byte.

usage: parity_vs_python.py REPO CLI BUNDLE [BUNDLE ...]
Noise: x_T and every step's noise are drawn here (numpy) and given to both runtimes: the C++
CLI through --init-noise/--step-noise, the Python Pipeline through init_noise/noise_fn."""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

repo, cli, bundles = Path(sys.argv[1]), str(Path(sys.argv[2]).resolve()), [Path(b) for b in sys.argv[3:]]
sys.path.insert(0, str(repo / "runtimes" / "python"))
from flexdit_bundle.manifest import load_bundle, stage_for  # noqa: E402
from flexdit_runtime import Pipeline  # noqa: E402
from flexdit_runtime.diffusion import space_timesteps  # noqa: E402
from flexdit_runtime.images import grid  # noqa: E402

CASES = [
    dict(name="ddpm12-cfg4", sampler="ddpm", steps=12, spacing="sections", eta=0.0, cfg_scale=4.0),
    dict(name="ddim10-eta0-cfg3", sampler="ddim", steps=10, spacing="ddim", eta=0.0, cfg_scale=3.0),
    dict(name="ddim9-eta0.5-cfg2.5", sampler="ddim", steps=9, spacing="sections", eta=0.5, cfg_scale=2.5),
]
IDS = [1, 7, 3]
TOL = 0.0  # bit-identical (was 1e-5 while the runtimes ran fp32 graphs at different levels)
failures, rows = 0, []
for bundle in bundles:
    b = load_bundle(bundle)
    cfg = b.model["config"]
    shape = (cfg["in_channels"], cfg["input_size"], cfg["input_size"])
    T = b.diffusion["num_timesteps"]
    pipe = Pipeline.from_bundle(bundle, threads=1)
    for case in CASES:
        spec = f"ddim{case['steps']}" if case["spacing"] == "ddim" else str(case["steps"])
        stages = {stage_for(b.stages, t)["id"] for t in space_timesteps(T, spec)}
        assert stages == set(range(len(b.stages))), f"{case['name']} does not cross every stage: {stages}"
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
            cmd = [cli, str(tmp / "prompts.txt"), "--bundle", str(bundle), "-o", str(tmp / "out"), "--steps",
                   str(case["steps"]), "--sampler", case["sampler"], "--spacing", case["spacing"], "--eta",
                   str(case["eta"]), "--cfg-scale", str(case["cfg_scale"]), "--init-noise", str(tmp / "init.npy"),
                   "--step-noise", str(tmp / "step.npy"), "--threads", "1", "--save-npy", "-q"]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                print(f"FAIL {bundle.name}/{case['name']}: flexdit-run-cpp exited {p.returncode}: {p.stderr.strip()}")
                failures += 1
                continue
            cpp = np.load(tmp / "out" / "samples.npy")
            from PIL import Image

            imgs = np.stack([np.asarray(Image.open(f)) for f in sorted((tmp / "out").glob("0*.png"))])
            grid_png = np.asarray(Image.open(tmp / "out" / "grid.png"))
        want_grid = grid(py.images)  # the default upscaling, nearest neighbour
        grid_same = grid_png.size == want_grid.size and np.array_equal(grid_png.reshape(want_grid.shape), want_grid)
        err = float(np.abs(cpp.astype(np.float64) - py.samples).max() / np.abs(py.samples).max())
        img_diff = int(np.abs(imgs.astype(int) - py.images.astype(int).reshape(imgs.shape)).max())
        ok = cpp.shape == py.samples.shape and np.isfinite(cpp).all() and err <= TOL and img_diff == 0 and grid_same
        failures += not ok
        prec = ",".join(sorted(set(pipe.runner.precisions)))
        rows.append((bundle.name, prec, case["name"], err, img_diff))
        print(f"{'ok  ' if ok else 'FAIL'} {bundle.name} ({prec}) {case['name']}: max rel error {err:.2e}, "
              f"max image difference {img_diff}, grid.png {grid_png.shape[:2]} {'identical' if grid_same else 'DIFFERS'} "
              f"(stages crossed: {sorted(stages)})")
print(f"{len(rows)} comparisons, {failures} failures")
sys.exit(1 if failures or not rows else 0)
