"""The one-way layering: ops standalone; config imports nothing of the pipeline;
modeling knows no data, engine, evaluation or tracking; engine and evaluation never
import each other; nothing under pipeline/ or ops/ imports launch/."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "ops": ("pipeline", "launch"),
    "pipeline/config": (
        "pipeline.data",
        "pipeline.modeling",
        "pipeline.engine",
        "pipeline.evaluation",
        "pipeline.tracking",
        "ops",
        "launch",
    ),
    "pipeline/modeling": (
        "pipeline.data",
        "pipeline.engine",
        "pipeline.evaluation",
        "pipeline.tracking",
        "launch",
    ),
    "pipeline/data": ("pipeline.modeling", "pipeline.engine", "pipeline.evaluation", "launch"),
    "pipeline/engine": ("pipeline.evaluation", "launch"),
    "pipeline/evaluation": ("pipeline.engine", "launch"),
    "pipeline/distributed.py": ("pipeline", "ops", "launch"),
    "pipeline/collectives.py": ("pipeline", "ops", "launch"),
    # The run directory's contract, below the train stage that writes it and the evaluation
    # that reads it.
    "pipeline/rundir.py": ("pipeline", "ops", "launch"),
    "pipeline/tracking": (
        "pipeline.data",
        "pipeline.modeling",
        "pipeline.engine",
        "pipeline.evaluation",
        "launch",
    ),
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # resolve a relative import against the file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_what_it_may(layer):
    root = REPO / layer
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    for path in files:
        for module in imported_modules(path):
            for banned in FORBIDDEN[layer]:
                assert module != banned and not module.startswith(banned + "."), (
                    f"{path.relative_to(REPO)} imports {module}"
                )
