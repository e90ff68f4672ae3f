"""The shape of the ``gateway`` package (issue 10): small modules and no import circles.

The import graph is read from the source (the AST of every module), not from a running
interpreter: an import inside a function or under ``if TYPE_CHECKING:`` counts like one at the
top, because hiding an import there is how a circle is usually dodged rather than fixed.
``from gateway.x import y`` is an edge to ``gateway.x.y`` where that is a module, else to
``gateway.x``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "gateway"
MAX_LINES = 500


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package`` (a package is its
    ``__init__.py``)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _known_module(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` lives in: itself, else its longest known parent; None if outside."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imported_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute name of the module a ``from ... import`` reads from."""
    if not node.level:
        return node.module or ""
    base = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{node.module}" if node.module else base


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its source."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [_known_module(alias.name, modules) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _imported_from(node, module, path.name == "__init__.py")
            targets = [
                f"{source}.{alias.name}"
                if f"{source}.{alias.name}" in modules
                else _known_module(source, modules)
                for alias in node.names
            ]
        else:
            continue
        found.update(target for target in targets if target and target != module)
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    modules = module_files(package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (first module repeated at the end) per back edge of a depth-first search."""
    cycles: list[list[str]] = []
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> None:
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if target in path:
                cycles.append([*path[path.index(target) :], target])
            elif target not in done:
                visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module)
    return cycles


# The kit's own code besides the relay (tests are exempt: a test file reads as a list).
OTHER_CODE = ("deploykit", "roles", "devkit", "lab", "bench")


def test_no_module_is_longer_than_500_lines() -> None:
    paths = [*module_files(PACKAGE).values()]
    paths += [path for folder in OTHER_CODE for path in (ROOT / folder).rglob("*.py")]
    lengths = {
        str(path.relative_to(ROOT)): len(path.read_text(encoding="utf-8").splitlines())
        for path in paths
        if ".venv" not in path.parts and "cache" not in path.parts
    }
    too_long = {name: lines for name, lines in lengths.items() if lines > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def test_no_import_cycle_in_the_gateway_package() -> None:
    cycles = import_cycles(import_graph(PACKAGE))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_graph_sees_imports_in_functions_and_submodules_named_in_from(tmp_path) -> None:
    """The check itself: a circle hidden in a function body, through ``from pkg import sub``
    and a relative import, is found."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def later():\n    from .. import a\n")
    (package / "c.py").write_text("import pkg.sub.b\nfrom pkg.a import something\n")

    graph = import_graph(package)

    assert graph == {
        "pkg": set(),
        "pkg.a": {"pkg.sub.b"},
        "pkg.c": {"pkg.sub.b", "pkg.a"},
        "pkg.sub": set(),
        "pkg.sub.b": {"pkg.a"},
    }
    assert import_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.a"]]
