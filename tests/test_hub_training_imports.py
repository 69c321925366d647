"""Imports of the training (``hf_normsoftmax/training/``) and sharing (``hf_normsoftmax/hub/``) layers point down.

They import the modules they use, never the package root (``import hf_normsoftmax``, ``from hf_normsoftmax import``,
``from .. import``), whose ``__init__`` registers every variant and would tie these layers to all of it; and the
Trainer mixin (``hub/trainer.py``) uses only public names of other modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_normsoftmax"
LAYER_FILES = sorted([*(PACKAGE / "hub").glob("*.py"), *(PACKAGE / "training").glob("*.py")])


def _imports(path: Path):
    """``(module, names, line)`` of every import statement of ``path``; relative modules resolved."""
    package = path.parent.relative_to(PACKAGE.parent).parts
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            yield module, [alias.name for alias in node.names], node.lineno


@pytest.mark.parametrize("path", LAYER_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_layer_never_imports_the_package_root(path):
    for module, names, line in _imports(path):
        assert module != "hf_normsoftmax", (
            f"{path.parent.name}/{path.name}:{line} imports the package root ({names or 'import hf_normsoftmax'}): "
            "import the module that defines the name"
        )


def test_trainer_mixin_imports_no_private_names():
    path = PACKAGE / "hub" / "trainer.py"
    private = [(module, name, line) for module, names, line in _imports(path) if module.startswith("hf_normsoftmax")
               for name in names if name.startswith("_")]
    assert not private, f"hub/trainer.py imports private names of other modules: {private}"
