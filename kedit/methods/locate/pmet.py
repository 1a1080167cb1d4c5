"""PMET: Precise Model Editing in a Transformer (Li et al., AAAI 2024): MEMIT whose target
is the MLP's own output, fitted jointly with the attention's, and only the MLP weights
are updated.

PMET's observation: the residual stream after block L (MEMIT's target) sums the
attention output, the MLP output and the residual; MEMIT writes all of that change into
the MLPs, including the part the attention would carry.  PMET optimises the two
components separately and writes only the MLP's:

1. targets, at the last edited layer L (``core.values`` with two modules of block L):
   δ_attn added to the attention output and δ_mlp to the MLP output at the fact token,
   optimised jointly with MEMIT's loss (target NLL over the context prefixes + KL on
   "{subject} is a" + weight decay Σ ‖δ_m‖/‖v0_m‖², each δ clamped to
   ``clamp_norm_factor``·‖v0_m‖ of its own module); z = v0_mlp + δ_mlp, where v0_mlp is
   the MLP output at the fact token of the bare prompt.  δ_attn is discarded: the
   attention weights are not edited;
2. for each edited layer l_i (ascending, ``core.spread``): keys K (the MLP output
   projection's inputs, averaged over the context prefixes), cur = the MLP output of
   layer L at the fact token with the updates of the layers below already in place,
   R = (z − cur) / sqrt(m − i) (m layers; MEMIT divides by m − i), and MEMIT's solve
   ΔW = R Kᵀ (λ·C + K Kᵀ)⁻¹ (``core.solve.least_squares_update``, C from ``core.stats``,
   λ = ``mom2_update_weight``).

Everything else (layers, statistics, context prefixes, the target optimisation's
hyperparameters) is MEMIT's (``kedit.methods.locate.memit``).

``clamp_reference`` (kedit's, not the paper's; for sequential editing): ``current`` (the
paper's) clamps each δ_m at ``clamp_norm_factor``·‖v0_m‖ on the model as it is; in a
sequential run v0 is read on the model the earlier edits left, and on Gemma-3 270M the MLP's
‖v0‖ at the subject grows twenty-fold over 100 edits, and with it the bound
(docs/models.md).  ``unedited`` keeps the bound where the unedited model puts it: calls
before any edit is committed use their own v0 as ``current`` does (independent edits are
unchanged) and record the mean ‖v0_m‖ over their requests; once an edit is committed, every
later call clamps at ``clamp_norm_factor`` times that recorded mean (``core.values``'
``clamp_norm_ref``), which a resumed run restores from the method's state.  λ is per model: the
authors use 6,000 for LLaMA-2 and EasyEdit 15,000; MEMIT's SmolLM2 λ (1,500) serves here.

Differences from EasyEdit's ``easyeditor/models/pmet``: the target optimisation is
kedit's shared one, for all requests of a batch at once, so it stops per request when
the target NLL (or the whole loss, ``early_stop_on: total``) is below ``early_stop_loss``;
EasyEdit optimises one request at a time and also lowers the NLL weight to 0.1 once the
target is the argmax of every prefix (stopping when the KL term is then below 0.01),
which kedit does not do.  EasyEdit's PMET YAMLs (``rewrite_module_tmps``,
``nll_loss_factor``) are not read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from kedit.methods.base import EditRequest
from kedit.methods.core.values import optimise_targets
from kedit.methods.locate.memit import MEMIT, MemitParams
from kedit.methods.registry import register


@dataclass(frozen=True)
class PmetParams(MemitParams):
    clamp_reference: Literal["current", "unedited"] = "current"   # see the module docstring


@register
class PMET(MEMIT):
    name = "pmet"
    description = "MEMIT with joint attention/MLP targets, only the MLPs updated (Li et al. 2024)"
    Params = PmetParams

    spread_divisor = staticmethod(math.sqrt)
    residual_targets = False           # its targets are the last layer's projection outputs (core/spread.py)

    def compared_module(self, layer: int) -> torch.nn.Module:
        """PMET compares with the MLP's output, not the block's."""
        return self.adapter.mlp_out(layer)

    STATE_KEY = "unedited_v0_norm"

    def __init__(self, loaded, params, ctx=None):
        super().__init__(loaded, params, ctx)
        self.unedited_norm: torch.Tensor | None = None   # (2,): mean ‖v0‖ of attention, MLP before any commit
        self.committed = False

    def targets(self, requests: Sequence[EditRequest]) -> tuple[torch.Tensor, list[dict]]:
        """Joint targets for the attention and the MLP output of the last edited layer; only
        the MLP's is kept (the attention's is recorded)."""
        p, adapter = self.params, self.adapter
        last = p.layers[-1]
        opts = p.target_options()
        fixed = p.clamp_reference == "unedited" and self.committed
        if fixed:
            opts = dataclasses.replace(opts, clamp_norm_ref=tuple(float(x) for x in self.unedited_norm))
        tg = optimise_targets(self.loaded, requests, self.templates, [adapter.attn(last), adapter.mlp_out(last)],
                              p.fact_token, opts, seed=self.ctx.seed)
        if not self.committed:
            self.unedited_norm = tg.v0.norm(dim=-1).mean(0)
        cases = [{"case_id": r.case_id, "steps": tg.steps[j], "loss": tg.loss[j], "nll": tg.nll[j],
                  "delta_norm": float(tg.delta[j, 1].norm()), "v0_norm": float(tg.v0[j, 1].norm()),
                  "attn_delta_norm": float(tg.delta[j, 0].norm()), "attn_v0_norm": float(tg.v0[j, 0].norm()),
                  **({"clamp_norm_ref": list(opts.clamp_norm_ref)} if fixed else {})}
                 for j, r in enumerate(requests)]
        return tg.v0[:, 1] + tg.delta[:, 1], cases

    def commit(self, delta) -> None:
        super().commit(delta)
        self.committed = True

    def state(self) -> dict[str, torch.Tensor]:
        if self.params.clamp_reference != "unedited" or not self.committed or self.unedited_norm is None:
            return {}
        return {self.STATE_KEY: self.unedited_norm.detach().cpu().clone()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        if set(tensors) != {self.STATE_KEY}:
            raise ValueError(f"pmet: unexpected sequential state {sorted(tensors)[:3]}")
        self.unedited_norm = tensors[self.STATE_KEY].float()
        self.committed = True
