"""Model loading (``load``) and architecture knowledge (``arch``)."""

from kedit.models.arch import ModelAdapter, UnsupportedArchitecture, spec_for
from kedit.models.load import DEFAULT_MODEL, LoadedModel, ModelError, load_model

__all__ = ["DEFAULT_MODEL", "LoadedModel", "ModelAdapter", "ModelError", "UnsupportedArchitecture",
           "load_model", "spec_for"]
