"""The import structure of DESIGN.md section 2: data flows one way, with no cycles.

Every import in the two packages (module level and inside functions) is read from the source.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("occam_kernels", "occamnets")


def module_files():
    for package in PACKAGES:
        for folder, _, names in os.walk(os.path.join(ROOT, package)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    yield module.removesuffix(".__init__"), path, name == "__init__.py"


MODULES = {module: (path, is_package) for module, path, is_package in module_files()}


def imports_of(module):
    """Modules `module` imports (resolved to our modules where they are ours)."""
    path, is_package = MODULES[module]
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                # `from package import module` imports that module.
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return {name for name in found if name.split(".")[0] in PACKAGES}


GRAPH = {module: imports_of(module) for module in MODULES}


def test_the_graph_sees_the_known_imports():
    assert "occam_kernels._backends" in GRAPH["occam_kernels.triton.exit_head"]
    assert "occamnets.evaluate" in GRAPH["occamnets.train"]
    assert "occam_kernels" in GRAPH["occamnets.models.exits"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_imports(module):
    imported = GRAPH[module]
    if module.startswith("occam_kernels"):
        assert not {m for m in imported if m.startswith("occamnets")}, "kernels import models"
    if module.startswith("occam_kernels.triton"):
        assert not {m for m in imported if m.startswith("occam_kernels.ops")}, \
            "a kernel file imports the op layer"
    assert "occamnets.cli" not in imported, "the CLI is imported as a library"


def test_no_import_cycles():
    # A module importing its own package's __init__ is not a cycle Python trips on only if
    # the __init__ does not import it back; count every edge.
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if target not in MODULES:
                continue
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module)
