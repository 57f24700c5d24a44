"""Every case of flexdit_bundle/conformance/bad_inputs.json through flexdit-run-cpp: exit code,
exactly one line on stderr "flexdit-run-cpp: error: ..." matching the case's message, and
nothing written (no output directory, no staging leftovers). Plus the catalogue's everyday
cases (missing bundle, tampered checksum, unknown class, bad steps, bad precision, usage errors)
run through BOTH CLIs: same exit code, and the same message once the program name is removed.

usage: bad_inputs_cli.py REPO CLI FIXTURE_BUNDLE"""

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
catalogue = json.loads((repo / "flexdit_bundle" / "conformance" / "bad_inputs.json").read_text())


def pointer_set(doc, path, value):
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    for p in parts[:-1]:
        doc = doc[int(p)] if isinstance(doc, list) else doc[p]
    last = parts[-1]
    if isinstance(doc, list):
        doc[int(last)] = value
    else:
        doc[last] = value


def make_bundle(edits, where: Path) -> Path:
    bundle = where / "bundle"
    shutil.copytree(fixture, bundle)
    mf = bundle / "manifest.json"
    m = json.loads(mf.read_text())
    raw = {}
    for i, e in enumerate(edits or []):
        if e["op"] == "set":
            pointer_set(m, e["path"], e["value"])
        elif e["op"] in ("set_raw", "nest"):
            token = f"__RAW_{i}__"
            raw[token] = e["raw"] if e["op"] == "set_raw" else "[" * e["depth"] + "]" * e["depth"]
            pointer_set(m, e["path"], token)
        elif e["op"] == "bom":
            pass  # applied to the text below
        elif e["op"] == "symlink_outside":
            src = bundle / e["file"]
            outside = where / ("outside-" + src.name)
            shutil.move(src, outside)
            os.symlink(outside, src)
        else:
            raise SystemExit(f"bad_inputs_cli: unknown edit {e['op']!r}")
    text = json.dumps(m, indent=1)
    for token, value in raw.items():
        text = text.replace(json.dumps(token), value)
    bom = b"\xef\xbb\xbf" if any(e["op"] == "bom" for e in edits or []) else b""
    mf.write_bytes(bom + text.encode("utf-8"))
    return bundle


def make_file(spec, path: Path):
    if "text" in spec:
        path.write_text(spec["text"], encoding="utf-8")
        return
    s = spec["npy"]
    fill = s["fill"]
    dtype = np.dtype(s["dtype"])
    value = dtype.type(fill) if not isinstance(fill, str) or dtype.kind in "US" else np.array(fill).astype(dtype)
    np.save(path, np.full(s["shape"], value, dtype=dtype))


def run(prog, args, tmp: Path):
    cmd = [cli, *args] if prog == "cpp" else [sys.executable, "-m", "flexdit_runtime.cli", *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": f"{repo / 'runtimes' / 'python'}:{repo}"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=300)


def check(p, case_id, exit_code, message, out: Path, tmp: Path, prefix="flexdit-run-cpp") -> list[str]:
    problems = []
    lines = p.stderr.strip("\n").split("\n") if p.stderr.strip() else []
    if p.returncode != exit_code:
        problems.append(f"exit code {p.returncode}, expected {exit_code}")
    if len(lines) != 1 or not lines[0].startswith(f"{prefix}: error: "):
        problems.append(f"stderr is not one '{prefix}: error:' line: {p.stderr.strip()[:400]!r}")
    elif not re.search(message, lines[0]):
        problems.append(f"message {lines[0]!r} does not match {message!r}")
    if out is not None and out.exists():
        problems.append(f"output directory {out} was created")
    leftovers = [f.name for f in tmp.rglob(".*") if f.name.startswith(".flexdit-run-") or ".tmp-" in f.name]
    if leftovers:
        problems.append(f"staging leftovers: {leftovers}")
    return problems


failures = count = 0
for case in catalogue["cases"]:
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        bundle = make_bundle(case.get("edits"), tmp)
        (tmp / "prompts.txt").write_text(case.get("prompts", "1\n"), encoding="utf-8")
        for name, spec in (case.get("files") or {}).items():
            make_file(spec, tmp / name)
        out = tmp / "scratch" / "out"
        out.parent.mkdir()
        subst = {"{bundle}": str(bundle), "{prompts}": str(tmp / "prompts.txt"), "{out}": str(out)}
        args = []
        for a in case["args"]:
            for k, v in subst.items():
                a = a.replace(k, v)
            a = re.sub(r"\{file:([^}]+)\}", lambda mm: str(tmp / mm.group(1)), a)
            args.append(a)
        before = sorted(str(f.relative_to(tmp)) for f in bundle.rglob("*"))
        p = run("cpp", args, tmp)
        # "-o {bundle}" cases: the output is the bundle itself, which must be left as it was
        target = Path(args[args.index("-o") + 1]) if "-o" in args else None
        problems = check(p, case["id"], case["exit_code"], case["message"], out if target == out else None, tmp)
        if sorted(str(f.relative_to(tmp)) for f in bundle.rglob("*")) != before:
            problems.append("the bundle directory was changed")
        count += 1
        failures += bool(problems)
        print(f"{'FAIL' if problems else 'ok  '} catalogue/{case['id']}" + "".join(f"\n     {x}" for x in problems))

# the everyday cases, through both CLIs
EVERYDAY = [
    ("missing-bundle", None, "1\n", ["--bundle", "{tmp}/nope"], r"bundle directory not found: .*nope"),
    ("tampered-checksum", "tamper", "1\n", [], r"checksum mismatch for stages/stage1_s3\.onnx"),
    ("unknown-class", None, "cat\n", [], r"prompts\.txt: 'cat' is not a class id, and this bundle has no class names"),
    ("class-id-out-of-range", None, "10\n", [], r"class id 10 is outside 0\.\.9"),
    ("no-prompts", None, "# nothing\n", [], r"has no prompts"),
    ("missing-prompts", None, None, [], r"prompt file not found"),
    ("steps-zero", None, "1\n", ["--steps", "0"], r"--steps must be in 1\.\.1000, got 0"),
    ("steps-too-many", None, "1\n", ["--steps", "1001"], r"--steps must be in 1\.\.1000, got 1001"),
    ("steps-not-int", None, "1\n", ["--steps", "x"], r"argument --steps: invalid int value: 'x'"),
    ("unknown-precision", None, "1\n", ["--precision", "fp64"], r"unknown precision 'fp64'"),
    ("precision-missing", None, "1\n", ["--precision", "fp16"], r"bundle has no onnx/fp16 artifact for stage 0"),
    ("bad-sampler", None, "1\n", ["--sampler", "heun"],
     r"argument --sampler: invalid choice: 'heun' \(choose from 'ddpm', 'ddim', 'dpmpp-2m', 'unipc', 'euler'\)"),
    # the few-step solvers' own rules (sampling_params.py)
    ("solver-eta", None, "1\n", ["--sampler", "dpmpp-2m", "--eta", "0"], r"--eta is for ddim; dpmpp-2m takes none$"),
    ("euler-spacing", None, "1\n", ["--sampler", "euler", "--spacing", "sections"],
     r"--spacing sections does not apply to euler \(it places fractional timesteps, linspace only\)$"),
    ("linspace-for-ddim", None, "1\n", ["--sampler", "ddim", "--spacing", "linspace"],
     r"--spacing linspace is for dpmpp-2m, unipc, euler; ddim takes sections or ddim$"),
    ("solver-steps-limit", None, "1\n", ["--sampler", "unipc", "--steps", "1000"],
     r"--steps must be in 1\.\.999 for unipc with linspace spacing \(more would repeat a timestep\), got 1000$"),
    ("solver-steps-range", None, "1\n", ["--sampler", "euler", "--steps", "1001"], r"--steps must be in 1\.\.1000, got 1001$"),
    ("solver-overflow", None, "1\n", ["--sampler", "euler", "--steps", "3", "--cfg-scale", "1e38"],
     r"sampling produced NaN or infinite values for image\(s\) 0 at step 1 of 3 \(stage 0, t=999\): "
     r"the euler update \(eta 0, cfg-scale 1e\+38\) overflowed float32$"),
    ("batch-zero", None, "1\n", ["--batch", "0"], r"--batch must be at least 1, got 0"),
    ("ddim-stride-impossible", None, "1\n", ["--steps", "999", "--spacing", "ddim"],
     r"cannot take exactly 999 steps with an integer DDIM stride over 1000 timesteps"),
]
for cid, edit, prompts, extra, message in EVERYDAY:
    codes = {}
    for prog in ("cpp", "py"):
        with tempfile.TemporaryDirectory() as t:
            tmp = Path(t)
            bundle = make_bundle(None, tmp)
            if edit == "tamper":
                f = bundle / "stages" / "stage1_s3.onnx"
                data = bytearray(f.read_bytes())
                data[200] ^= 1
                f.write_bytes(bytes(data))
            if prompts is not None:
                (tmp / "prompts.txt").write_text(prompts)
            out = tmp / "scratch" / "out"
            out.parent.mkdir()
            args = [str(tmp / "prompts.txt"), "--bundle", str(bundle), "-o", str(out), "--steps", "2"]
            args += [a.replace("{tmp}", str(tmp)) for a in extra]
            p = run(prog, args, tmp)
            problems = check(p, cid, 2, message, out, tmp, "flexdit-run-cpp" if prog == "cpp" else "flexdit-run")
            codes[prog] = p.returncode
            count += 1
            failures += bool(problems)
            print(f"{'FAIL' if problems else 'ok  '} everyday/{cid} ({prog})" + "".join(f"\n     {x}" for x in problems))


# ---- what a successful run leaves: the output rules around the refusals above ----
def ok_run(args, cwd):
    p = subprocess.run([cli, *args], capture_output=True, text=True, cwd=cwd, timeout=300)
    return p


outputs_failures = 0
with tempfile.TemporaryDirectory() as t:
    tmp = Path(t)
    (tmp / "p.txt").write_text("1\n2\n3\n")
    base = [str(tmp / "p.txt"), "--bundle", str(fixture), "--steps", "2", "-q"]
    out = tmp / "o"
    checks = []
    p1 = ok_run([*base, "-o", str(out), "--save-npy"], tmp)
    checks.append(("first run writes PNGs, grid and samples",
                   p1.returncode == 0 and sorted(f.name for f in out.iterdir()) ==
                   ["000_1.png", "001_2.png", "002_3.png", "grid.png", "samples.npy"]))
    p2 = ok_run([*base, "-o", str(out)], tmp)
    checks.append(("a second run into it is refused", p2.returncode == 2 and "is not empty" in p2.stderr))
    p3 = ok_run([*base, "-o", str(out), "--force"], tmp)
    checks.append(("--force replaces the earlier run's files (no stale samples.npy)",
                   p3.returncode == 0 and sorted(f.name for f in out.iterdir()) == ["000_1.png", "001_2.png", "002_3.png", "grid.png"]))
    p4 = subprocess.run([cli, *base[:-1], "--json"], capture_output=True, text=True, cwd=tmp, timeout=300)
    try:
        summary = json.loads(p4.stdout)
    except ValueError:
        summary = {}
    made = list((tmp / "flexdit-images").glob("run-*"))
    checks.append(("default -o: a fresh flexdit-images/run-DATE-TIME; --json summary",
                   p4.returncode == 0 and len(made) == 1 and summary.get("images") == 3
                   and Path(summary.get("out", "")).name == made[0].name and len(summary.get("engines", [])) == 3))
    leftovers = [f.name for f in tmp.rglob(".*")]
    checks.append(("no staging leftovers", not leftovers))
    for what, good in checks:
        outputs_failures += not good
        print(f"{'ok  ' if good else 'FAIL'} outputs: {what}")
print(f"{count} runs, {failures} failures; {outputs_failures} output-rule failures")
sys.exit(1 if failures or outputs_failures else 0)
