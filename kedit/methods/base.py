"""The one interface every editing method shares.

* :class:`~kedit.data.cases.EditRequest` -- what to change (frozen).
* :class:`~kedit.methods.edit.Edit` -- what a method returns: a weight :class:`Delta`, a
  :class:`ModuleEdit` (adapters, memories) or a :class:`ContextEdit` (prompts); every kind
  applies, reverts bit-identically, saves and loads (see :mod:`kedit.methods.edit`).
* :class:`Method` -- ``Params`` (frozen dataclass), ``check()`` (what this model cannot
  run, refused before any work), ``prepare()`` (statistics, caches;
  idempotent), ``compute(requests) -> Edit`` (the model is unchanged on return),
  ``commit(edit)`` (sequential state; default no-op), ``state()`` / ``load_state()``
  (that state as named tensors, so a sequential run can be resumed).

The runner loop is the same for every method: prepare; for each batch compute -> apply
-> evaluate -> record -> commit or revert.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kedit.data.cases import EditRequest
from kedit.methods.edit import ContextEdit, Delta, Edit, ModuleEdit

if TYPE_CHECKING:
    from kedit.models.load import LoadedModel

__all__ = ["ContextEdit", "Delta", "Edit", "EditRequest", "Method", "ModuleEdit", "RunContext"]


@dataclass
class RunContext:
    """What a method may use besides the model: caches, seed, where to report."""

    stats_dir: str | None = None
    seed: int = 0
    progress: bool = True
    log: Any = None  # callable(str) or None
    timings: dict[str, float] = field(default_factory=dict)

    def say(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)

    def add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds


class Method:
    """Base class: subclasses set ``name``, ``kind``, ``description``, ``Params`` and
    implement ``compute``.  ``kind`` is the kind of :class:`Edit` that ``compute`` returns:
    ``weights`` | ``adapter`` | ``memory`` | ``context``."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "weights"
    description: ClassVar[str] = ""
    Params: ClassVar[type]

    def __init__(self, loaded: LoadedModel, params: Any, ctx: RunContext | None = None):
        self.loaded = loaded
        self.params = params
        self.ctx = ctx or RunContext()

    @property
    def adapter(self):
        return self.loaded.adapter

    def check(self) -> None:
        """Refuse, before any work, a configuration this model cannot run: raise
        :class:`kedit.config.ConfigError` (one line naming the key or file).  Cheap: no
        statistics, no training, no large reads.  Layers out of range are checked for every
        method already (:func:`kedit.config.check_layers`); default: nothing more."""

    def prepare(self) -> None:
        """Load or compute what every edit needs (statistics, context prefixes); idempotent."""

    def compute(self, requests: Sequence[EditRequest]) -> Edit:
        raise NotImplementedError

    def commit(self, edit: Edit) -> None:
        """Called when an edit stays applied (sequential editing); default: nothing to keep."""

    def state(self) -> dict[str, torch.Tensor]:
        """The sequential state built by :meth:`commit` (e.g. AlphaEdit's accumulated keys),
        as named tensors a resumable run saves beside the weights; default: none."""
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state` returned (resuming a sequential run)."""
        if tensors:
            raise ValueError(f"method '{self.name}' keeps no sequential state, got {sorted(tensors)[:3]}")
