"""A registry of named classes of one kind (eviction policies, admission policies).

A config names a class; the registry finds it, importing the modules that register the
built-in ones on the first miss, so a config can name any built-in without importing it first.
"""

from __future__ import annotations

import importlib
import sys
from typing import Generic, TypeVar

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    def __init__(self, kind: str, base: type, builtin_modules: tuple[str, ...] = ()) -> None:
        self.kind = kind                    # e.g. "eviction policy", for messages
        self.base = base
        self.builtin_modules = builtin_modules
        self._classes: dict[str, T] = {}

    def register(self, cls: T) -> T:
        """Class decorator: make ``cls`` available as ``cls.name``."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"{cls!r} is not an {self.base.__name__} subclass")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__name__} needs a non-empty class attribute 'name'")
        known = self._classes.get(name)
        if known is not None and known is not cls:
            raise ValueError(f"{self.kind} name {name!r} is taken by {known.__qualname__}")
        self._classes[name] = cls
        return cls

    def get(self, name: str) -> T | None:
        """The class registered as ``name``, built-in modules included; None if unknown."""
        cls = self._classes.get(name)
        if cls is None and self._import_builtins():
            cls = self._classes.get(name)
        return cls

    def names(self) -> list[str]:
        self._import_builtins()
        return sorted(self._classes)

    def _import_builtins(self) -> bool:
        """Import the modules that register built-ins; False if none was new."""
        imported = False
        for module_name in self.builtin_modules:
            if module_name in sys.modules:
                continue
            try:
                importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name != module_name:
                    raise
                continue
            imported = True
        return imported
