"""Public names imported on first use (PEP 562), so importing a package pays only for what is used."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Iterable
from typing import Any


class _Package(types.ModuleType):
    """A package whose public functions may share a submodule's name (``bigcat.synth`` the
    function, ``bigcat/synth.py`` the module): importing the submodule does not rebind the name."""

    _lazy_names: frozenset[str] = frozenset()

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._lazy_names and isinstance(value, types.ModuleType):
            return  # the import system naming a submodule: the public function keeps the name
        super().__setattr__(name, value)


def lazy_exports(package: str, where: dict[str, Iterable[str]]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` for ``where``: module → the names it defines."""
    module_of = {name: module for module, names in where.items() for name in names}
    module = sys.modules[package]
    module.__class__ = _Package
    module.__dict__["_lazy_names"] = frozenset(module_of)
    namespace = module.__dict__

    def __getattr__(name: str) -> Any:
        if name in module_of:
            value = getattr(importlib.import_module(module_of[name]), name)
            namespace[name] = value  # later lookups skip this function
            return value
        msg = f"module {package!r} has no attribute {name!r}"
        raise AttributeError(msg)

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(module_of))

    return __getattr__, __dir__
