"""flexdit-run-cpp with and without the bundle's shared stage graph (--no-shared-graphs), on the
fixture's fp32 bundle (converted by the real compiler: two sparse stages share a graph, the dense
one has its own): the same explicit noise gives bit-identical samples and identical PNGs over
trajectories that cross every stage, and --json says which stages ran through the shared graph.
Then the contract through BOTH CLIs (flexdit-run-cpp and the Python flexdit-run): a tampered or
missing shared graph file and manifests that break the shared-graph rules are refused with exit
code 2 and the same one-line message.

usage: shared_graphs_cli.py REPO CLI FP32_BUNDLE"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

repo, cli, fixture = Path(sys.argv[1]), str(Path(sys.argv[2]).resolve()), Path(sys.argv[3])
sys.path.insert(0, str(repo / "runtimes" / "python"))
from flexdit_bundle.manifest import stage_for  # noqa: E402
from flexdit_runtime.diffusion import space_timesteps  # noqa: E402

manifest = json.loads((fixture / "manifest.json").read_text())
failures = 0


def report(ok: bool, what: str, detail: str = "") -> None:
    global failures
    failures += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {what}" + (f": {detail}" if detail else ""))


# ---- the fixture must have what is tested, or every comparison below would pass vacuously ----
graphs = manifest.get("shared_graphs") or []
users = [st["id"] for st in manifest["stages"] for a in st["artifacts"] if a.get("shared_graph")]
report(len(graphs) == 1 and users == [0, 1] and graphs[0]["stages"] == [0, 1],
       "fixture bundle has one shared graph for stages 0 and 1",
       f"shared_graphs {[g['path'] for g in graphs]}, used by stages {users}")
if failures:
    sys.exit(1)
SHARED = graphs[0]["path"]

# ---- (a) with vs without the shared graph: bit-identical ----
CASES = [
    dict(name="ddpm12-cfg4", sampler="ddpm", steps=12, spacing="sections", eta=0.0, cfg_scale=4.0, threads=1),
    dict(name="ddim10-eta0-cfg3", sampler="ddim", steps=10, spacing="ddim", eta=0.0, cfg_scale=3.0, threads=1),
    dict(name="ddim9-eta0.5-cfg2.5", sampler="ddim", steps=9, spacing="sections", eta=0.5, cfg_scale=2.5, threads=1),
    dict(name="ddpm8-nocfg-2threads", sampler="ddpm", steps=8, spacing="sections", eta=0.0, cfg_scale=1.0, threads=2),
]
IDS = [1, 7, 3]
cfg = manifest["model"]["config"]
shape = (cfg["in_channels"], cfg["input_size"], cfg["input_size"])
T = manifest["diffusion"]["num_timesteps"]
for case in CASES:
    spec = f"ddim{case['steps']}" if case["spacing"] == "ddim" else str(case["steps"])
    crossed = {stage_for(manifest["stages"], t)["id"] for t in space_timesteps(T, spec)}
    assert crossed == {0, 1, 2}, f"{case['name']} does not cross every stage: {crossed}"
    rng = np.random.default_rng(sum(map(ord, case["name"])))
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        np.save(tmp / "init.npy", rng.standard_normal((len(IDS),) + shape, dtype=np.float32))
        np.save(tmp / "step.npy", rng.standard_normal((case["steps"], len(IDS)) + shape, dtype=np.float32))
        (tmp / "prompts.txt").write_text("".join(f"{i}\n" for i in IDS))
        runs = {}
        for mode, extra in (("shared", []), ("own", ["--no-shared-graphs"])):
            out = tmp / mode
            cmd = [cli, str(tmp / "prompts.txt"), "--bundle", str(fixture), "-o", str(out), "--steps", str(case["steps"]),
                   "--sampler", case["sampler"], "--spacing", case["spacing"], "--eta", str(case["eta"]),
                   "--cfg-scale", str(case["cfg_scale"]), "--init-noise", str(tmp / "init.npy"),
                   "--step-noise", str(tmp / "step.npy"), "--threads", str(case["threads"]), "--save-npy", "--json",
                   *extra]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if p.returncode != 0:
                runs[mode] = None
                report(False, f"{case['name']} ({mode})", f"exit {p.returncode}: {p.stderr.strip()}")
                continue
            engines = json.loads(p.stdout)["engines"]
            pngs = {f.name: f.read_bytes() for f in sorted(out.glob("*.png"))}
            runs[mode] = (np.load(out / "samples.npy"), pngs, [e.get("shared_graph") for e in engines])
        if runs.get("shared") is None or runs.get("own") is None:
            continue
        (a, pa, ga), (b, pb, gb) = runs["shared"], runs["own"]
        report(ga == [SHARED, SHARED, None] and gb == [None, None, None],
               f"{case['name']}: --json names the shared graph for stages 0, 1 only when it is used", f"{ga} / {gb}")
        err = float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max()) if a.shape == b.shape else float("inf")
        report(a.shape == b.shape and np.isfinite(a).all() and np.array_equal(a, b),
               f"{case['name']} ({case['threads']} thread(s)): samples bit-identical with and without the shared graph",
               f"max rel difference {err:.1e}, stages crossed {sorted(crossed)}")
        report(pa == pb and len(pa) == len(IDS) + 1, f"{case['name']}: PNGs identical")

# ---- (c) the contract, through both CLIs ----


def tamper(bundle: Path, m: dict) -> None:
    f = bundle / SHARED
    data = bytearray(f.read_bytes())
    data[200] ^= 1
    f.write_bytes(bytes(data))


def missing(bundle: Path, m: dict) -> None:
    (bundle / SHARED).unlink()


def unknown_id(bundle: Path, m: dict) -> None:
    m["stages"][0]["artifacts"][0]["shared_graph"]["id"] = "shared.nope"


def wrong_stages(bundle: Path, m: dict) -> None:
    m["shared_graphs"][0]["stages"] = [0, 2]


def wrong_inputs(bundle: Path, m: dict) -> None:
    inputs = m["stages"][1]["artifacts"][0]["shared_graph"]["inputs"]
    inputs.pop(next(iter(inputs)))


s0, s1 = (manifest["stages"][i]["artifacts"][0]["path"] for i in (0, 1))
CONTRACT = [
    ("tampered-shared-graph", tamper, [], rf"checksum mismatch for {SHARED}: the bundle was modified or truncated"),
    ("tampered-shared-graph-not-used", tamper, ["--no-shared-graphs"], rf"checksum mismatch for {SHARED}"),
    ("missing-shared-graph", missing, [], rf"bundle file missing: {SHARED}"),
    ("unknown-shared-graph-id", unknown_id, [],
     rf"{s0} names shared graph 'shared.nope', which the manifest does not list for its backend and precision"),
    ("shared-graph-stages", wrong_stages, [], r"shared graph 'shared.fp32' lists stages \[0, 2\], but stages \[0, 1\] use it"),
    ("shared-graph-inputs", wrong_inputs, [], rf"{s1}: its shared-graph inputs do not match {SHARED}'s stage inputs"),
]
env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": f"{repo / 'runtimes' / 'python'}:{repo}"}
for cid, edit, extra, message in CONTRACT:
    messages = {}
    for prog in ("cpp", "py"):
        if prog == "py" and extra:
            continue  # a flag of the C++ CLI only
        with tempfile.TemporaryDirectory() as t:
            tmp = Path(t)
            bundle = tmp / "bundle"
            shutil.copytree(fixture, bundle)
            m = json.loads((bundle / "manifest.json").read_text())
            edit(bundle, m)
            (bundle / "manifest.json").write_text(json.dumps(m, indent=1))
            (tmp / "prompts.txt").write_text("1\n")
            out = tmp / "out"
            args = [str(tmp / "prompts.txt"), "--bundle", str(bundle), "-o", str(out), "--steps", "2", *extra]
            cmd = [cli, *args] if prog == "cpp" else [sys.executable, "-m", "flexdit_runtime.cli", *args]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=300)
            prefix = "flexdit-run-cpp: error: " if prog == "cpp" else "flexdit-run: error: "
            lines = p.stderr.strip().splitlines()
            problems = []
            if p.returncode != 2:
                problems.append(f"exit code {p.returncode}, expected 2")
            if len(lines) != 1 or not lines[0].startswith(prefix):
                problems.append(f"stderr is not one '{prefix.strip()}' line: {p.stderr.strip()[:400]!r}")
            elif not re.search(message, lines[0]):
                problems.append(f"message {lines[0]!r} does not match {message!r}")
            if out.exists():
                problems.append("output directory was created")
            messages[prog] = lines[0].removeprefix(prefix) if len(lines) == 1 else None
            report(not problems, f"contract/{cid} ({prog})", "; ".join(problems))
    if "py" in messages:
        report(messages["cpp"] == messages["py"], f"contract/{cid}: the same message from both CLIs",
               f"cpp {messages['cpp']!r} / py {messages['py']!r}" if messages["cpp"] != messages["py"] else "")

help_text = subprocess.run([cli, "--help"], capture_output=True, text=True).stdout
report("--no-shared-graphs" in help_text, "--help lists --no-shared-graphs")
print(f"{failures} failures")
sys.exit(1 if failures else 0)
