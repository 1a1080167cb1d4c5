"""ROME: Rank-One Model Editing (Meng et al., NeurIPS 2022), a thin composition of core/.

One edit writes ``(subject, relation) -> target_new`` into the MLP output projection of
one layer:

1. key k̄: the projection's input at the fact token, averaged over context prefixes
   (``core.keys``);
2. value: δ fitted so the model emits the target when δ is added to the projection's
   output at the fact token (``core.values``);
3. ΔW = δ uᵀ / (uᵀ k) with u = C⁻¹ k̄ and C the corpus second moment of the keys
   (``core.solve``; ``mom2_adjustment: false`` uses C = I).

``key_mode``: ``averaged`` (default) uses k = k̄ in the denominator as well, the r-ROME
fix (Gupta et al. 2024: mixing the averaged key with the bare prompt's key makes
sequential ROME collapse); ``original`` uses the bare prompt's key there, as the
reference implementation does.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from kedit.methods.base import Delta, EditRequest, Method
from kedit.methods.core.keys import compute_keys
from kedit.methods.core.params import LocateEditParams
from kedit.methods.core.solve import rank_one_direction
from kedit.methods.core.templates import context_templates
from kedit.methods.core.values import optimise_targets
from kedit.methods.registry import register


@dataclass(frozen=True)
class RomeParams(LocateEditParams):
    LAYER_KEY: ClassVar[str] = "layer"

    layer: int = 5
    key_mode: Literal["averaged", "original"] = "averaged"


@register
class ROME(Method):
    name = "rome"
    description = "Rank-one update of one MLP output projection (Meng et al. 2022; r-ROME keys)"
    Params = RomeParams

    def prepare(self) -> None:
        if getattr(self, "_ready", False):
            return
        p = self.params
        self.adapter.check_layer(p.layer)
        t0 = time.perf_counter()
        self.C = None
        if p.mom2_adjustment:
            from kedit.methods.core.stats import get_stats

            self.C = get_stats(self.loaded, [p.layer], corpus=p.mom2_corpus, samples=p.mom2_samples,
                               stats_dir=self.ctx.stats_dir, progress=self.ctx.progress)[p.layer]
        self.templates = context_templates(self.loaded, p.context_template_length_params, self.ctx.seed)
        self.ctx.add_time("prepare", time.perf_counter() - t0)
        self._ready = True

    def compute(self, requests: Sequence[EditRequest]) -> Delta:
        """One rank-one edit per request, applied in order (ROME is not a batch method);
        the model is back to its weights on return and the summed delta is returned."""
        self.prepare()
        applied: list[Delta] = []
        info = []
        try:
            for r in requests:
                d, meta = self._edit_one(r)
                applied.append(d.apply(self.loaded.model))
                info.append(meta)
        finally:
            for d in reversed(applied):
                d.revert(self.loaded.model)
        total = Delta()
        for d in applied:
            total = total + d
        total.meta = {"method": self.name, "cases": info}
        return total

    def _edit_one(self, r: EditRequest) -> tuple[Delta, dict]:
        p, adapter = self.params, self.adapter
        t0 = time.perf_counter()
        keys = compute_keys(self.loaded, [r], [p.layer], self.templates, p.fact_token)[p.layer][0]
        k_avg, k_bare = keys.mean(0), keys[0]
        t1 = time.perf_counter()
        tg = optimise_targets(self.loaded, [r], self.templates, adapter.mlp_out(p.layer), p.fact_token,
                              p.target_options(), seed=self.ctx.seed)
        t2 = time.perf_counter()
        dev = adapter.layer_device(p.layer)              # the edited layer's device (device maps)
        C = self.C.to(dev) if self.C is not None else None
        u = rank_one_direction(k_avg.to(dev), C)
        k_den = (k_avg if p.key_mode == "averaged" else k_bare).to(u.device).double()
        dW = torch.outer(tg.delta[0].to(dev).double(), u) / torch.dot(u, k_den)
        param = adapter.mlp_out_param(p.layer)
        delta = Delta({param: adapter.to_param_layout(dW).to(adapter.dtype)})
        t3 = time.perf_counter()
        for phase, sec in (("key", t1 - t0), ("target", t2 - t1), ("update", t3 - t2)):
            self.ctx.add_time(phase, sec)
        meta = {"case_id": r.case_id, "steps": tg.steps[0], "loss": tg.loss[0], "nll": tg.nll[0],
                "delta_norm": float(tg.delta[0].norm()), "v0_norm": float(tg.v0[0].norm()),
                "time": {"key": t1 - t0, "target": t2 - t1, "update": t3 - t2}}
        return delta, meta
