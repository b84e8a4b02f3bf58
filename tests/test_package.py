# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""The package's shape: every module imports, no two modules import each other (directly or round a longer
loop, at module level or in a function), and the public surfaces hold the entry points."""

import ast
import importlib
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

PACKAGE = "torchtune_medusa"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: Dict[str, Path] = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def import_statements(tree: ast.Module) -> List[ast.stmt]:
    """Every import statement of a module, at module level or deferred into a function (a deferred import that
    dodges a cycle at import time still ties the two modules together), except under ``if TYPE_CHECKING``."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif _is_type_checking_block(node):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))
    return found


def imported_modules(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The package modules ``name`` imports (``from pkg import sub`` counts as importing ``sub`` when ``sub`` is a
    module, else ``pkg``)."""
    is_package = path.name == "__init__.py"
    out: Set[str] = set()
    for node in import_statements(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in known)
            continue
        base = node.module or ""
        if node.level:  # relative: from the module's package, up level - 1 more
            package = name.split(".") if is_package else name.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        for alias in node.names:
            target = f"{base}.{alias.name}"
            if target in known:
                out.add(target)
            elif base in known:
                out.add(base)
    out.discard(name)
    return out


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """A cycle of ``graph`` as ``[a, b, ..., a]``, or None when it is acyclic (depth-first search)."""
    state: Dict[str, str] = {}  # "open" while on the stack, "done" after
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
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


def test_find_cycle_names_the_loop():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]
    assert find_cycle({"a": {"a2"}, "a2": {"a"}}) == ["a", "a2", "a"]


def test_import_graph_counts_deferred_imports_but_not_type_checking_ones(tmp_path):
    source = (
        "import os\nfrom typing import TYPE_CHECKING\nfrom pkg import y\nfrom pkg.z import f\n"
        "if TYPE_CHECKING:\n    from pkg import w\n"
        "try:\n    from . import v\nexcept ImportError:\n    pass\n"
        "def later():\n    from pkg import u\n"
    )
    (tmp_path / "x.py").write_text(source)
    known = {"pkg", "pkg.x", "pkg.y", "pkg.z", "pkg.w", "pkg.v", "pkg.u"}
    assert imported_modules("pkg.x", tmp_path / "x.py", known) == {"pkg.y", "pkg.z", "pkg.v", "pkg.u"}


def test_no_import_cycle_in_the_package():
    """Issue 15.4: ``generation._tree`` and ``generation._calibration`` imported each other (the first inside a
    function, to dodge the cycle at import time)."""
    known = set(MODULES)
    graph = {name: imported_modules(name, path, known) for name, path in MODULES.items()}
    assert "torchtune_medusa.generation._tree" in graph and len(graph) > 20
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_generation_exports_the_entry_points_only():
    """Issue 15.3: 36 names, internals included, were exported."""
    import torchtune_medusa.generation as generation

    assert set(generation.__all__) == {
        "generate",
        "medusa_generate",
        "GenerationOutput",
        "GenerationStats",
        "calibrate_tree",
        "CalibratedTree",
        "measure_head_accuracies",
        "measure_step_cost",
        "load_tree",
        "save_tree",
        "resolve_choices",
        "decode_settings",
        "DecodeSettings",
    }
    for internal in ("greedy_node_mask", "select_path", "evict_to_path", "build_tree_buffers", "kv_caches"):
        assert not hasattr(generation, internal), internal


SUBPACKAGES = ("data", "generation", "models", "modules", "training")


@pytest.mark.parametrize("package", [PACKAGE, *(f"{PACKAGE}.{p}" for p in SUBPACKAGES)])
def test_public_names_resolve(package):
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ names {missing}, which it does not define"


def test_training_exports_what_users_need():
    import torchtune_medusa.training as training

    assert {"MedusaHFCheckpointer", "evaluate_heads", "evaluate_decoding"} <= set(training.__all__)
    assert "_recipe_utils" not in (training.__doc__ or "") and "_validation" not in (training.__doc__ or "")
