"""The package layout: every module is in the module map, and no modules import each other in a cycle.

The module map is `docs/architecture.md` §3. A package whose ``__init__.py`` only marks
the package may be listed by its folder (``elmcore/engine/``); every other module by its
path. The import graph is built from the source with ``ast``: only imports that run when
a module is imported count (module level, class bodies, top-level ``if``/``try``), not
imports inside functions, which run later and are how a lazy import breaks a cycle.
"""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("elmcore", "elm_cli")
ARCHITECTURE = os.path.join(ROOT, "docs", "architecture.md")


def module_files():
    """Every .py file of the packages, as a path relative to the repository root with '/'."""
    found = []
    for package in PACKAGES:
        for folder, dirs, files in os.walk(os.path.join(ROOT, package)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
            for name in sorted(files):
                if name.endswith(".py"):
                    found.append(os.path.relpath(os.path.join(folder, name), ROOT).replace(os.sep, "/"))
    return found


def module_map_section(text):
    match = re.search(r"^## 3\. Module map$(.*?)^## 4\.", text, re.M | re.S)
    assert match, "docs/architecture.md has no section '## 3. Module map' followed by '## 4.'"
    return match.group(1)


def listed_paths(section):
    """The paths the map names: every backticked module or folder under elmcore/ or elm_cli/."""
    tokens = re.findall(r"`((?:%s)/[A-Za-z0-9_./]*)`" % "|".join(PACKAGES), section)
    return {token for token in tokens if token.endswith((".py", "/"))}


def missing_from_map(files, listed):
    missing = []
    for path in files:
        folder = path.rsplit("/", 1)[0] + "/"
        if path in listed or (path.endswith("/__init__.py") and folder in listed):
            continue
        missing.append(path)
    return missing


def test_every_module_is_in_the_module_map():
    listed = listed_paths(module_map_section(open(ARCHITECTURE, encoding="utf-8").read()))
    assert missing_from_map(module_files(), listed) == []


def test_every_module_map_entry_names_a_module():
    listed = listed_paths(module_map_section(open(ARCHITECTURE, encoding="utf-8").read()))
    stale = [path for path in sorted(listed) if not os.path.exists(os.path.join(ROOT, path))]
    assert stale == []


def test_the_docs_name_only_modules_that_exist():
    """Every elmcore/... or elm_cli/... module path the docs and the README name is a real file."""
    stale = []
    for doc in ("README.md", "docs/architecture.md", "docs/gradients.md", "docs/spec.md"):
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            text = f.read()
        for path in re.findall(r"\b((?:%s)/[A-Za-z0-9_/]*\.py)\b" % "|".join(PACKAGES), text):
            if not os.path.exists(os.path.join(ROOT, path)):
                stale.append(f"{doc}: {path}")
    assert stale == []


def test_the_map_check_catches_a_missing_module():
    section = "| `elmcore/engine/backend.py` | x |\nthe `elmcore/engine/` package\n"
    files = ["elmcore/engine/__init__.py", "elmcore/engine/backend.py", "elmcore/engine/factory.py"]
    assert missing_from_map(files, listed_paths(section)) == ["elmcore/engine/factory.py"]


# ---- import cycles ------------------------------------------------------------------------

def module_name(path):
    name = path[:-len(".py")].replace("/", ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


def import_time_nodes(tree):
    """The import statements that run when the module is imported (not those inside functions)."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        pending.extend(ast.iter_child_nodes(node))


def imported_modules(name, is_package, tree, known):
    """The known modules ``name`` imports at import time.

    ``from P import x`` imports module P.x when that is a module, else P itself (x is a
    name P defines, so P must finish first).
    """
    package = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in import_time_nodes(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            anchor = ".".join(parts[:len(parts) - (node.level - 1)])
            base = f"{anchor}.{base}" if base else anchor
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            targets.add(submodule if submodule in known else base)
    return {target for target in targets if target in known and target != name}


def import_graph(files):
    known = {module_name(path) for path in files}
    graph = {}
    for path in files:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        name = module_name(path)
        graph[name] = imported_modules(name, path.endswith("__init__.py"), tree, known)
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules (first = last), or None."""
    state = {}
    stack = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_modules_import_each_other_without_a_cycle():
    graph = import_graph(module_files())
    assert "elmcore.neuron.model" in graph["elmcore"]  # the graph sees the imports it should
    assert "elmcore.engine.time_constants" in graph["elmcore.network.model"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("source, expected", [
    ("from elmcore.b import f\n", {"elmcore.b"}),
    ("from . import b\n", {"elmcore.b"}),
    ("from .b import f\n", {"elmcore.b"}),
    ("import elmcore.b\n", {"elmcore.b"}),
    ("try:\n    from elmcore import b\nexcept ImportError:\n    pass\n", {"elmcore.b"}),
    ("class K:\n    from elmcore.b import f\n", {"elmcore.b"}),
    ("def lazy():\n    from elmcore.b import f\n", set()),
])
def test_import_graph_reads_import_time_imports_only(source, expected):
    known = {"elmcore", "elmcore.a", "elmcore.b"}
    assert imported_modules("elmcore.a", False, ast.parse(source), known) == expected


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
