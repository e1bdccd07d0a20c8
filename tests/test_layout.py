"""The package layout's import rules, read from the source (every import, at module level or inside a
function): no import circle, and the core (`workbench`) and the environments (`envs`) never reach up
into the two families."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("workbench", "envs", "agents", "adaptation")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The project modules `path` imports (`from a.b import c` counts as a.b, and as a.b.c where that is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    return {name: {m for m in imported_modules(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None; depth-first search with colours."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_circle_and_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle():
    # a package's __init__ importing its own submodules is no circle of modules
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in import_graph().items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_core_and_the_environments_never_import_a_family():
    below = {"workbench": {"envs", "agents", "adaptation"}, "envs": {"agents", "adaptation"}}
    wrong = [f"{m} imports {d}" for m, deps in import_graph().items() for d in deps
             if d.split(".")[0] in below.get(m.split(".")[0], set())]
    assert not wrong, wrong


def test_the_dense_tasks_import_no_other_task():
    """Segmentation and pose share adaptation.dense (heads, models) and adaptation.common (data plumbing), and
    nothing of each other, of classification or of the command line."""
    tasks = ("adaptation.classification", "adaptation.segmentation", "adaptation.pose", "adaptation.cli")
    wrong = [f"{m} imports {d}" for m, deps in import_graph().items() for d in deps
             if m.startswith(("adaptation.segmentation", "adaptation.pose"))
             and any(d.startswith(t) for t in tasks if not m.startswith(t))]
    assert not wrong, wrong


def test_the_two_families_never_import_each_other():
    """Agents and adaptation meet in the core only: `workbench adapt --target procgen:...` reaches the agents'
    adapter through the task registry (workbench.tasks), which names modules instead of importing them."""
    other = {"agents": "adaptation", "adaptation": "agents"}
    wrong = [f"{m} imports {d}" for m, deps in import_graph().items() for d in deps
             if d.split(".")[0] == other.get(m.split(".")[0])]
    assert not wrong, wrong
