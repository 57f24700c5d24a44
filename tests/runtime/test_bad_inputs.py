"""Every case of the shared bad-input catalogue (flexdit_bundle/conformance/bad_inputs.json)
through the real flexdit-run CLI, and through the Python API where the case has one: one line
on stderr, the expected exit code and message, nothing written."""

import json
import re
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from flexdit_bundle.manifest import BundleError
from flexdit_runtime import Pipeline
from flexdit_runtime.prompts import PromptError

CATALOGUE = json.loads(resources.files("flexdit_bundle").joinpath("conformance/bad_inputs.json").read_text())
CASES = CATALOGUE["cases"]


def _parent_and_key(doc, pointer: str):
    parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.lstrip("/").split("/")]
    node = doc
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    key = parts[-1]
    return node, int(key) if isinstance(node, list) else key


def apply_edits(bundle: Path, edits: list, outside: Path) -> None:
    """The catalogue's bundle edits, on a copy of the bundle."""
    mf = bundle / "manifest.json"
    m = json.loads(mf.read_text())
    raw = {}
    for i, e in enumerate(edits):
        if e["op"] == "bom":
            continue  # applied to the text below
        if e["op"] == "symlink_outside":
            src = bundle / e["file"]
            outside.mkdir(parents=True, exist_ok=True)
            moved = outside / src.name
            shutil.move(src, moved)
            src.symlink_to(moved)
            continue
        parent, key = _parent_and_key(m, e["path"])
        if e["op"] == "set":
            parent[key] = e["value"]
        elif e["op"] in ("set_raw", "nest"):
            marker = f"@@raw{i}@@"
            parent[key] = marker
            raw[json.dumps(marker)] = e["raw"] if e["op"] == "set_raw" else "[" * e["depth"] + "]" * e["depth"]
        else:
            raise ValueError(f"unknown edit {e['op']}")
    text = json.dumps(m, indent=1)
    for marker, value in raw.items():
        text = text.replace(marker, value)
    bom = b"\xef\xbb\xbf" if any(e["op"] == "bom" for e in edits) else b""
    mf.write_bytes(bom + text.encode("utf-8"))


def make_files(tmp: Path, files: dict) -> dict:
    paths = {}
    for name, spec in (files or {}).items():
        paths[name] = tmp / name
        if "text" in spec:
            paths[name].write_text(spec["text"], encoding="utf-8")
            continue
        npy = spec["npy"]
        arr = np.full(npy["shape"], npy["fill"], dtype=np.dtype(npy["dtype"]))
        np.save(tmp / name, arr)
    return paths


@pytest.fixture
def case_env(flex_bundle, tmp_path, request):
    case = request.param
    bundle = flex_bundle
    if case.get("edits"):
        bundle = tmp_path / "bundle"
        shutil.copytree(flex_bundle, bundle)
        apply_edits(bundle, case["edits"], tmp_path / "elsewhere")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    files = make_files(scratch, case.get("files"))
    prompts = scratch / "prompts.txt"
    prompts.write_text(case.get("prompts", "1\n"), encoding="utf-8")
    subs = {"{bundle}": str(bundle), "{prompts}": str(prompts), "{out}": str(scratch / "out")}
    subs.update({f"{{file:{n}}}": str(p) for n, p in files.items()})

    def sub(a):
        for k, v in subs.items():
            a = a.replace(k, v)
        return a

    return case, bundle, scratch, files, sub


def _ids(cases):
    return [c["id"] for c in cases]


def test_catalogue_is_well_formed():
    ids = _ids(CASES)
    assert len(ids) == len(set(ids)) and len(ids) >= 20
    for c in CASES:
        assert set(c) <= {"id", "about", "args", "files", "edits", "prompts", "exit_code", "message", "api"}, c["id"]
        assert c["exit_code"] != 0 and c["message"] and c["args"]
        re.compile(c["message"])
        for e in c.get("edits", []):
            assert e["op"] in CATALOGUE["edits"], c["id"]


@pytest.mark.parametrize("case_env", CASES, ids=_ids(CASES), indirect=True)
def test_cli_refuses_with_one_line(case_env):
    case, bundle, scratch, files, sub = case_env
    args = [sub(a) for a in case["args"]]
    out = Path(args[args.index("-o") + 1])
    existed = out.exists()
    before = sorted(p.name for p in scratch.iterdir())
    p = run_cli("flexdit-run", *args, check=False)
    assert p.returncode == case["exit_code"], p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("flexdit-run: error: ") and re.search(case["message"], lines[0]), lines[0]
    assert out.exists() == existed  # nothing created
    assert sorted(p.name for p in scratch.iterdir()) == before  # no staging leftovers
    assert p.stdout == ""


API_CASES = [c for c in CASES if c.get("api")]


@pytest.mark.parametrize("case_env", API_CASES, ids=_ids(API_CASES), indirect=True)
def test_api_refuses_the_same_way(case_env):
    case, bundle, scratch, files, sub = case_env
    kwargs = {}
    for k, v in case["api"]["kwargs"].items():
        if isinstance(v, dict):
            v = float(v["float"])
        elif isinstance(v, str) and v.startswith("{file:"):
            v = np.load(sub(v))
        kwargs[k] = v
    with pytest.raises((BundleError, PromptError)) as e:
        Pipeline.from_bundle(bundle, providers=["cpu"])(case["api"]["prompts"], **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and re.search(case["message"], msg), msg


# ---- the compiler's half: conformance/bad_export_inputs.json, through flexdit-export ----------

EXPORT_CATALOGUE = json.loads(resources.files("flexdit_bundle").joinpath("conformance/bad_export_inputs.json")
                              .read_text())
EXPORT_CASES = EXPORT_CATALOGUE["cases"]


@pytest.fixture(scope="session")
def project_ckpt(tmp_path_factory, tiny_flex_model):
    from flexdit_export.checkpoints import save_checkpoint
    return save_checkpoint(tiny_flex_model, tmp_path_factory.mktemp("project") / "tiny-flexdit",
                           extra={"schedule": "500:2,0:3"})


def test_export_catalogue_is_well_formed():
    ids = _ids(EXPORT_CASES)
    assert len(ids) == len(set(ids)) and not set(ids) & set(_ids(CASES))
    for c in EXPORT_CASES:
        assert set(c) <= {"id", "about", "args", "files", "exit_code", "message"}, c["id"]
        assert c["exit_code"] != 0 and c["message"] and c["args"][0] in ("convert", "calibrate", "inspect", "verify")
        re.compile(c["message"])
        for spec in (c.get("files") or {}).values():
            assert set(spec) <= set(EXPORT_CATALOGUE["files"]), c["id"]


def _export_files(scratch: Path, files: dict) -> dict:
    paths = {}
    for name, spec in (files or {}).items():
        p = scratch / name
        if "text" in spec:
            p.write_text(spec["text"], encoding="utf-8")
        else:
            p.write_bytes(bytes.fromhex(spec["hex"]))
        paths[name] = p
    return paths


def _tree(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("case", EXPORT_CASES, ids=_ids(EXPORT_CASES))
def test_export_refuses_with_one_line(case, project_ckpt, flex_bundle, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    bundle = tmp_path / "bundle"
    shutil.copytree(flex_bundle, bundle)
    files = _export_files(scratch, case.get("files"))
    subs = {"{ckpt}": str(project_ckpt), "{bundle}": str(bundle), "{out}": str(scratch / "out"),
            "{scratch}": str(scratch), **{f"{{file:{n}}}": str(p) for n, p in files.items()}}

    def sub(a):
        for k, v in subs.items():
            a = a.replace(k, v)
        return a

    args = [sub(a) for a in case["args"]]
    before = {r: _tree(r) for r in (scratch, bundle, Path(project_ckpt))}
    p = run_cli("flexdit-export", *args, cwd=scratch, check=False)
    assert p.returncode == case["exit_code"], p.stderr
    assert "Traceback" not in p.stderr + p.stdout and "\x1b" not in p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"flexdit-export {args[0]}: error: ") and re.search(case["message"], lines[0]), lines[0]
    assert p.stdout == ""
    assert {r: _tree(r) for r in before} == before  # nothing written, replaced or left over


# the bundle-reading rules hold in flexdit-export too (it loads bundles with the same code)
INSPECT_CASES = [c for c in CASES if c["id"] in ("manifest-path-nul", "manifest-integer-5000-digits", "manifest-bom",
                                                 "manifest-null-class-is-a-real-class", "manifest-num-timesteps-huge")]


@pytest.mark.parametrize("command", ["inspect", "verify"])
@pytest.mark.parametrize("case_env", INSPECT_CASES, ids=_ids(INSPECT_CASES), indirect=True)
def test_export_inspect_and_verify_refuse_bad_manifests(case_env, command):
    case, bundle, scratch, files, sub = case_env
    p = run_cli("flexdit-export", command, str(bundle), check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr + p.stdout and p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"flexdit-export {command}: error: "), p.stderr
    assert re.search(case["message"], lines[0]), lines[0]
