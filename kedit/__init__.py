"""kedit: a command-line experiment runner for knowledge editing of language models.

Python API (the CLI is a thin layer over it)::

    import kedit
    model = kedit.load_model("smollm2-135m")
    result = kedit.edit(model, "cases/messi.jsonl", method="rome")
    result.metrics["post"]["rewrite_acc"]
"""

__version__ = "0.1.0"


def load_model(*args, **kwargs):
    """See :func:`kedit.models.load.load_model`."""
    from kedit.models.load import load_model as _load

    return _load(*args, **kwargs)


def edit(*args, **kwargs):
    """See :func:`kedit.api.edit`."""
    from kedit.api import edit as _edit

    return _edit(*args, **kwargs)


__all__ = ["__version__", "edit", "load_model"]
