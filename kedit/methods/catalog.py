"""The methods kedit ships, listed without importing them.

``kedit methods`` needs each method's name, kind and one-line description; importing the
method modules to read three class attributes would pull in torch and transformers
(seconds).  :func:`shipped_methods` reads those attributes from the modules' source
instead: each class decorated with ``@register`` and the literal ``name``, ``kind`` and
``description`` it (or a class it derives from) sets.  The registry imports the same
modules (:data:`METHOD_MODULES`) and is what every other command uses.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path

# Modules that define methods, by kind (the folder says where the edit lives); importing
# them runs their @register decorators.
METHOD_MODULES = (
    "kedit.methods.locate.rome", "kedit.methods.locate.memit",            # weights
    "kedit.methods.locate.alphaedit", "kedit.methods.locate.emmet",
    "kedit.methods.locate.pmet", "kedit.methods.locate.kn", "kedit.methods.locate.ultraedit",
    "kedit.methods.finetune.ft",
    "kedit.methods.finetune.lora",                                        # adapter
    "kedit.methods.memory.grace", "kedit.methods.memory.wise",            # memory
    "kedit.methods.context.ike",                                          # context
    "kedit.methods.learned.mend", "kedit.methods.learned.serac",          # trained editors
)
KINDS = ("weights", "adapter", "memory", "context")
#: what :class:`kedit.methods.base.Method` sets when a subclass does not
DEFAULTS = {"name": "", "kind": "weights", "description": ""}


class UnreadableMethod(ValueError):
    """A registered class whose name, kind or description is not a literal in its source."""


@dataclass(frozen=True)
class MethodInfo:
    name: str
    kind: str
    description: str


@dataclass(frozen=True)
class _ClassSource:
    module: str
    bases: tuple[str, ...]
    fields: dict
    registered: bool


def _class_sources(module: str) -> dict[str, _ClassSource]:
    origin = importlib.util.find_spec(module).origin
    tree = ast.parse(Path(origin).read_text(encoding="utf-8"), filename=origin)
    out = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = {}
        for stmt in node.body:
            target, value = None, None
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                target, value = stmt.targets[0], stmt.value
            elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
                target, value = stmt.target, stmt.value
            if isinstance(target, ast.Name) and target.id in DEFAULTS:
                try:
                    fields[target.id] = ast.literal_eval(value)
                except ValueError:
                    raise UnreadableMethod(f"{module}.{node.name}.{target.id} is not a literal") from None
        out[node.name] = _ClassSource(
            module, tuple(b.id for b in node.bases if isinstance(b, ast.Name)), fields,
            any(isinstance(d, ast.Name) and d.id == "register" for d in node.decorator_list))
    return out


def shipped_methods() -> list[MethodInfo]:
    """Every ``@register``-ed method in :data:`METHOD_MODULES`, sorted by name."""
    by_module = {m: _class_sources(m) for m in METHOD_MODULES}

    def lookup(cls: str, module: str) -> _ClassSource | None:
        if cls in by_module[module]:
            return by_module[module][cls]
        found = [src[cls] for src in by_module.values() if cls in src]
        return found[0] if len(found) == 1 else None

    def field(src: _ClassSource, key: str, seen: int = 0):
        if key in src.fields:
            return src.fields[key]
        for base in src.bases:
            parent = lookup(base, src.module)
            if parent is not None and seen < 16:
                return field(parent, key, seen + 1)
        return DEFAULTS[key]

    out = [MethodInfo(*(field(src, k) for k in ("name", "kind", "description")))
           for classes in by_module.values() for src in classes.values() if src.registered]
    return sorted(out, key=lambda m: m.name)
