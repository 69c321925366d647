"""Entry point of the ``hf-normsoftmax`` console script; the commands themselves are in ``hf_normsoftmax/cli.py``.

Why a module outside the package: ``import hf_normsoftmax`` registers the variants with transformers' Auto classes
(public behaviour: ``import hf_normsoftmax`` then ``AutoModel.from_pretrained(...)``), so it imports torch and
transformers, seconds of CPU. A console script ``hf_normsoftmax.cli:main`` would pay that before parsing its
arguments, because Python runs a package's ``__init__`` before any of its submodules. This module loads
``hf_normsoftmax/cli.py`` (argparse and the standard library at import time) without running the package's
``__init__``: ``hf-normsoftmax --help`` and usage errors import neither torch nor transformers. Each subcommand's
handler imports what it needs, and with it the whole package, when it runs (tests/test_cli.py checks both).

``python -m hf_normsoftmax.cli`` runs the same commands through the ordinary import (slower to start).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

__all__ = ["main"]

_PACKAGE = "hf_normsoftmax"
_CLI_MODULE = "hf_normsoftmax.cli"


def _load_cli():
    """The ``hf_normsoftmax.cli`` module, loaded without executing ``hf_normsoftmax/__init__.py`` if possible."""
    loaded = sys.modules.get(_CLI_MODULE)
    if loaded is not None:
        return loaded
    if _PACKAGE in sys.modules:  # the package is imported already: the ordinary import costs nothing more
        return importlib.import_module(_CLI_MODULE)
    package = importlib.util.find_spec(_PACKAGE)  # finds the package without executing it
    if package is None:
        raise ModuleNotFoundError(f"No module named {_PACKAGE!r}: install it with `pip install hf_normsoftmax`",
                                  name=_PACKAGE)
    path = next((os.path.join(directory, "cli.py") for directory in package.submodule_search_locations or ()
                 if os.path.isfile(os.path.join(directory, "cli.py"))), None)
    if path is None:  # not a plain directory (e.g. a zip import): the ordinary, slower import
        return importlib.import_module(_CLI_MODULE)
    spec = importlib.util.spec_from_file_location(_CLI_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    # Registered under its real name, so its relative imports (`from .hub.card import ...`, run inside the
    # handlers) import the package, with its Auto registration, at that moment.
    sys.modules[_CLI_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(_CLI_MODULE, None)
        raise
    return module


def main(argv: list[str] | None = None) -> int:
    """Run ``hf-normsoftmax`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    return _load_cli().main(argv)


if __name__ == "__main__":
    sys.exit(main())
