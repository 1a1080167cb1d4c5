"""The one interface every editing method shares.

* :class:`EditRequest` -- what to change (frozen).
* :class:`Delta` -- parameter name -> additive tensor; ``apply`` keeps the originals and
  ``revert`` copies them back (bit-identical, never by subtraction); ``save``/``load``
  use safetensors only.
* :class:`Method` -- ``Params`` (frozen dataclass), ``prepare()`` (statistics, caches;
  idempotent), ``compute(requests) -> Delta`` (the model is unchanged on return),
  ``commit(delta)`` (sequential state; default no-op), ``state()`` / ``load_state()``
  (that state as named tensors, so a sequential run can be resumed).

The runner loop is the same for every method: prepare; for each batch compute -> apply
-> evaluate -> record -> commit or revert.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from kedit.data.cases import EditCase
    from kedit.models.load import LoadedModel


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``template`` has one ``{}`` where ``subject`` goes."""

    case_id: str
    template: str
    subject: str
    target_new: str
    target_true: str | None = None

    @property
    def prompt(self) -> str:
        return self.template.replace("{}", self.subject, 1)

    @classmethod
    def from_case(cls, case: EditCase) -> EditRequest:
        return cls(case.case_id, case.template, case.subject, case.target_new, case.ground_truth)


class Delta:
    """An additive weight change, keyed by parameter name, in each parameter's own layout."""

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None, meta: dict[str, Any] | None = None):
        self.tensors: dict[str, torch.Tensor] = dict(tensors or {})
        self.meta: dict[str, Any] = dict(meta or {})
        self._originals: dict[str, torch.Tensor] | None = None

    # --- arithmetic --------------------------------------------------------------
    def __add__(self, other: Delta) -> Delta:
        out = {k: v.clone() for k, v in self.tensors.items()}
        for k, v in other.tensors.items():
            out[k] = out[k] + v.to(out[k]) if k in out else v.clone()
        return Delta(out, {**self.meta, **other.meta})

    def norms(self) -> dict[str, float]:
        return {k: float(v.float().norm()) for k, v in self.tensors.items()}

    # --- applying --------------------------------------------------------------
    @property
    def applied(self) -> bool:
        return self._originals is not None

    def apply(self, model: torch.nn.Module) -> Delta:
        """Add the delta to the model's weights in place, keeping exact copies of the originals."""
        if self._originals is not None:
            raise RuntimeError("delta is already applied; revert it first")
        params = dict(model.named_parameters())
        missing = [k for k in self.tensors if k not in params]
        if missing:
            raise KeyError(f"delta names parameters the model does not have: {missing[:3]}")
        originals = {}
        with torch.no_grad():
            for name, d in self.tensors.items():
                p = params[name]
                originals[name] = p.detach().clone()
                p.add_(d.to(device=p.device, dtype=p.dtype))
        self._originals = originals
        return self

    def revert(self, model: torch.nn.Module) -> None:
        """Copy the original weights back (bit-identical)."""
        if self._originals is None:
            raise RuntimeError("delta is not applied")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, orig in self._originals.items():
                params[name].copy_(orig)
        self._originals = None

    @property
    def originals(self) -> dict[str, torch.Tensor]:
        """The weights as they were before :meth:`apply` (empty when not applied)."""
        return dict(self._originals or {})

    def forget_originals(self) -> None:
        """Keep the edit for good (sequential editing): drop the saved copies."""
        self._originals = None

    # --- files -----------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        from kedit.util.atomic import atomic_path

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        with atomic_path(Path(path)) as tmp:
            save_file(tensors, str(tmp), metadata={"kedit": json.dumps(self.meta, default=str)})

    @classmethod
    def load(cls, path: str | Path) -> Delta:
        from safetensors import safe_open

        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("kedit", "{}"))
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        return cls(tensors, meta)


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
    """Base class: subclasses set ``name``, ``description``, ``Params`` and implement ``compute``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Params: ClassVar[type]

    def __init__(self, loaded: LoadedModel, params: Any, ctx: RunContext | None = None):
        self.loaded = loaded
        self.params = params
        self.ctx = ctx or RunContext()

    @property
    def adapter(self):
        return self.loaded.adapter

    def prepare(self) -> None:
        """Load or compute what every edit needs (statistics, context prefixes); idempotent."""

    def compute(self, requests: Sequence[EditRequest]) -> Delta:
        raise NotImplementedError

    def commit(self, delta: Delta) -> None:
        """Called when a delta stays applied (sequential editing); default: nothing to keep."""

    def state(self) -> dict[str, torch.Tensor]:
        """The sequential state built by :meth:`commit` (e.g. AlphaEdit's accumulated keys),
        as named tensors a resumable run saves beside the weights; default: none."""
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state` returned (resuming a sequential run)."""
        if tensors:
            raise ValueError(f"method '{self.name}' keeps no sequential state, got {sorted(tensors)[:3]}")
