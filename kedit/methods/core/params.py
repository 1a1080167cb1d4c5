"""Hyperparameters shared by the locate-then-edit methods (ROME, MEMIT and relatives):
the fact token, the target-value optimisation, the covariance statistics, the context
prefixes.  Each method's ``Params`` extends this with what is its own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from kedit.methods.core.values import TargetOptions


@dataclass(frozen=True)
class LocateEditParams:
    LAST_LAYER_FIELDS: ClassVar[tuple[str, ...]] = ("v_loss_layer",)   # -1: the last layer
    fact_token: Literal["subject_last", "subject_first", "last"] = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_loss_layer: int = -1
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    early_stop_on: Literal["nll", "total"] = "nll"
    mom2_adjustment: bool = True
    mom2_samples: int = 1000
    mom2_corpus: str | None = None
    context_template_length_params: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))

    def check(self) -> str | None:
        if self.v_num_grad_steps < 1:
            return "key 'v_num_grad_steps': must be >= 1"
        if self.v_lr <= 0:
            return "key 'v_lr': must be > 0"
        if self.mom2_samples < 1:
            return "key 'mom2_samples': must be >= 1"
        if self.mom2_adjustment and self.mom2_corpus and not Path(self.mom2_corpus).expanduser().is_file():
            return f"key 'mom2_corpus': {self.mom2_corpus}: no such file"
        return None

    def target_options(self) -> TargetOptions:
        return TargetOptions(steps=self.v_num_grad_steps, lr=self.v_lr, weight_decay=self.v_weight_decay,
                             clamp_norm_factor=self.clamp_norm_factor, kl_factor=self.kl_factor,
                             early_stop_loss=self.early_stop_loss, early_stop_on=self.early_stop_on,
                             loss_layer=self.v_loss_layer)
