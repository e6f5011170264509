"""A small name -> object registry that discovers its entries by importing every module of a package.

Adding a format, a recipe family or a target is adding one file: the file registers itself
at import time, and ``Registry`` imports all modules of its package the first time it is asked.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, Iterator, TypeVar

from .errors import SlmExportError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries keyed by name; ``package`` is imported module by module on first lookup."""

    def __init__(self, kind: str, package: str | None = None):
        self.kind = kind
        self.package = package
        self._entries: dict[str, T] = {}
        self._discovered = package is None

    def register(self, name: str, entry: T) -> T:
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        pkg = importlib.import_module(self.package)
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def get(self, name: str) -> T:
        """The entry called ``name``; an unknown name is an error listing the known ones."""
        self._discover()
        try:
            return self._entries[name]
        except KeyError:
            raise SlmExportError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """Registered names in registration order (module name order for discovered packages)."""
        self._discover()
        return list(self._entries)

    def __iter__(self) -> Iterator[T]:
        self._discover()
        return iter(list(self._entries.values()))

    def __contains__(self, name: str) -> bool:
        self._discover()
        return name in self._entries
