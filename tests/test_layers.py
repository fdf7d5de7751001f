"""The package's layering rule, checked on the source (ast), so the floor plan cannot drift.

Layers, lowest first (README "Layout"):
  root       config, layout, errors, runtime, cache, progress: import only each other
  data       imports root
  vision, models, scoring   import root and data (and their own sub-package)
  decoding   imports those
  stages, serving, engines  import anything below, never each other (nor one stage another)
  cli        (root, but the one entry point) imports anything

Also: no import cycle between modules, and a `captioner` import inside a function only where
the module it names loads TensorFlow, Keras, LiteRT or FastAPI when imported (the import
is lazy on purpose: `caption --help` must not pay for TensorFlow).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "captioner"
HEAVY = ("tensorflow", "keras", "ai_edge_litert", "fastapi")  # what a lazy import may put off

# sub-package -> the layers it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "root": {"root"},
    "data": {"root"},
    "vision": {"root", "data"},
    "models": {"root", "data"},
    "scoring": {"root", "data"},
    "decoding": {"root", "data", "vision", "models", "scoring"},
    "stages": {"root", "data", "vision", "models", "scoring", "decoding"},
    "serving": {"root", "data", "vision", "models", "scoring", "decoding"},
    "engines": {"root", "data", "vision", "models", "scoring", "decoding"},
}
ENTRY = "captioner.cli"  # the one module that may import stages and serving
# Within stages, what a stage may share with the others: no stage imports another stage.
STAGE_SHARED = {"captioner.stages", "captioner.stages.checkpoints", "captioner.stages.runloop", "captioner.stages.report"}


def read_modules(package: Path) -> dict[str, ast.Module]:
    """{dotted module name: its parsed source} for every .py file under `package`."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return modules


def _imports(tree: ast.Module) -> list[tuple[str, bool, int, str]]:
    """(module, inside a function?, line, name imported from it or "") for every import."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function, child.lineno, "") for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                # `from captioner.data import images` imports the module captioner.data.images
                found.extend(
                    (child.module, in_function, child.lineno, alias.name) for alias in child.names
                )
            visit(child, inner)

    visit(tree, False)
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED and parts[1] != "root") else "root"


def check(modules: dict[str, ast.Module]) -> list[str]:
    """Every break of the layering rule in `modules`, one line each (empty when it holds)."""
    edges: dict[str, set[str]] = {name: set() for name in modules}
    lazy: list[tuple[str, str, int]] = []
    top_level_heavy = {name: False for name in modules}
    for name, tree in modules.items():
        for module, in_function, line, imported in _imports(tree):
            target = f"{module}.{imported}" if f"{module}.{imported}" in modules else module
            if target.split(".")[0] in HEAVY and not in_function:
                top_level_heavy[name] = True
            if target not in modules or target == name:
                continue
            if not in_function:
                edges[name].add(target)
            else:
                lazy.append((name, target, line))
    problems = []

    def loads_heavy(target: str, seen: set[str]) -> bool:
        if top_level_heavy[target]:
            return True
        seen.add(target)
        return any(loads_heavy(t, seen) for t in edges[target] if t not in seen)

    for name, target, line in lazy:
        if not loads_heavy(target, set()):
            problems.append(f"{name}:{line}: imports {target} inside a function, but {target} loads no "
                            f"{'/'.join(HEAVY)}: import it at the top")
        edges[name].add(target)  # a lazy import is still an edge for layers and cycles
    for name, targets in edges.items():
        source = layer_of(name)
        for target in sorted(targets):
            wanted = layer_of(target)
            if name == ENTRY or target == "captioner":
                continue
            if wanted == source == "stages" and target not in STAGE_SHARED:
                problems.append(f"{name} imports {target}: a stage never imports another stage")
                continue
            if wanted == source:
                continue
            if target == ENTRY or wanted not in ALLOWED[source]:
                problems.append(f"{name} ({source}) imports {target} ({wanted}): not allowed by the layers")
    problems.extend(f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(edges))
    return problems


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def walk(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                walk(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            walk(node)
    return cycles


def test_the_package_keeps_its_layers():
    assert check(read_modules(PACKAGE)) == []


def _with_extra_import(module: str, line: str, function: bool = False) -> dict[str, ast.Module]:
    modules = read_modules(PACKAGE)
    code = f"def _late():\n    {line}\n" if function else f"{line}\n"
    modules[module].body.extend(ast.parse(code).body)
    return modules


@pytest.mark.parametrize(
    "module, line, function, expected",
    [
        # a stage importing a stage (training once imported evaluation for the report reader)
        ("captioner.stages.training", "from captioner.stages import evaluation", False, "never imports another stage"),
        # serving importing a stage
        ("captioner.serving.serve", "from captioner.stages import features", False, "not allowed by the layers"),
        # data reaching up into models
        ("captioner.data.sequences", "from captioner.models import losses", False, "not allowed by the layers"),
        # the root importing a sub-package
        ("captioner.cache", "from captioner.data import tokenizer", False, "not allowed by the layers"),
        # a lazy import of a light module hides an edge
        ("captioner.decoding.beam", "from captioner.data import tokenizer", True, "inside a function"),
        # a cycle inside one layer
        ("captioner.data.cleaning", "from captioner.data import captions", False, "import cycle"),
    ],
)
def test_a_wrong_import_is_caught(module, line, function, expected):
    problems = check(_with_extra_import(module, line, function))
    assert any(expected in problem for problem in problems), problems


def test_a_lazy_import_of_a_keras_module_is_allowed():
    assert check(_with_extra_import("captioner.stages.evaluation", "from captioner.models import merge", True)) == []


def test_the_inference_path_loads_no_tensorflow_or_keras():
    program = textwrap.dedent(
        """
        import sys
        import captioner.decoding.beam, captioner.decoding.ensemble, captioner.decoding.explain
        import captioner.vision.tflite, captioner.data.images, captioner.data.tokenizer
        import captioner.decoding.bundle, captioner.decoding.inference, captioner.cli
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
        print(heavy)
        sys.exit(1 if heavy else 0)
        """
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
