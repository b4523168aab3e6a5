"""The package layout (docs/layout.md): data flows one way, io -> retrieval ->
reconstruction (-> nn) -> cli, checked on every module's imports (parsed with ``ast``, so
imports inside functions count too); and the flat layout's module paths still import for one
release, as the very module at the new path, with a DeprecationWarning that names it."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from orgnn._moved import MOVED

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "orgnn"

#: stage -> the stages of ours it may import (besides itself)
ALLOWED = {
    "nn": set(),
    "distributed": set(),
    "io": set(),
    "datasets": {"io"},
    "retrieval": {"io", "distributed"},
    "reconstruction": {"io", "retrieval", "nn", "distributed"},
    "viz": {"io", "retrieval", "reconstruction", "nn", "datasets", "distributed"},
    "reid": {"io", "nn"},
    "cli": {"root", "io", "retrieval", "reconstruction", "nn", "datasets", "distributed",
            "viz", "reid"},
    "root": {"nn"},
}
#: modules that may import more than their stage: the image-side command group registers
#: itself with the command line and uses its argument checkers
EXTRA = {"orgnn.reid.commands": {"cli"}}
#: stages that must not import these third-party packages
NO_THIRD_PARTY = {"torchvision": {"nn", "io", "retrieval", "reconstruction", "datasets",
                                  "distributed", "root"},
                  "matplotlib": {"nn", "io", "retrieval", "reconstruction", "datasets",
                                 "distributed", "root", "cli"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def stage(name: str) -> str:
    parts = name.split(".")
    return "root" if len(parts) == 1 or parts[1].startswith("_") else parts[1]


def imports(path: Path) -> set[str]:
    """Absolute module names ``path`` imports anywhere (``from orgnn import viz`` gives
    ``orgnn.viz``, ``from orgnn import __version__`` gives ``orgnn``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES or full in MOVED else base)
    return found


def ours(names: set[str]) -> set[str]:
    return {n for n in names if n == "orgnn" or n.startswith("orgnn.")}


def test_layout_is_what_the_docs_say():
    stages = {stage(n) for n in MODULES}
    assert stages == set(ALLOWED), stages ^ set(ALLOWED)
    for old in MOVED:
        assert not (REPO / (old.replace(".", "/") + ".py")).exists(), f"{old} left a file"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_data_flows_one_way(name):
    assert stage(name) in ALLOWED, (f"{name}: a new top-level module; put it in the sub-package "
                                    f"of its stage (docs/layout.md) or add its stage here")
    allowed = ALLOWED[stage(name)] | EXTRA.get(name, set()) | {stage(name)}
    found = imports(MODULES[name])
    wrong = {n for n in ours(found) if stage(n) not in allowed}
    assert not wrong, f"{name} ({stage(name)}) imports {sorted(wrong)} against the data flow"
    for package, stages in NO_THIRD_PARTY.items():
        if stage(name) in stages:
            assert not {n for n in found if n.split(".")[0] == package}, \
                f"{name} imports {package}"


def test_io_leaves_import_nothing_of_ours():
    """storage (memory maps) and atomic (output sets) are the floor: the file format
    (features) builds on storage, never the other way round."""
    for name in ("orgnn.io.storage", "orgnn.io.atomic"):
        assert not ours(imports(MODULES[name])), name


def test_no_two_modules_import_each_other():
    graph = {n: {m for m in ours(imports(p)) if m in MODULES and m != n}
             for n, p in MODULES.items()}
    # a package's __init__ that re-exports its own modules is not a loop with them
    graph = {n: {m for m in deps if not (n.startswith(m + ".") and m in _packages())}
             for n, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import loop: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def _packages() -> set[str]:
    return {module_name(p) for p in PACKAGE.rglob("__init__.py")}


OLD = re.compile(r"\borgnn\.(" + "|".join(n.split(".")[1] for n in MOVED) + r")\b")


def test_nothing_uses_the_old_paths():
    """Code, tests, benchmarks, examples and docs name the new homes; only the changelog
    and this test (and the alias table) name the old ones."""
    skip = {REPO / "tests" / "test_layout.py", PACKAGE / "_moved.py",
            PACKAGE / "io" / "storage.py"}  # the alias table, storage's forward
    files = [p for folder in ("orgnn", "tests", "benchmarks", "examples")
             for p in (REPO / folder).rglob("*.py") if p not in skip]
    files += [REPO / "README.md", REPO / "setup.cfg", *(REPO / "docs").glob("*.md"),
              *(REPO / "docs").glob("*.rst"), REPO / "docs" / "conf.py"]
    stale = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in files
             for i, line in enumerate(p.read_text().splitlines(), 1) if OLD.search(line)]
    assert not stale, "old module paths:\n" + "\n".join(stale)


ALIAS_SCRIPT = r"""
import importlib, json, sys, warnings
from orgnn._moved import MOVED
out = {}
for old, new in MOVED.items():
    leaf = old.rpartition(".")[2]
    with warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("always")
        exec(compile(f"import {old}", __file__, "exec"), {})
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        exec(compile(f"import {old}\nfrom orgnn import {leaf}", __file__, "exec"), {})
    module, target = sys.modules[old], importlib.import_module(new)
    out[old] = dict(same=module is target, spec=target.__spec__.name,
                    named=target.__name__, warnings=[
                        (w.category.__name__, str(w.message), w.filename) for w in first],
                    again=len([w for w in again if w.category is DeprecationWarning]))
print(json.dumps(out))
"""


def test_old_module_paths_import_once_with_a_warning_naming_the_new_path(tmp_path):
    """Each old path, in a fresh interpreter: the first import warns (DeprecationWarning,
    naming the new path, attributed to the importing file), later imports in any form do
    not, and the module is the new one itself (so monkeypatching either name is seen
    through both)."""
    script = tmp_path / "importer.py"
    script.write_text(ALIAS_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert set(result) == set(MOVED)
    for old, new in MOVED.items():
        got = result[old]
        assert got["same"] and got["spec"] == new and got["named"] == new, (old, got)
        deprecations = [w for w in got["warnings"] if w[0] == "DeprecationWarning"]
        assert len(deprecations) == 1, (old, got["warnings"])
        category, message, filename = deprecations[0]
        assert f"{old} is deprecated" in message and f"import {new} instead" in message
        assert filename == str(script), (old, filename)
        assert got["again"] == 0, old


def test_old_path_forms_and_monkeypatching(monkeypatch):
    """``from orgnn.X import name``, ``from orgnn import X`` and ``import orgnn.X`` all give
    the new module's objects; a monkeypatch through the old name is seen through the new."""
    import orgnn.retrieval.metrics as new

    with warnings.catch_warnings():  # whether it warns here depends on the tests before
        warnings.simplefilter("ignore", DeprecationWarning)
        import orgnn.metrics as old
        from orgnn.metrics import evaluate

        from orgnn import metrics

    assert evaluate is new.evaluate and metrics is new and old is new
    monkeypatch.setattr("orgnn.metrics._ROW_BLOCK", 7)
    assert new._ROW_BLOCK == 7


def test_storage_forwards_the_mapped_reader_for_one_release():
    from orgnn.io import features, storage

    with pytest.warns(DeprecationWarning, match="orgnn.io.features.load_part_features_mapped"):
        assert storage.load_part_features_mapped is features.load_part_features_mapped
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        storage.nothing  # noqa: B018
