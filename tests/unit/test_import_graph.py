"""The import structure: no circle between first-party modules, no first-party import hidden in
a function or behind TYPE_CHECKING (the ways a circle is dodged), no service importing another,
`shared` importing no service."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shared", "services", "threadline")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _target(module: str, path: Path, node: ast.ImportFrom, name: str) -> str:
    base = node.module or ""
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, base] if base else package)
    full = f"{base}.{name}"
    return full if full in MODULES else base


def _imports(module: str, path: Path) -> list[tuple[str, ast.stmt, bool]]:
    """(imported first-party module, statement, whether it sits in a TYPE_CHECKING block)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            guarded.update(id(child) for child in ast.walk(node))
    result = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            targets = [_target(module, path, node, alias.name) for alias in node.names]
        else:
            continue
        result.extend((target, node, id(node) in guarded) for target in targets
                      if target in MODULES and target != module)
    return result


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def test_the_module_list_is_the_real_one() -> None:
    assert {"shared.bus", "shared.outbound", "services.conversations.core", "threadline.cli"} <= MODULES.keys()
    assert any(target == "shared.bus" for target, _, _ in GRAPH["shared.outbound"])


def test_no_import_is_hidden_in_a_function_or_behind_type_checking() -> None:
    hidden = [f"{module}:{node.lineno} imports {target}" for module, imports in GRAPH.items()
              for target, node, guarded in imports if guarded or node.col_offset > 0]
    assert hidden == []


def test_no_circle_between_modules() -> None:
    edges = {module: {target for target, _, _ in imports} for module, imports in GRAPH.items()}
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                circles.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert circles == []


def test_services_import_only_themselves_and_shared() -> None:
    crossing = []
    for module, imports in GRAPH.items():
        top = module.split(".")
        for target, node, _ in imports:
            if top[0] == "shared" and not target.startswith("shared"):
                crossing.append(f"{module}:{node.lineno} imports {target}")
            if top[0] == "services" and len(top) > 1 and target.startswith("services.") \
                    and target.split(".")[1] != top[1]:
                crossing.append(f"{module}:{node.lineno} imports {target}")
    assert crossing == []
