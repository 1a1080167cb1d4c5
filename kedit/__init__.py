"""kedit: a command-line experiment runner for knowledge editing of language models.

Python API (the CLI is a thin layer over it; see :mod:`kedit.api`)::

    import kedit
    model = kedit.load_model("smollm2-135m")
    result = kedit.edit(model, "cases/messi.jsonl", method="rome")
    result.metrics["post"]["rewrite_acc"]
    with result.applied():
        kedit.generate(model, ["Lionel Messi plays"])

Nothing heavy is imported until a function is called.
"""

from kedit.util.version import __version__


def load_model(*args, **kwargs):
    """See :func:`kedit.models.load.load_model`."""
    from kedit.models.load import load_model as _load

    return _load(*args, **kwargs)


def edit(*args, **kwargs):
    """See :func:`kedit.api.edit`."""
    from kedit.api import edit as _edit

    return _edit(*args, **kwargs)


def load_run(*args, **kwargs):
    """See :func:`kedit.api.load_run`."""
    from kedit.api import load_run as _load_run

    return _load_run(*args, **kwargs)


def load_edited(*args, **kwargs):
    """See :func:`kedit.runs.export.load_edited`: a directory from ``kedit apply`` /
    ``result.export`` as a model that behaves edited (memories and contexts included)."""
    from kedit.runs.export import load_edited as _load_edited

    return _load_edited(*args, **kwargs)


def generate(*args, **kwargs):
    """See :func:`kedit.api.generate`."""
    from kedit.api import generate as _generate

    return _generate(*args, **kwargs)


def compare_gen(*args, **kwargs):
    """See :func:`kedit.api.compare_gen` (named so as not to clash with the module kedit.runs.compare)."""
    from kedit.api import compare_gen as _compare_gen

    return _compare_gen(*args, **kwargs)


__all__ = ["__version__", "compare_gen", "edit", "generate", "load_edited", "load_model", "load_run"]
