"""Method registry: ``@register`` a Method subclass; ``get(name)`` with "did you mean"."""

from __future__ import annotations

import difflib
import importlib

from kedit.methods.base import Method

# Modules that define methods, by kind (the folder says where the edit lives); importing
# them runs their @register decorators.
METHOD_MODULES = (
    "kedit.methods.locate.rome", "kedit.methods.locate.memit",            # weights
    "kedit.methods.locate.alphaedit", "kedit.methods.locate.emmet",
    "kedit.methods.finetune.ft",
    "kedit.methods.finetune.lora",                                        # adapter
    "kedit.methods.memory.grace", "kedit.methods.memory.wise",            # memory
    "kedit.methods.context.ike",                                          # context
    "kedit.methods.learned.mend", "kedit.methods.learned.serac",          # trained editors
)
KINDS = ("weights", "adapter", "memory", "context")


class Registry:
    def __init__(self) -> None:
        self._methods: dict[str, type[Method]] = {}

    def register(self, cls: type[Method]) -> type[Method]:
        if not cls.name:
            raise ValueError(f"{cls.__name__} has no name")
        if cls.kind not in KINDS:
            raise ValueError(f"method '{cls.name}' has kind {cls.kind!r}, not one of {', '.join(KINDS)}")
        if cls.name in self._methods and self._methods[cls.name] is not cls:
            raise ValueError(f"method '{cls.name}' is registered twice ({self._methods[cls.name].__name__}, {cls.__name__})")
        self._methods[cls.name] = cls
        return cls

    def _load_builtin(self) -> None:
        for mod in METHOD_MODULES:
            importlib.import_module(mod)

    def get(self, name: str) -> type[Method]:
        self._load_builtin()
        key = name.lower()
        if key not in self._methods:
            close = difflib.get_close_matches(key, list(self._methods), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise KeyError(f"unknown method '{name}' (known: {', '.join(sorted(self._methods))}){hint}")
        return self._methods[key]

    def names(self) -> list[str]:
        self._load_builtin()
        return sorted(self._methods)


REGISTRY = Registry()
register = REGISTRY.register
get_method = REGISTRY.get
method_names = REGISTRY.names
