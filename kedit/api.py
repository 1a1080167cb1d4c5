"""The Python API for notebooks: ``kedit.load_model`` and ``kedit.edit``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kedit.cases import EditCase, load_cases
from kedit.experiment import make_method
from kedit.methods.base import RunContext
from kedit.models.load import LoadedModel, load_model
from kedit.runner import EditResult, run_edits


def edit(model: LoadedModel | str, cases: Sequence[EditCase] | str | Path, method: str = "rome",
         hparams: str | Path | None = None, *, sequential: bool = False, batch_size: int | None = None,
         seed: int = 0, stats_dir: str | None = None, progress: bool = False, **overrides) -> EditResult:
    """Edit ``cases`` into ``model`` and measure them before and after.

    The model is left with its original weights (bit-identical); ``result.deltas`` holds
    each edit, to ``apply(model.model)`` and ``revert(model.model)`` yourself.  Keyword
    arguments beyond these override single hyperparameters (``layer=7``).
    """
    loaded = load_model(model) if isinstance(model, str) else model
    case_list = load_cases(cases) if isinstance(cases, (str, Path)) else list(cases)
    ctx = RunContext(stats_dir=stats_dir, seed=seed, progress=progress)
    meth, _ = make_method(loaded, method, str(hparams) if hparams else None, overrides, ctx)
    return run_edits(meth, case_list, sequential=sequential, batch_size=batch_size)
