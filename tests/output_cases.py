"""The output-directory cases of the bad-input catalogue (flexdit_bundle/conformance/bad_inputs.json,
"output_cases"), run through a runtime's CLI; shared by tests/compiler/test_safe_publish.py (flexdit-run)
and runtimes/cpp/tests/output_dir_cli.py (both CLIs). Also runs a CLI on a fresh tmpfs mount
point (``in_tmpfs``) where this process may make one (root, ``unshare -m``)."""

from __future__ import annotations

import json
import os
import pty
import re
import shlex
import subprocess
import termios
import time
from importlib import resources
from pathlib import Path

CATALOGUE = json.loads(resources.files("flexdit_bundle").joinpath("conformance/bad_inputs.json").read_text())
OUTPUT_CASES = CATALOGUE["output_cases"]


def apply_setup(steps, sub) -> None:
    for s in steps or []:
        path = Path(sub(s["path"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        if s["op"] == "mkdir":
            path.mkdir()
        elif s["op"] == "file":
            path.write_text(s.get("text", ""))
        elif s["op"] == "symlink":
            path.symlink_to(sub(s["to"]))
        else:
            raise ValueError(f"unknown output setup step {s['op']!r}")


def snapshot(root: Path) -> dict:
    """Every entry under ``root``: a directory, a file's bytes or a link's target."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = ("link", os.readlink(p)) if p.is_symlink() else ("dir",) if p.is_dir() else ("file", p.read_bytes())
    return out


def _syscall(pid: int) -> list:
    try:
        return Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return []


def run_pausing(cmd, during=None, env=None, cwd=None, timeout=300):
    """Run ``cmd`` with stderr on a terminal; with ``during`` (a callable), the terminal is stopped
    first, as Ctrl-S does, so the CLI's first write to stderr (its first progress step, after all
    its checks) blocks; ``during()`` runs then, and the terminal is started again (Ctrl-Q).
    -> (exit code, stderr text without progress lines, stdout)."""
    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[0] |= termios.IXON
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    if during is not None:
        os.write(master, b"\x13")  # STOP
        time.sleep(0.2)  # the line discipline takes it asynchronously
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env, cwd=cwd)
    os.close(slave)
    try:
        if during is not None:
            deadline = time.time() + timeout
            while p.poll() is None and _syscall(p.pid)[:2] != ["1", "0x2"]:  # write(2, ...)
                if time.time() > deadline:
                    raise TimeoutError(f"{cmd[0]} never wrote to stderr")
                time.sleep(0.01)
            if p.poll() is None:
                during()
            os.write(master, b"\x11")  # START
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has gone
                break
            if not data:
                break
            chunks.append(data)
        stdout = p.stdout.read().decode()
        code = p.wait(timeout=timeout)
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
    text = b"".join(chunks).decode(errors="replace")
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    return code, [ln for ln in lines if not ln.startswith("sampling")], stdout


def check_case(case, command, bundle: Path, scratch: Path, prog: str, env=None) -> tuple[list[str], str]:
    """One output case for the CLI ``command`` (a list) whose error lines start with ``prog: error: ``
    -> (its problems, empty when it passed; its error message, with {scratch} for the scratch path)."""
    (scratch / "prompts.txt").write_text(case.get("prompts", "1\n"))
    subs = {"{bundle}": str(bundle), "{prompts}": str(scratch / "prompts.txt"), "{out}": str(scratch / "out"),
            "{scratch}": str(scratch)}

    def sub(a):
        for k, v in subs.items():
            a = a.replace(k, v)
        return a

    apply_setup(case.get("setup"), sub)
    expected = {}

    def during():
        apply_setup(case["during"], sub)
        expected.update(snapshot(scratch))

    expected.update(snapshot(scratch))
    code, lines, stdout = run_pausing([*command, *map(sub, case["args"])], during if case.get("during") else None,
                                      env=env, cwd=scratch)
    problems = []
    if code != case["exit_code"]:
        problems.append(f"exit code {code}, expected {case['exit_code']}")
    if len(lines) != 1 or not lines[0].startswith(f"{prog}: error: "):
        problems.append(f"stderr is not one '{prog}: error:' line: {lines}")
    elif not re.search(case["message"], lines[0]):
        problems.append(f"message {lines[0]!r} does not match {case['message']!r}")
    now = snapshot(scratch)
    if now != expected:
        changed = sorted(set(now) ^ set(expected) | {k for k in now if k in expected and now[k] != expected[k]})
        problems.append(f"the scratch directory changed: {changed}")
    message = lines[-1].split(": error: ", 1)[-1].replace(str(scratch), "{scratch}") if lines else ""
    return problems, message


def can_mount() -> bool:
    """Whether this process may mount a tmpfs in a private mount namespace."""
    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def in_tmpfs(mount_point: Path, commands, options: str = "size=16m", env=None, cwd=None):
    """Run ``commands`` (lists) one after the other in a private mount namespace where a fresh
    tmpfs (``options``) is mounted on the existing directory ``mount_point``, as a Docker volume
    is. -> ([(exit code, stderr)] per command, {path under the mount point: size or None for a
    directory}) as seen inside the namespace."""
    scratch = Path(cwd or mount_point.parent)
    lines = [f"mount -t tmpfs -o {shlex.quote(options)} tmpfs {shlex.quote(str(mount_point))} || exit 99"]
    for i, cmd in enumerate(commands):
        lines.append(f"{shlex.join(map(str, cmd))} 2> {shlex.quote(str(scratch / f'.err{i}'))}; "
                     f"echo $? > {shlex.quote(str(scratch / f'.rc{i}'))}")
    lines.append(f"cd {shlex.quote(str(mount_point))} && find . -mindepth 1 -printf '%y %s %P\\n' > "
                 f"{shlex.quote(str(scratch / '.listing'))}")
    p = subprocess.run(["unshare", "-m", "sh", "-c", "\n".join(lines)], env=env, cwd=cwd, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode != 99, p.stderr
    results = []
    for i in range(len(commands)):
        results.append((int((scratch / f".rc{i}").read_text()), (scratch / f".err{i}").read_text()))
        (scratch / f".rc{i}").unlink()
        (scratch / f".err{i}").unlink()
    listing = {}
    for ln in (scratch / ".listing").read_text().splitlines():
        kind, size, path = ln.split(" ", 2)
        listing[path] = None if kind == "d" else int(size)
    (scratch / ".listing").unlink()
    return results, listing


def check_mount_point(command, bundle: Path, tmp: Path, env=None) -> list[str]:
    """A run into an empty mount point (a Docker volume's root: a rename of it fails with EBUSY)
    writes into it; a second run is refused, and with --force replaces the earlier run's files
    there, stale ones (samples.npy, 001_*.png) included."""
    vol = tmp / "vol"
    vol.mkdir()
    (tmp / "p3.txt").write_text("1\n2\n3\n")
    (tmp / "p1.txt").write_text("0\n")
    base = ["--bundle", bundle, "--steps", "2", "-q", "-o", vol]
    results, listing = in_tmpfs(vol, [[*command, tmp / "p3.txt", *base, "--save-npy"],
                                      [*command, tmp / "p1.txt", *base],
                                      [*command, tmp / "p1.txt", *base, "--force"]], env=env)
    ok = (results[0] == results[2] == (0, "") and results[1][0] == 2 and "is not empty (use --force" in results[1][1]
          and sorted(listing) == ["000_0.png", "grid.png"])
    return [] if ok else [f"{results} {sorted(listing)}"]


def check_full_disk(command, bundle: Path, tmp: Path, prog: str, env=None) -> tuple[list[str], str]:
    """A disk that fills while the images are written (a tmpfs of two pages, -o two new levels
    below it): one line naming the cause, and nothing left, not even the parents the run made.
    -> (problems, the error message with TMP for ``tmp``)."""
    vol = tmp / "vol"
    vol.mkdir()
    (tmp / "p3.txt").write_text("1\n2\n3\n")
    out = vol / "a" / "b" / "out"
    (result,), listing = in_tmpfs(vol, [[*command, tmp / "p3.txt", "--bundle", bundle, "--steps", "2", "-q", "-o",
                                         out]], options="size=8k", env=env)
    want = f"{prog}: error: cannot write the output directory {out}: No space left on device\n"
    problems = [] if result == (2, want) and listing == {} else [f"{result} {listing}"]
    return problems, result[1].split(": error: ", 1)[-1].replace(str(tmp), "TMP")
