"""The Python API for notebooks; the CLI is a thin layer over these functions.

::

    import kedit
    model = kedit.load_model("smollm2-135m")
    result = kedit.edit(model, "cases/messi.jsonl", method="rome")
    result.metrics["post"]["rewrite_acc"]        # aggregate; result.records: per case
    with result.applied():                        # the edit in the weights, restored on exit
        kedit.generate(model, ["Lionel Messi plays"])
    result.delta.save("messi.safetensors")        # the weight change
    result.export("messi-model/")                 # a Hugging Face model directory

* :func:`edit` -- edit and measure (:class:`kedit.runs.runner.EditResult`, bound to the model).
* :func:`load_run` -- a run directory read back as an EditResult.
* :func:`generate` -- greedy (or seeded sampled) continuations.
* :func:`compare_gen` -- before/after generations of a result (see :mod:`kedit.runs.compare`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kedit.data.cases import EditCase, load_cases
from kedit.runs.experiment import make_method
from kedit.methods.base import RunContext
from kedit.models.load import LoadedModel, load_model
from kedit.runs.result import EditResult
from kedit.runs.runner import run_edits


def edit(model: LoadedModel | str, cases: Sequence[EditCase] | str | Path, method: str = "rome",
         hparams: str | Path | Mapping[str, Any] | None = None, *, sequential: bool = False,
         batch_size: int | None = None, seed: int = 0, stats_dir: str | None = None, progress: bool = False,
         on_progress: Callable[[int], None] | None = None, **overrides) -> EditResult:
    """Edit ``cases`` into ``model`` and measure them before and after.

    ``hparams``: a hyperparameter YAML (kedit's or EasyEdit's), or a dict of values
    that override the method's default file for this model; keyword arguments beyond
    these override single values too (``layer=7``).  ``progress`` shows the method's own
    progress bars (statistics); ``on_progress(k)`` is called as k more cases are done.

    The model is left with its original weights (bit-identical).  The result holds
    per-case ``records``, aggregate ``metrics``, the ``deltas`` (and ``delta``, all of
    them as one), and is bound to the model: ``result.apply()`` / ``result.revert()`` /
    ``with result.applied(): ...`` put the edit into the weights and restore them
    bit-identically.
    """
    loaded = load_model(model) if isinstance(model, str) else model
    case_list = load_cases(cases) if isinstance(cases, (str, Path)) else list(cases)
    if isinstance(hparams, Mapping):
        overrides = {**hparams, **overrides}
        hparams = None
    ctx = RunContext(stats_dir=stats_dir, seed=seed, progress=progress)
    meth, _ = make_method(loaded, method, str(hparams) if hparams else None, overrides, ctx)
    result = run_edits(meth, case_list, sequential=sequential, batch_size=batch_size, progress=on_progress)
    result.model = loaded
    result.base_fingerprint = loaded.fingerprint
    return result


def load_run(run_dir: str | Path, model: LoadedModel | str | None = None, *, force: bool = False) -> EditResult:
    """A run directory (``kedit edit``) read back: cases, records, metrics and deltas.

    With ``model`` (a LoadedModel or a spec to load) the result is bound to it, after
    checking that it is the run's base model (``force=True`` skips the check)."""
    from kedit.runs.export import load_run as _load_run

    loaded = load_model(model) if isinstance(model, str) else model
    return _load_run(run_dir, loaded, force=force)


def generate(model: LoadedModel, prompts: Sequence[str] | str, max_new_tokens: int = 24, **options) -> list[str]:
    """Continuations of ``prompts`` (see :func:`kedit.evaluation.generation.generate`: greedy, or
    ``sample=True, temperature=..., seed=...``)."""
    from kedit.evaluation.generation import generate as _generate

    return _generate(model, [prompts] if isinstance(prompts, str) else list(prompts), max_new_tokens, **options)


def compare_gen(result: EditResult, prompts: Sequence[str] | None = None, *, case: str | None = None,
            all: bool = False, max_new_tokens: int = 24, **options) -> list[dict]:
    """Before/after generation rows ``{"case_id", "kind", "prompt", "before", "after"}``
    for a result bound to its model (see :func:`kedit.runs.compare.compare_result`)."""
    from kedit.runs.compare import compare_result

    if result.model is None:
        raise ValueError("the result is not bound to a model (kedit.edit binds it; kedit.load_run(run, model))")
    return compare_result(result.model, result, prompts, case=case, all_=all, max_new_tokens=max_new_tokens,
                          **options)
