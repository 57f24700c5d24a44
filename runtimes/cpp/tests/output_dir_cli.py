"""The output-directory rules through BOTH CLIs (flexdit-run-cpp and flexdit-run), with the same
exit code and the same message once the program name is removed: every "output_cases" case of
flexdit_bundle/conformance/bad_inputs.json (symbolic links as -o, directories and links named like
outputs, a file added to -o while a --force run samples), and, where this process may mount a
tmpfs (root, unshare -m), a run into a mount point (written into, --force replacing an earlier
run there) and a full disk (one line naming the cause, no parent directory left behind).

usage: output_dir_cli.py REPO CLI FIXTURE_BUNDLE"""

import os
import sys
import tempfile
from pathlib import Path

repo, cli, fixture = Path(sys.argv[1]).resolve(), str(Path(sys.argv[2]).resolve()), Path(sys.argv[3]).resolve()
sys.path.insert(0, str(repo / "tests"))
from output_cases import OUTPUT_CASES, can_mount, check_case, check_full_disk, check_mount_point  # noqa: E402

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": f"{repo / 'runtimes' / 'python'}:{repo}"}
CLIS = {"cpp": ([cli], "flexdit-run-cpp"), "py": ([sys.executable, "-m", "flexdit_runtime.cli"], "flexdit-run")}
failures = count = 0


def report(name, problems):
    global failures, count
    count += 1
    failures += bool(problems)
    print(f"{'FAIL' if problems else 'ok  '} {name}" + "".join(f"\n     {x}" for x in problems))


for case in OUTPUT_CASES:
    messages = {}
    for prog, (command, name) in CLIS.items():
        with tempfile.TemporaryDirectory() as t:
            problems, messages[prog] = check_case(case, command, fixture, Path(t), name, env=ENV)
            report(f"{case['id']} ({prog})", problems)
    report(f"{case['id']}: both CLIs say the same", [] if len(set(messages.values())) == 1 else [str(messages)])


if not can_mount():
    print("skip mount-point cases: this process cannot mount a tmpfs (needs root and unshare -m)")
else:
    messages = {}
    for prog, (command, name) in CLIS.items():
        with tempfile.TemporaryDirectory() as t:
            report(f"mount point: written into, then --force replaces the earlier run there ({prog})",
                   check_mount_point(command, fixture, Path(t), env=ENV))
        with tempfile.TemporaryDirectory() as t:
            problems, messages[prog] = check_full_disk(command, fixture, Path(t), name, env=ENV)
            report(f"full disk: one line naming it, nothing left, not even the parents made ({prog})", problems)
    report("full disk: both CLIs say the same", [] if len(set(messages.values())) == 1 else [str(messages)])
print(f"{count} checks, {failures} failures")
sys.exit(1 if failures else 0)
