"""The package layout: imports point one way (apps -> tuner_zoo/llm -> l2l) and no package has an
import cycle among its modules. Read from the source (every import statement, including those
inside functions), so a lazy import cannot hide a wrong-way dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("l2l", "llm", "tuner_zoo", "finetune", "pretrain_tuner")
# what each package may import of the others (and of Lightning, which only the apps use)
ALLOWED = {
    "l2l": set(),
    "llm": {"l2l"},
    "tuner_zoo": {"l2l", "llm"},
    "finetune": {"l2l", "llm", "tuner_zoo", "lightning"},
    "pretrain_tuner": {"l2l", "llm", "tuner_zoo", "lightning"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def modules(package: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package: str) -> None:
    wrong = []
    for name, path in modules(package).items():
        for imported in imports_of(path):
            top = imported.split(".")[0]
            if top == "pytorch_lightning" or (top in (*PACKAGES, "lightning") and top != package):
                if top not in ALLOWED[package]:
                    wrong.append(f"{name} imports {imported}")
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package])}: " + "; ".join(wrong)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_inside_a_package(package: str) -> None:
    mods = modules(package)
    graph = {
        name: {m for m in imports_of(path) if m in mods and m != name and m != package}
        for name, path in mods.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            pytest.fail(f"import cycle in {package}: {' -> '.join(cycle)}")


def test_the_checks_catch_a_lazy_wrong_way_import_and_a_cycle(tmp_path: Path, monkeypatch) -> None:
    pkg = tmp_path / "l2l"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from finetune.run import Run\n")
    (pkg / "b.py").write_text("from l2l import c\n")
    (pkg / "c.py").write_text("def g():\n    from .b import x\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="l2l.a imports finetune.run"):
        test_imports_point_one_way("l2l")
    with pytest.raises(pytest.fail.Exception, match="l2l.b -> l2l.c -> l2l.b"):
        test_no_import_cycle_inside_a_package("l2l")
