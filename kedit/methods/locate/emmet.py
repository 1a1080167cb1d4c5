"""EMMET (Gupta et al. 2024, "A Unified Framework for Model Editing"): batched ROME with
equality constraints, solved in closed form.

Everything but the per-layer solve is MEMIT's (``kedit.methods.locate.memit``): targets at the
last edited layer, keys averaged over context prefixes, the residual spread over the
edited layers (the authors' code uses MEMIT's spreading too; their published configs
edit one layer, EasyEdit's five).  Per layer, instead of MEMIT's least squares,

    ΔW = R (Kᵀ A⁻¹ K + emmet_lambda·I)⁻¹ Kᵀ A⁻¹,   A = λ·C + update_norm_lambda·I

(``core.solve.equality_constrained_update``): the change on the preserved keys
‖ΔW K₀‖ is minimised subject to every edit's constraint (W + ΔW) k_i = W k_i + r_i
holding exactly (up to the small ``emmet_lambda`` ridge, applied for batches > 1 as in
their code).  One edit at one layer is exactly ROME's rank-one update.  The effective
ridge on KᵀC⁻¹K is λ·emmet_lambda, and with it equal to MEMIT's λ the update *is*
MEMIT's (push-through identity, ``core.solve.equality_constrained_update``): EMMET is
MEMIT with the relaxation taken nearly to zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kedit.methods.core.solve import equality_constrained_update
from kedit.methods.locate.memit import MEMIT, MemitParams
from kedit.methods.registry import register


@dataclass(frozen=True)
class EmmetParams(MemitParams):
    emmet_lambda: float = 0.1                  # ridge on Kᵀ A⁻¹ K (all published EMMET configs)
    update_norm_lambda: float = 0.0            # μ in A = λ·C + μ·I (0 in all published configs)

    def check(self) -> str | None:
        if self.emmet_lambda < 0:
            return "key 'emmet_lambda': must be >= 0"
        if self.update_norm_lambda < 0:
            return "key 'update_norm_lambda': must be >= 0"
        return super().check()


@register
class EMMET(MEMIT):
    name = "emmet"
    description = "Batched ROME: edits as equality constraints, closed form (Gupta et al. 2024)"
    Params = EmmetParams

    def _layer_update(self, layer: int, R: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        p = self.params
        return equality_constrained_update(R, K, self._cov(layer), p.mom2_update_weight, ridge=p.emmet_lambda,
                                           norm_lambda=p.update_norm_lambda)
