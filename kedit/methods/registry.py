"""Method registry: ``@register`` a Method subclass; ``get(name)`` with "did you mean".

``get`` takes the names people type: case, ``-`` and ``_`` do not matter (``FT-L``,
``ft-l``, ``ft_l`` and ``FTL`` are ``ft_l``; ``AlphaEdit`` is ``alphaedit``), plus the
aliases in :data:`ALIASES`.  The class it returns carries the canonical ``name``, which
is what configs, run directories and ``kedit methods`` use."""

from __future__ import annotations

import difflib
import importlib

from kedit.config import ConfigError
from kedit.methods.catalog import KINDS, METHOD_MODULES
from kedit.methods.base import Method


class UnknownMethod(ConfigError, KeyError):
    """A method name nothing is registered under: a ConfigError (one line) that is also the
    KeyError a registry lookup has always raised."""
#: Other names of a registered method (folded as in :func:`fold`).  Only names that mean the
#: method as kedit ships it: r-ROME (Gupta et al. 2024) is ROME with the averaged key in the
#: update's denominator too, which is kedit's ``rome`` default (``key_mode: averaged``).
ALIASES = {"rrome": "rome"}


def fold(name: str) -> str:
    """A method name with case, ``-`` and ``_`` (and surrounding blanks) dropped: ``FT-L`` -> ``ftl``."""
    return name.strip().lower().replace("-", "").replace("_", "")


class Registry:
    def __init__(self) -> None:
        self._methods: dict[str, type[Method]] = {}

    def register(self, cls: type[Method]) -> type[Method]:
        if not cls.name:
            raise ValueError(f"{cls.__name__} has no name")
        clash = [n for n in self._methods if fold(n) == fold(cls.name) and n != cls.name]
        if clash:
            raise ValueError(f"method '{cls.name}' folds to the same name as '{clash[0]}' (case, '-', '_' are ignored)")
        if cls.kind not in KINDS:
            raise ValueError(f"method '{cls.name}' has kind {cls.kind!r}, not one of {', '.join(KINDS)}")
        if cls.name in self._methods and self._methods[cls.name] is not cls:
            raise ValueError(f"method '{cls.name}' is registered twice ({self._methods[cls.name].__name__}, {cls.__name__})")
        self._methods[cls.name] = cls
        return cls

    def _load_builtin(self) -> None:
        for mod in METHOD_MODULES:
            importlib.import_module(mod)

    def canonical(self, name: str) -> str | None:
        """The registered name ``name`` stands for (case, ``-``, ``_`` and aliases folded), or None."""
        self._load_builtin()
        folded = {fold(n): n for n in self._methods}
        key = fold(name)
        return folded.get(key) or folded.get(fold(ALIASES.get(key, "")))

    def get(self, name: str) -> type[Method]:
        key = self.canonical(name)
        if key is None:
            close = difflib.get_close_matches(name.lower(), list(self._methods), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UnknownMethod(f"unknown method '{name}' (known: {', '.join(sorted(self._methods))}){hint}")
        return self._methods[key]

    def names(self) -> list[str]:
        self._load_builtin()
        return sorted(self._methods)


REGISTRY = Registry()
register = REGISTRY.register
get_method = REGISTRY.get
method_names = REGISTRY.names
