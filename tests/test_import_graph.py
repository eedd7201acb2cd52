"""No import loop in `tspin` or `tspin_kernels`, lazy imports (inside functions) included, and `tspin_kernels` never
imports `tspin`.

The graph is read from the source (every ``import`` / ``from ... import`` statement at any depth), not from a
running interpreter, so an import that only happens on some code path counts too. An edge goes to the module
named, or to the submodule when ``from package import name`` names one. A package's ``__init__`` running before
its submodules is Python's doing, not an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tspin", "tspin_kernels")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mod, is_package, node)
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [target, *subs]
            for t in targets:
                while t and t not in mods and "." in t:  # `import a.b.c` of a name inside a module
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_loop():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import loop: " + " -> ".join(cycle)


def test_the_kernels_never_import_the_trainer():
    graph = import_graph()
    bad = sorted((m, t) for m, ts in graph.items() if m.startswith("tspin_kernels") for t in ts
                 if t == "tspin" or t.startswith("tspin."))
    assert not bad, f"tspin_kernels imports tspin: {bad}"


@pytest.mark.parametrize("edges, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"a2"}, "a2": {"b"}, "b": {"a2"}}, ["a2", "b", "a2"]),
])
def test_the_cycle_finder_finds_cycles(edges, cycle):
    assert find_cycle(edges) == cycle


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
    """The real tree has edges the finder must see: a lazy import inside a function (generation's vLLM backend)
    and relative imports two levels up."""
    graph = import_graph()
    assert "tspin.generation.vllm_backend" in graph["tspin.generation.sampling"]  # lazy, inside functions
    assert "tspin.data" in graph["tspin.generation.sampling"]  # from ..data import ...
    assert "tspin_kernels.kernels.interpreter_probe" in graph["tspin_kernels._device"]  # lazy, in a function


# The recipes and what stands above them: they read a run's Config and hand each module below the settings it takes
# (tspin.settings builds them). config is the Config itself.
RECIPES = ("tspin.config", "tspin.cli", "tspin.selfplay", "tspin.settings")
ABOVE_RECIPES = ("tspin.experiments",)  # the demo and the study build configs and call the recipes


def _below_recipes() -> list[str]:
    return [m for m in _modules() if m.startswith("tspin") and not m.startswith("tspin_kernels") and m != "tspin"
            and m not in RECIPES and not any(m == a or m.startswith(a + ".") for a in ABOVE_RECIPES)]


def names_config(path: Path) -> list[int]:
    """Lines of `path` that name ``Config`` (a name, an attribute or an imported name)."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Name) and node.id == "Config" or isinstance(node, ast.Attribute) and \
                node.attr == "Config" or isinstance(node, ast.alias) and node.name == "Config":
            hits.append(node.lineno)
    return hits


def test_the_config_stops_at_the_recipes():
    """No module below the recipes imports tspin.config or names Config: the recipes turn the config into plain
    arguments and small settings of each module's own."""
    graph, mods = import_graph(), _modules()
    below = _below_recipes()
    assert "tspin.train" in below and "tspin.generation.sampling" in below and "tspin.selfplay" not in below
    bad = {m: sorted(graph[m] & set(RECIPES)) for m in below if graph[m] & set(RECIPES)}
    assert not bad, f"modules below the recipes import a recipe or the config: {bad}"
    named = {m: lines for m in below if (lines := names_config(mods[m]))}
    assert not named, f"modules below the recipes name Config (module: lines): {named}"


def test_the_config_check_sees_a_config(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from tspin.config import Config\n\ndef f(cfg: Config):\n    return cfg\n")
    assert names_config(path) == [1, 3]
    path.write_text("from transformers import LlamaConfig\n\ndef f(cfg: LlamaConfig):\n    return cfg\n")
    assert names_config(path) == []
