"""The app's import graph, read from the source (every import statement, including the ones inside functions):
nothing the app runs imports training/, and no modules of pipelines/ (or of demo/) depend on each other in a
loop."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "demo", "pipelines", "training", "scripts", "benchmarks", "tests")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_path(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(name: str) -> set[str]:
    """The repository modules `name` imports anywhere in its source ("from pkg import mod" counts as pkg.mod)."""
    path = module_path(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and module_path(target) is None:
                target = target.rpartition(".")[0]
            if target and target.split(".")[0] in PACKAGES and target != name:
                found.add(target)
    return found


def reachable(roots: list[str]) -> dict[str, set[str]]:
    """module -> the repository modules it imports, for every module reachable from `roots`."""
    graph: dict[str, set[str]] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name not in graph:
            graph[name] = imports_of(name)
            todo += sorted(graph[name])
    return graph


def app_roots() -> list[str]:
    files = [REPO / "app.py", *sorted((REPO / "demo").glob("*.py")), *sorted((REPO / "pipelines").rglob("*.py"))]
    return [module_name(f) for f in files]


def cycle(graph: dict[str, set[str]], within: str) -> list[str] | None:
    """One import loop among the modules under `within` (package __init__ files aside), or None."""
    nodes = {n for n in graph if n.startswith(within + ".")}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, path.append(node)
        for nxt in sorted(graph[node] & nodes):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node], _ = 2, path.pop()
        return None

    for node in sorted(nodes):
        if node not in state and (found := visit(node)):
            return found
    return None


def arrows_into(graph: dict[str, set[str]], package: str) -> list[str]:
    """"a -> b" for every import of a module under `package` by a module outside it."""
    return sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                  if t.split(".")[0] == package and m.split(".")[0] != package)


def test_the_app_never_imports_training():
    graph = reachable(app_roots())
    assert "pipelines.engine" in graph and "demo.common" in graph  # the walk did reach the app's modules
    assert arrows_into(graph, "training") == []


def test_pipelines_and_demo_have_no_import_cycle():
    graph = reachable(app_roots())
    assert cycle(graph, "pipelines") is None
    assert cycle(graph, "demo") is None


def test_the_checks_see_what_they_look_for():
    # A loop and an arrow into training/ in a made-up graph are found, so an empty answer above means none.
    made_up = {"pipelines.a": {"pipelines.b"}, "pipelines.b": {"pipelines.a", "training.text"}, "training.text": set()}
    assert cycle(made_up, "pipelines") == ["pipelines.a", "pipelines.b", "pipelines.a"]
    assert arrows_into(made_up, "training") == ["pipelines.b -> training.text"]
    assert "pipelines.engine" in imports_of("app")  # imports inside functions count
    assert "pipelines.settings" in imports_of("training.evaluate_finetune")  # "from pkg.mod import name": pkg.mod
