"""The package's shape: packages by concept, no import cycles, no private names across modules.

These hold the layout ``docs/architecture.md`` describes; a change that breaks one of them is
a change of architecture and should say so.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "composer_shear"
CONCEPTS = {
    "callbacks",
    "data",
    "distillation",
    "downstream",
    "export",
    "families",
    "pruning",
    "report",
    "weights",
}
TOP_LEVEL = {
    "__init__",
    "cli",
    "demo",
    "interface",
    "launch",
    "output_paths",
    "plan",
    "shape",
    "sharding",
    "wrappers",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(module, names, at module level) of every composer_shear import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    # `if TYPE_CHECKING:` imports are module-level too (annotations only).
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            top |= {id(child) for child in node.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("composer_shear"):
                found.append((node.module, [a.name for a in node.names], id(node) in top))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("composer_shear"):
                    found.append((alias.name, [], id(node) in top))
    return found


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(module: str, name: str, modules: dict[str, Path]) -> str:
    """``from module import name``: the submodule when ``name`` is one, else ``module``."""
    return f"{module}.{name}" if f"{module}.{name}" in modules else module


def test_packages_by_concept():
    entries = {p.stem for p in PACKAGE.glob("*.py")}
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages == CONCEPTS
    assert entries == TOP_LEVEL
    for package in packages:
        doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
        assert doc, f"composer_shear.{package} says nothing about what it owns"


def test_import_graph_has_no_cycle():
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for module, names, at_top in _imports(path):
            if not at_top:
                continue  # deferred imports run after every module is loaded
            targets = {_resolve(module, n, modules) for n in names} or {module}
            # Importing a.b.c runs a/__init__ and a/b/__init__ first: those are edges too.
            for target in list(targets):
                parts = target.split(".")
                targets |= {".".join(parts[:i]) for i in range(2, len(parts))}
            graph[name] |= {t for t in targets if t in modules and t != name}
    # A package's __init__ re-exporting its submodules is the package, not a dependency of
    # its submodules on each other: drop edges from a submodule to its own package.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(f"{t}.")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_private_names_across_modules():
    modules = _modules()
    offenders = []
    for name, path in modules.items():
        for module, names, _ in _imports(path):
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            if private and module != name:
                offenders.append(f"{name} imports {private} from {module}")
    assert not offenders, offenders


def test_function_level_imports_are_only_for_startup_cost():
    """Deferred imports of our own modules are for startup cost only, never for a boundary.

    Allowed: the CLI (``composer-shear --help`` builds no model) and a package's lazy
    re-export (``data.build_multi_domain_dataloader`` pulls in LLM Foundry).
    """
    modules = _modules()
    offenders = [
        f"{name}: {module}"
        for name, path in modules.items()
        for module, _, at_top in _imports(path)
        if not at_top and name != "composer_shear.cli" and path.name != "__init__.py"
    ]
    assert not offenders, offenders


@pytest.mark.parametrize(
    "group",
    [
        "llmfoundry_algorithms",
        "llmfoundry_callbacks",
        "llmfoundry_loggers",
        "llmfoundry_dataloaders",
    ],
)
def test_entry_points_load(group):
    ours = [
        ep for ep in importlib.metadata.entry_points(group=group) if "composer_shear" in ep.value
    ]
    assert ours, f"no composer_shear entry point in {group}"
    for entry_point in ours:
        assert callable(entry_point.load())


def test_registry_classes_keep_their_public_paths():
    """Entry points and users' imports name the package, not the module inside it."""
    pruning = importlib.import_module("composer_shear.pruning")
    distillation = importlib.import_module("composer_shear.distillation")
    assert pruning.TargetedPruning.__module__ == "composer_shear.pruning.algorithm"
    assert distillation.KnowledgeDistillation.__module__ == "composer_shear.distillation.algorithm"
