"""The code's shape, as the README's layout promises it: no import circles, training without the submission
code, small modules."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dstrain"


def _imports_at_module_level(path: Path):
    """dstrain modules that `path` imports when it is imported (not those imported inside functions)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dstrain"):
            if node.module == "dstrain":
                yield from (alias.name for alias in node.names)
            else:
                yield node.module.split(".")[1]
        elif isinstance(node, ast.Import):
            yield from (alias.name.split(".")[1] for alias in node.names if alias.name.startswith("dstrain."))


def test_no_import_circles():
    graph = {path.stem: set(_imports_at_module_level(path)) for path in PACKAGE.glob("*.py")}
    visiting, done = [], set()

    def visit(module):
        if module in done:
            return
        assert module not in visiting, f"import circle: {' -> '.join(visiting[visiting.index(module):] + [module])}"
        visiting.append(module)
        for imported in sorted(graph.get(module, ())):
            visit(imported)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_training_does_not_load_the_submission_code_or_the_commands():
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, dstrain.trainer, dstrain.launch; print(' '.join(sys.modules))"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    assert "dstrain.slurm" not in loaded and "dstrain.commands" not in loaded


def test_no_module_is_over_400_lines():
    sizes = {path.name: len(path.read_text().splitlines()) for path in PACKAGE.glob("*.py")}
    assert {name: size for name, size in sizes.items() if size > 400} == {}
