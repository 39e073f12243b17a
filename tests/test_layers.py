"""Imports flow one way: scripts -> src/fusetune -> kernels/, and no module imports one that imports it back.

Every module under src/fusetune and kernels/ is parsed with ``ast``; its imports (at module level and
inside functions, relative and absolute) make the import graph. ``from package import name`` counts
as an import of ``package.name`` where that is a module, else of ``package`` itself. A package's
``__init__`` that Python runs before one of its modules is not counted: it is the package, not an
import the module chose.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"fusetune": ROOT / "src" / "fusetune", "fusetune_kernels": ROOT / "kernels"}
APP = "fusetune.app"
HYDRA = ("hydra", "omegaconf")


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the two packages."""
    modules = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def imported_names(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module ``name`` imports, anywhere in its file (absolute names, ours and others')."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.add(submodule if submodule in modules else target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_names(name, path, modules) for name, path in modules.items()}


def ours(graph: dict[str, set[str]], name: str) -> set[str]:
    return {target for target in graph[name] if target in graph}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among our modules, as a path that ends where it began, or None."""
    state: dict[str, str] = {}  # "open" while on the stack, "done" after
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = "open"
        stack.append(name)
        for target in sorted(ours(graph, name)):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "fusetune.forwards" in graph["fusetune.sequences.graphs"]  # relative, module level
    assert "fusetune_kernels.cross_entropy" in graph["fusetune.sequences.graphs"]  # absolute, module level
    assert "transformers.integrations" in graph["fusetune.training.trainer"]  # inside a method


def test_a_cycle_is_found_however_long():
    graph = {"a": {"b", "os"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_library_does_not_import_the_app_or_hydra():
    graph = import_graph()
    offenders = {
        name: sorted(t for t in targets if t == APP or t.startswith(APP + ".") or t.split(".")[0] in HYDRA)
        for name, targets in graph.items()
        if name.startswith("fusetune") and not (name == APP or name.startswith(APP + "."))
    }
    assert {name: bad for name, bad in offenders.items() if bad} == {}


def test_kernels_import_nothing_from_fusetune():
    graph = import_graph()
    offenders = {
        name: sorted(t for t in targets if t.split(".")[0] == "fusetune")
        for name, targets in graph.items()
        if name.startswith("fusetune_kernels")
    }
    assert {name: bad for name, bad in offenders.items() if bad} == {}


def test_nothing_imports_the_test_seams():
    """fusetune.testing holds the switches only tests use: no module of the library, the app or the kernels imports
    it, so none of them is part of a run."""
    graph = import_graph()
    assert "fusetune.testing" in graph and "fusetune_kernels.utils" in graph["fusetune.testing"]  # it was parsed
    assert sorted(name for name, targets in graph.items() if "fusetune.testing" in targets) == []


def test_import_fusetune_loads_no_hydra():
    code = "import sys, fusetune; print(sorted(m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr  # libraries may print first


def unnamed_in_layout(readme: str, folder: Path) -> list[str]:
    """The modules under ``folder`` (``__init__``/``__main__`` aside) whose names the README's layout block
    does not hold as a word, and its packages it does not name as ``name/``."""
    start = readme.index("## Layout")
    block = readme[start : readme.index("```\n", readme.index("```", start) + 3)]
    words = set(re.findall(r"\w+", block))
    stems = {p.stem for p in folder.rglob("*.py") if p.stem not in ("__init__", "__main__")}
    packages = {p.parent.name + "/" for p in folder.rglob("*/__init__.py")}
    return sorted([stem for stem in stems if stem not in words] + [p for p in packages if p not in block])


def test_the_readme_layout_names_every_library_module(tmp_path):
    """A newcomer finds every module of the library and the app in the README's layout, said what it is for."""
    readme = (ROOT / "README.md").read_text()
    assert unnamed_in_layout(readme, SOURCES["fusetune"]) == []
    (tmp_path / "newcomer.py").write_text("")  # a module the layout does not name is reported
    (tmp_path / "grouped").mkdir()  # and a package
    (tmp_path / "grouped" / "__init__.py").write_text("")
    assert unnamed_in_layout(readme, tmp_path) == ["grouped/", "newcomer"]
