"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al., ICLR 2023), a thin composition of core/.

A batch of n facts is written into the MLP output projections of a run of consecutive
layers ``l_1 < ... < l_m = L`` in one closed-form update per layer:

1. target vectors: for every request, δ_i is fitted at the *residual stream* output of
   block L at the fact token (``core.values``, all requests of the batch jointly);
   z_i = v0_i + δ_i is the hidden state that makes the model emit the target;
2. for each layer l (ascending), with the updates of the earlier layers already in the
   model: keys K_l (the projection's inputs, averaged over context prefixes,
   ``core.keys``), the current block-L outputs cur_z_i at the bare prompt, the residual
   R = (z − cur_z) / (number of layers left, this one included) -- the remaining change
   is spread evenly over the layers still to edit -- and
   ΔW_l = R K_lᵀ (λ·C_l + K_l K_lᵀ)⁻¹ (``core.solve.least_squares_update``; C_l the
   corpus second moment of the keys, C = I with ``mom2_adjustment: false``);
3. the weights are restored (copied back) and the sum of the per-layer updates returned.

The per-layer solve is one overridable step, :meth:`MEMIT._layer_update`; AlphaEdit
(null-space projected) and EMMET (equality constrained) are MEMIT with that step replaced.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from kedit.methods.base import Delta, EditRequest, Method
from kedit.methods.core.keys import output_at_fact_token
from kedit.methods.core.solve import least_squares_update
from kedit.methods.core.spread import spread_over_layers
from kedit.methods.core.templates import context_templates
from kedit.methods.core.params import LocateEditParams
from kedit.methods.core.values import optimise_targets
from kedit.methods.registry import register


@dataclass(frozen=True)
class MemitParams(LocateEditParams):
    LAYER_KEY: ClassVar[str] = "layers"

    layers: tuple[int, ...] = (2, 3, 4, 5, 6)
    # The paper's clamp 0.75 is for GPT-J / GPT-2 XL; ROME's 4.0 (the shared default) until tuned on small models.
    mom2_update_weight: float = 15000.0
    context_template_length_params: tuple[tuple[int, int], ...] = ((10, 5),)

    def check(self) -> str | None:
        if not self.layers:
            return "key 'layers': needs at least one layer"
        if any(b != a + 1 for a, b in zip(self.layers, self.layers[1:])):
            return f"key 'layers': must be consecutive and ascending, got {list(self.layers)}"
        if self.layers[0] < 0:
            return f"key 'layers': must be >= 0, got {list(self.layers)}"
        if 0 <= self.v_loss_layer < self.layers[-1]:
            return (f"key 'v_loss_layer': {self.v_loss_layer} is before the last edited layer "
                    f"{self.layers[-1]}, where the targets are fitted (use -1 for the last layer)")
        if self.mom2_update_weight <= 0:
            return "key 'mom2_update_weight': must be > 0 (λ·C + K Kᵀ must be invertible)"
        return super().check()


@register
class MEMIT(Method):
    name = "memit"
    description = "Batch least-squares update spread over consecutive MLP layers (Meng et al. 2023)"
    Params = MemitParams
    batch_native = True

    def prepare(self) -> None:
        if getattr(self, "_ready", False):
            return
        p = self.params
        for layer in p.layers:
            self.adapter.check_layer(layer)
        t0 = time.perf_counter()
        self.C: dict[int, torch.Tensor] = {}
        self.stats_info: dict = {}                 # layer -> kedit.methods.core.stats.StatsInfo (where C lives)
        if p.mom2_adjustment:
            from kedit.methods.core.stats import get_stats

            stats = get_stats(self.loaded, list(p.layers), corpus=p.mom2_corpus, samples=p.mom2_samples,
                              stats_dir=self.ctx.stats_dir, progress=self.ctx.progress)
            self.C = {layer: stats[layer].to(self.adapter.layer_device(layer), torch.float64) for layer in p.layers}
            self.stats_info = stats.info
        self.templates = context_templates(self.loaded, p.context_template_length_params, self.ctx.seed)
        self.ctx.add_time("prepare", time.perf_counter() - t0)
        self._ready = True

    def _cov(self, layer: int) -> torch.Tensor:
        if layer in self.C:
            return self.C[layer]
        return torch.eye(self.adapter.key_size, dtype=torch.float64, device=self.adapter.layer_device(layer))

    def _layer_update(self, layer: int, R: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        """The closed-form solve of one layer: ``R`` (d_out, n) the residual this layer must
        write, ``K`` (d_key, n) its keys (both on the layer's device); returns ΔW
        (d_out, d_key) float64.  MEMIT: ΔW = R Kᵀ (λ·C + K Kᵀ)⁻¹.  Relatives of MEMIT
        (AlphaEdit, EMMET) override this step only."""
        return least_squares_update(R, K, self._cov(layer), self.params.mom2_update_weight)

    #: how the residual still missing is shared over the layers left to edit, from their
    #: count (MEMIT: evenly; PMET: by its square root)
    spread_divisor = staticmethod(float)

    def compared_module(self, layer: int) -> torch.nn.Module:
        """The module whose output at the fact token the targets are for (MEMIT: the block)."""
        return self.adapter.block(layer)

    #: whether the targets are residual-stream vectors, which reach a projection through the
    #: norm after it where the architecture has one (``core.spread``; MEMIT: yes, PMET: no)
    residual_targets: ClassVar[bool] = True

    def targets(self, requests: Sequence[EditRequest]) -> tuple[torch.Tensor, list[dict]]:
        """The target outputs ``z`` (n, d) of :meth:`compared_module` at the last edited layer,
        and what each request's optimisation did (the run records it)."""
        p = self.params
        tg = optimise_targets(self.loaded, requests, self.templates, self.compared_module(p.layers[-1]),
                              p.fact_token, p.target_options(), seed=self.ctx.seed)
        cases = [{"case_id": r.case_id, "steps": tg.steps[j], "loss": tg.loss[j], "nll": tg.nll[j],
                  "delta_norm": float(tg.delta[j].norm()), "v0_norm": float(tg.v0[j].norm())}
                 for j, r in enumerate(requests)]
        return (tg.v0 + tg.delta).to(self.loaded.device), cases

    def compute(self, requests: Sequence[EditRequest]) -> Delta:
        """All requests in one update per layer; the model is back to its weights on return."""
        self.prepare()
        p = self.params
        requests = list(requests)
        if not requests:
            return Delta({}, {"method": self.name, "cases": []})
        compared = self.compared_module(p.layers[-1])
        t0 = time.perf_counter()
        z, cases = self.targets(requests)
        self.ctx.add_time("target", time.perf_counter() - t0)
        tensors, layer_info = spread_over_layers(
            self.loaded, requests, p.layers, self.templates, p.fact_token, z,
            current=lambda: output_at_fact_token(self.loaded, requests, compared, p.fact_token),
            layer_update=self._layer_update, divisor=self.spread_divisor, ctx=self.ctx,
            residual_targets=self.residual_targets)
        return Delta(tensors, {"method": self.name, "cases": cases, "layers": layer_info})
