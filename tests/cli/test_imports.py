"""The package dependency graph has one direction: runtime <- contract <- calib <- compiler
<- demo evaluation (calib is a sub-package of the compiler that the rest of it builds on). Read
from the source with ``ast`` (every import statement, also the ones inside functions), so a lazy
import cannot hide a cycle."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"flexdit_export": ROOT / "flexdit_export", "flexdit_export.calib": ROOT / "flexdit_export/calib",
            "flexdit_bundle": ROOT / "flexdit_bundle", "flexdit_runtime": ROOT / "runtimes/python/flexdit_runtime",
            "flexdit_fashion": ROOT / "examples/fashion/flexdit_fashion"}


def owner(module: str):
    """The package of PACKAGES a dotted module name belongs to (the deepest that contains it)."""
    hits = [p for p in PACKAGES if module == p or module.startswith(p + ".")]
    return max(hits, key=len) if hits else None


def imported_packages(package: str) -> dict:
    """{imported package of this project: [files that import it]} over every module."""
    out = {}
    inner = [PACKAGES[p] for p in PACKAGES if p.startswith(package + ".")]
    for path in PACKAGES[package].rglob("*.py"):
        if any(d in path.parents for d in inner):
            continue  # a sub-package listed on its own
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.ImportFrom):  # relative: resolved, so `from ..` cannot leave unseen
                here = [*package.split("."), *path.relative_to(PACKAGES[package]).parent.parts]
                base = here[:len(here) - node.level + 1] if node.level > 1 else here
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                continue
            for name in names:
                top = owner(name)
                if top is not None and top != package:
                    out.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return out


def test_package_imports_form_no_cycle():
    graph = {p: set(imported_packages(p)) for p in PACKAGES}
    done, stack = set(), []

    def visit(p):
        if p in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(p):] + [p]))
        if p in done:
            return
        stack.append(p)
        for q in sorted(graph[p]):
            visit(q)
        stack.pop()
        done.add(p)

    for p in PACKAGES:
        visit(p)


def test_calib_never_imports_the_compiler():
    deps = imported_packages("flexdit_export.calib")
    assert "flexdit_export" not in deps and "flexdit_fashion" not in deps, deps


def test_compiler_reaches_the_fashion_demo_only_through_the_gate_plug_in():
    deps = imported_packages("flexdit_export")
    assert "flexdit_fashion" not in deps, deps["flexdit_fashion"]
    # by name, lazily, in one place; and no path into the source tree
    modules = {p.name: p.read_text() for p in PACKAGES["flexdit_export"].rglob("*.py")}
    assert [name for name, text in modules.items() if "flexdit_fashion." in text] == ["quality_gates.py"]
    assert not any("fashion-classifier" in text for text in modules.values())


def test_the_runtime_and_the_contract_import_no_compiler():
    for pkg in ("flexdit_runtime", "flexdit_bundle"):
        deps = imported_packages(pkg)
        assert not set(deps) & {"flexdit_export", "flexdit_export.calib", "flexdit_fashion"}, (pkg, deps)
