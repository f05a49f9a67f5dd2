"""The project's shape, as issue 33 asks it to stay: no module imports another that imports it back,
directly or around a circle (imports inside functions count; the `__main__` block does not), and the
method and the driver stay short enough to read."""
import ast

from conftest import ROOT

MODULES = {path.stem: path for path in ROOT.glob("*.py")}


def project_imports(path) -> set[str]:
    """The project's modules that `path` imports anywhere but in its `if __name__ == "__main__":` block."""
    tree = ast.parse(path.read_text())
    main_blocks = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
    skipped = {id(n) for block in main_blocks for n in ast.walk(block)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & MODULES.keys()


def circle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of the graph (its modules in order, the first again at the end), found by a depth-first
    walk that meets a module still on its own path; None where there is none."""
    finished, path = set(), []

    def walk(name):
        if name in path:
            return path[path.index(name):] + [name]
        if name in finished:
            return None
        path.append(name)
        found = next((c for c in map(walk, sorted(graph[name])) if c), None)
        path.pop()
        finished.add(name)
        return found
    return next((c for c in map(walk, sorted(graph)) if c), None)


def test_the_imports_make_no_circle():
    graph = {name: project_imports(path) for name, path in MODULES.items()}
    assert {"speed", "sampler"} <= graph["devices"] and "devices" in graph["emerdiff"]  # real imports are read
    assert circle(graph) is None


def test_a_circle_would_be_found():
    """As it once was: devices imported emerdiff inside a function, emerdiff imports devices."""
    graph = {"devices": {"sampler", "emerdiff"}, "emerdiff": {"devices", "sampler"}, "sampler": set()}
    assert circle(graph) == ["devices", "emerdiff", "devices"]
    assert circle(graph | {"devices": {"sampler"}}) is None


def test_the_method_and_the_driver_stay_short():
    """emerdiff.py the paper's steps (405: Step 4's decodes a function of their own, so that segment frees the
    attention record before them); runner.py the command line around them (600: its option table grew by the
    named segments' four, whose work lives in vocabulary.py)."""
    lines = {name: len(MODULES[name].read_text().splitlines()) for name in ("emerdiff", "runner")}
    assert lines["emerdiff"] <= 405 and lines["runner"] <= 600, lines
