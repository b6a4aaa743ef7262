"""The architecture, as the imports show it: packages by concern, commands apart, no cycles, config without torch.

titanlite/*.py are the commands (train, launch, prepare, convert, generate, plan, diagnose);
titanlite/<package>/ are the library they share. The training path never imports a command,
the model knows nothing of parallelism, and config/ loads without torch.
"""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "titanlite"
COMMANDS = {"train", "launch", "prepare", "convert", "generate", "plan", "diagnose"}


def module_name(path: Path) -> str:
    """titanlite/data/loader.py -> data.loader; titanlite/train.py -> train."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """module -> the titanlite modules it imports (anywhere in the file, function bodies included)."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    graph = {}
    for path in paths:
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            if isinstance(node, ast.ImportFrom) and node.module == "titanlite":  # from titanlite import x
                names = [f"titanlite.{alias.name}" for alias in node.names]
            imported |= {name.removeprefix("titanlite.") for name in names if name.startswith("titanlite.")}
        graph[module_name(path)] = (imported & modules) - {module_name(path)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert {"config.load", "model.transformer", "model.attention", "train", "data.loader"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_library_module_imports_a_command():
    # The commands use the packages, never the other way round; train.py imports no other command.
    graph = import_graph()
    assert COMMANDS <= set(graph), COMMANDS - set(graph)
    offenders = {module: sorted(graph[module] & COMMANDS) for module in graph
                 if graph[module] & COMMANDS and module not in COMMANDS}
    assert offenders == {}
    assert graph["train"] & COMMANDS == set()


def test_the_model_knows_nothing_of_parallelism_or_training():
    graph = import_graph()
    for module in (m for m in graph if m.startswith("model.")):
        outside = {target.split(".")[0] for target in graph[module]} - {"model", "config"}
        assert outside == set(), f"{module} imports {sorted(graph[module])}"


def test_an_import_checker_that_sees_a_forbidden_arrow():
    graph = {"data.loader": {"prepare"}, "prepare": {"data.loader"}}
    assert {m for m in graph if graph[m] & COMMANDS and m not in COMMANDS} == {"data.loader"}


def test_config_imports_without_torch():
    # run_train.sh and the tools check a config before any process starts: config/ must not pull torch.
    code = ("import sys, titanlite.config.load, titanlite.config.resolve, titanlite.model.size, titanlite.plan; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
