"""Names of a package resolved from its submodules on first access (PEP 562 ``__getattr__`` / ``__dir__``).

``hub/`` and ``training/`` use it so that importing them stays cheap. It imports nothing of the package.

Usage (in a package ``__init__``)::

    __getattr__, __dir__ = lazy_exports(globals(), {"write_card": "card", "push_model": "push"})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any


def lazy_exports(
    package_globals: MutableMapping[str, Any], exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The package's ``__getattr__`` and ``__dir__``: ``exports`` maps a public name to the submodule (relative to
    the package) that defines it; a name is imported on first access and then kept in the package's globals."""
    package = package_globals["__name__"]

    def __getattr__(name: str) -> Any:
        submodule = exports.get(name)
        if submodule is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{submodule}"), name)
        package_globals[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(package_globals) | set(exports))

    return __getattr__, __dir__
