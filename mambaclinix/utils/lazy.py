"""Package attributes loaded on first access (PEP 562), so that importing a package stays light."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(
    package: str, table: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` that import ``table[name]`` on first access.

    ``table`` maps an attribute to the module that defines it under the same name. The value is cached
    in the package's namespace, so the import happens once::

        __getattr__, __dir__ = lazy_attributes(__name__, {"Thing": "package.module"})
    """
    table = dict(table)

    def __getattr__(name: str) -> Any:
        if name in table:
            value = getattr(importlib.import_module(table[name]), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__
