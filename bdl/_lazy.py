"""Lazy attribute access for package ``__init__`` modules (keeps ``import bdl, gp`` cheap)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(
    package: str, names: Mapping[str, str], submodules: Sequence[str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` that import public names on first use.

    Parameters
    ----------
    package : str
        The package's name, e.g. ``"gp"``.
    names : mapping of str to str
        Public name -> module defining it.
    submodules : sequence of str
        Subpackages reachable as attributes.
    namespace : dict
        The package's ``globals()``; resolved names are cached there.
    """

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(names[name]), name)
        elif name in submodules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names) | set(submodules))

    return __getattr__, __dir__
