"""Model loading (``load``), architecture knowledge (``arch``) and the known models (``catalog``).

The names below are imported on first use, so that ``kedit.models.catalog`` (listing
models) does not pull in torch and transformers through this package.
"""

from importlib import import_module

_WHERE = {"ModelAdapter": "arch", "UnsupportedArchitecture": "arch", "spec_for": "arch",
          "DEFAULT_MODEL": "catalog", "ModelError": "catalog",
          "LoadedModel": "load", "load_model": "load"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'kedit.models' has no attribute '{name}'")
    return getattr(import_module(f"kedit.models.{_WHERE[name]}"), name)
