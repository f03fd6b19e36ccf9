"""The package's import graph, read from its `import` statements (at module level and inside
functions): it has no cycle, and the suite's modules, which the CLI's parser and the reports load,
import neither torch nor pandas."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "repro"


def module_names(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `package` (a package is its __init__.py)."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph(package: Path) -> dict[str, dict[str, str]]:
    """module -> {module of the package it imports: where the first such import is (file:line)}.
    `from p import m` imports the module p.m when there is one; any other imported name stands for
    the deepest module of the package that its dotted name starts with."""
    modules = module_names(package)
    graph = {}
    for name, path in modules.items():
        home = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]  # what `.` means here
        edges: dict[str, str] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                anchor = home[:len(home) - node.level + 1] if node.level else []
                base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.setdefault(target, f"{path.relative_to(package.parent)}:{node.lineno}")
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle, as a closed path of modules, through each group of modules that import each other
    (each strongly connected component of more than one module, found with Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while not group or group[-1] != module:
                group.append(stack.pop())
            if len(group) > 1:
                groups.append(sorted(group))

    for module in graph:
        if module not in index:
            visit(module)
    return [shortest_cycle(graph, group) for group in groups]


def shortest_cycle(graph: dict[str, dict[str, str]], group: list[str]) -> list[str]:
    """The shortest path from the group's first module back to itself, within the group."""
    start, paths = group[0], {group[0]: [group[0]]}
    frontier = [start]
    while frontier:
        following = []
        for module in frontier:
            for target in graph[module]:
                if target == start:
                    return paths[module] + [start]
                if target in group and target not in paths:
                    paths[target] = paths[module] + [target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"{group} is not a cycle")


def describe(graph: dict[str, dict[str, str]], cycle: list[str]) -> str:
    """a -> b (a.py:3) -> a (b.py:7): each arrow with the import that makes it."""
    return cycle[0] + "".join(f" -> {b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:]))


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert "repro.suite.plan" in graph["repro.suite.local"]  # the graph is read, not empty
    found = cycles(graph)
    assert not found, ("import cycles among repro's modules; break each one (the file:line is the import "
                       "that makes the arrow):\n" + "\n".join(describe(graph, c) for c in found))


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "front.py").write_text("def run():\n    from pkg.sub import back\n")
    (package / "sub" / "back.py").write_text("from ..front import run\n")
    (package / "sub" / "side.py").write_text("import pkg.front\nfrom . import back\n")
    graph = import_graph(package)
    assert graph["pkg.sub.side"] == {"pkg.front": "pkg/sub/side.py:1", "pkg.sub.back": "pkg/sub/side.py:2"}
    [cycle] = cycles(graph)
    assert describe(graph, cycle) == "pkg.front -> pkg.sub.back (pkg/front.py:2) -> pkg.front (pkg/sub/back.py:1)"


def test_the_suite_modules_import_neither_torch_nor_pandas():
    code = ("import sys, repro.suite.run_all, repro.suite.plan, repro.suite.local, repro.suite.slurm; "
            "print(' '.join(sorted({'torch', 'pandas'} & set(sys.modules))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_the_engine_reaches_nothing_of_reuse_reports_or_suite():
    graph = import_graph(PACKAGE)
    reached, frontier = set(), ["repro.engine"]
    while frontier:
        module = frontier.pop()
        for target in graph[module]:
            if target not in reached:
                reached.add(target)
                frontier.append(target)
    above = sorted(m for m in reached if m.startswith(("repro.reuse", "repro.reports", "repro.suite")))
    assert "repro.run_network" in reached and not above, f"repro.engine imports, through its imports: {above}"
