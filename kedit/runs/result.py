"""What an edit run produced (:class:`EditResult`), and which of its edits make a model.

A run's edits are keyed as in :attr:`EditResult.edits`: an independent run maps each case
id to its edit (the cases of one batch share one object), a sequential run maps
``batch<N>`` to step N.  Which edit(s) a choice puts into a model (:func:`select_edits`):

* one edit in the run: that one;
* a sequential run: every step, in order (``case`` is refused: the steps build on each
  other, and only the state after the last one was evaluated);
* several independent edits: the one of ``case`` (the batch that contains it), or with
  ``all_`` every one of them -- weight deltas added up, a model no run evaluated
  (independent edits are measured from the original weights one at a time); edits of the
  other kinds each hold a whole wrapper or context and cannot be stacked that way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kedit.data.cases import EditCase
from kedit.methods.edit import Delta, Edit, EditError

if TYPE_CHECKING:
    from kedit.models.load import LoadedModel


#: A run directory's edits (every kind); runs written before edit kinds have DELTA_FILE.
EDIT_FILE = "edit.safetensors"
DELTA_FILE = "delta.safetensors"


class PatchError(ValueError):
    """A run's edit that cannot be read, chosen or applied as asked (one-line message)."""


def unique_edits(edits: dict[str, Edit]) -> list[Edit]:
    return list({id(e): e for e in edits.values()}.values())


def ordered_steps(edits: dict[str, Edit]) -> list[Edit]:
    return [e for _, e in sorted(edits.items(), key=lambda kv: int(kv[0].removeprefix("batch")))]


def select_edits(edits: dict[str, Edit], sequential: bool, case: str | None = None,
                 all_: bool = False) -> list[Edit]:
    """The edits to apply, in order (see the module docstring for the rules)."""
    if not edits:
        raise PatchError("the run has no edit to apply")
    if case is not None and all_:
        raise PatchError("choose one case (--case) or all edits (--all), not both")
    if sequential:
        if case is not None:
            raise PatchError("a sequential run's edits build on each other and were evaluated together: "
                             "apply all of them (leave out --case)")
        return ordered_steps(edits)
    unique = unique_edits(edits)
    if case is not None:
        if case not in edits:
            shown = ", ".join(list(edits)[:5]) + (", ..." if len(edits) > 5 else "")
            raise PatchError(f"no case '{case}' in this run (cases: {shown})")
        return [edits[case]]
    if len(unique) == 1:
        return unique
    if all_:
        if any(not isinstance(e, Delta) for e in unique):
            raise PatchError(f"--all adds independent weight deltas; these are {unique[0].kind} edits, each "
                             f"holding its own whole state: choose one case (--case ID)")
        return unique
    first = next(iter(edits))
    raise PatchError(f"the run holds {len(unique)} independent edits: choose one case (--case ID, e.g. "
                     f"--case {first}) or --all for their sum (a model that no run evaluated)")


def check_fingerprint(expected: str, loaded: LoadedModel, *, force: bool = False, what: str = "the patch") -> None:
    """Refuse a model that is not the run's base model (unless ``force``)."""
    if force or not expected or expected == loaded.fingerprint:
        return
    raise PatchError(f"{what} was made on the model with fingerprint {expected}; '{loaded.name}' has "
                     f"{loaded.fingerprint} (a different model or different weights); use --force "
                     f"(force=True) to apply it anyway")


def apply_edits(module: torch.nn.Module, edits: Sequence[Edit]) -> list[Edit]:
    """Apply ``edits`` to ``module`` in order; returns the applied copies for :func:`revert_edits`.

    Each edit is applied through a fresh copy (the caller's objects keep their own state).
    If one fails, those already applied are reverted first.
    """
    done: list[Edit] = []
    try:
        for e in edits:
            done.append(e.detached().apply(module))
    except EditError as err:
        revert_edits(module, done)
        raise PatchError(str(err)) from None
    except BaseException:
        revert_edits(module, done)
        raise
    return done


def revert_edits(module: torch.nn.Module, done: Sequence[Edit]) -> None:
    """Undo :func:`apply_edits` bit-identically: reverse order, so a site that several edits
    change gets back the state taken before the first one."""
    for e in reversed(done):
        e.revert(module)


@contextlib.contextmanager
def applied_edits(module: torch.nn.Module, edits: Sequence[Edit]) -> Iterator[None]:
    """The block runs with ``edits`` applied; the model is restored after it."""
    done = apply_edits(module, edits)
    try:
        yield
    finally:
        revert_edits(module, done)


def supersedes(new: Edit, old: Edit) -> bool:
    """Whether ``new`` alone gives what ``old`` then ``new`` give: a cumulative edit (it holds
    the whole state of its sites) of the same class over every site of ``old``."""
    return new.cumulative and type(old) is type(new) and set(old.sites()) <= set(new.sites())


def combined(edits: Sequence[Edit]) -> Edit:
    """Edits applied in this order, as one edit: weight deltas added up; for cumulative kinds
    (adapters, memories, contexts: each edit holds the whole state of its sites) the last."""
    if not edits:
        return Delta()
    if all(isinstance(e, Delta) for e in edits):
        out = Delta()
        for e in edits:
            out = out + e
        return out
    last = edits[-1]
    if all(supersedes(last, e) for e in edits):
        return last
    raise PatchError("these edits do not combine into one (mixed kinds)")


@dataclass
class EditResult:
    """What an edit run produced: per-case pre/post metrics, aggregates and the edits."""

    cases: list[EditCase]
    records: list[dict]                       # per case: case_id, pre, post, time, method info
    metrics: dict                             # {"n", "pre", "post", "stderr": {"pre","post"}, "count"}
    edits: dict[str, Edit]                    # case_id -> its edit (independent), "batch<N>" -> edit (sequential)
    sequential: bool
    timings: dict[str, float] = field(default_factory=dict)
    # Bound by kedit.edit / kedit.load_run so that apply()/revert()/applied() need no argument.
    model: Any = field(default=None, repr=False, compare=False)   # LoadedModel (or a torch module)
    base_fingerprint: str = ""                                     # the model the edits were made on
    run_dir: Any = None                                            # set when read back from a run directory
    _applied: list = field(default_factory=list, repr=False, compare=False)

    @property
    def deltas(self) -> dict[str, Edit]:
        """The same as :attr:`edits` (the name from when every edit was a weight delta)."""
        return self.edits

    @property
    def kind(self) -> str:
        kinds = {e.kind for e in self.edits.values()}
        return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "weights")

    def summary_rows(self) -> list[tuple[str, float | None, float | None]]:
        names = list(dict.fromkeys([*self.metrics["pre"], *self.metrics["post"]]))
        return [(n, self.metrics["pre"].get(n), self.metrics["post"].get(n)) for n in names]

    def select(self, case: str | None = None, all: bool = False) -> list[Edit]:
        """The edits that make the edited model, in order: the only one, every step of a
        sequential run, ``case``'s, or with ``all=True`` every independent weight delta
        (their sum is a model no run evaluated)."""
        return select_edits(self.edits, self.sequential, case, all)

    @property
    def edit(self) -> Edit:
        """All of the run's change as one :class:`~kedit.methods.edit.Edit` -- weight deltas
        added up (a sequential run's steps, or every independent edit); for the other kinds
        the one edit (or a sequential run's last state) -- for saving or inspecting;
        :meth:`apply` applies the steps one by one, exactly as they were evaluated."""
        if self.sequential:
            return combined(ordered_steps(self.edits))
        unique = unique_edits(self.edits)
        if len(unique) == 1 or all(isinstance(e, Delta) for e in unique):
            return combined(unique)
        raise PatchError(f"the run holds {len(unique)} independent {unique[0].kind} edits: take one from "
                         f"result.edits[case_id]")

    @property
    def delta(self) -> Edit:
        """:attr:`edit` (for weight edits, the whole weight change as one Delta)."""
        return self.edit

    def _module(self, model: Any = None) -> torch.nn.Module:
        target = model if model is not None else self.model
        if target is None:
            raise ValueError("no model: pass one (result.apply(model)) or get the result from kedit.edit")
        return target if isinstance(target, torch.nn.Module) else target.model

    def apply(self, model: Any = None, *, case: str | None = None, all: bool = False,
              force: bool = False) -> EditResult:
        """Put the edit into the model (in place) until :meth:`revert`.  A LoadedModel whose
        fingerprint is not :attr:`base_fingerprint` is refused unless ``force``."""
        if self._applied:
            raise RuntimeError("the edit is already applied; revert() first")
        if model is not None and hasattr(model, "fingerprint"):
            check_fingerprint(self.base_fingerprint, model, force=force, what="this edit")
        module = self._module(model)
        self._applied = [module, apply_edits(module, self.select(case, all))]
        return self

    def revert(self) -> None:
        """Restore what :meth:`apply` changed, bit-identically."""
        if not self._applied:
            raise RuntimeError("the edit is not applied")
        (module, done), self._applied = self._applied, []
        revert_edits(module, done)

    @contextlib.contextmanager
    def applied(self, model: Any = None, *, case: str | None = None, all: bool = False,
                force: bool = False) -> Iterator[Any]:
        """``with result.applied(): ...`` -- the edited model inside the block, the original
        (bit-identical) after it, also on an exception."""
        self.apply(model, case=case, all=all, force=force)
        try:
            yield self.model if model is None else model
        finally:
            self.revert()

    def export(self, out_dir: Any, model: Any = None, *, case: str | None = None, all: bool = False) -> Any:
        """Write the edited model as a directory (see :func:`kedit.runs.export.export_model`)."""
        from kedit.runs.export import export_model

        loaded = model if model is not None else self.model
        if loaded is None or not hasattr(loaded, "tokenizer"):
            raise ValueError("export needs the LoadedModel (kedit.load_model) the edit was made on")
        return export_model(loaded, self.select(case, all), out_dir,
                            {"run": str(self.run_dir) if self.run_dir else None, "case": case, "all": all})
