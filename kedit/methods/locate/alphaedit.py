"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the null space of
the preserved knowledge, so that sequential batches stop overwriting earlier edits and
the model's general ability.

Everything but the per-layer solve is MEMIT's (targets at the last layer, keys, the
residual spread over the layers, ``kedit.methods.locate.memit``).  Per layer l:

* P_l = U₀U₀ᵀ, the projector onto the eigenvectors of the keys' corpus second moment
  C_l with eigenvalue < ``nullspace_threshold`` (``core.solve.nullspace_projector``; the
  threshold is absolute on the per-token mean C, as in AlphaEdit's code).  Built once in
  :meth:`AlphaEdit.prepare` and cached beside the statistics file it comes from
  (:func:`projector`);
* ΔW_l = R Kᵀ P ((K_p K_pᵀ + K Kᵀ) P + L2·I)⁻¹ (``core.solve.nullspace_update``), where
  K_p K_pᵀ sums k kᵀ over the keys of the edits already committed (sequential editing),
  so a new batch also leaves the earlier edits' keys alone.  λ·C (MEMIT's
  ``mom2_update_weight``) does not enter: P does the preserving.

Sequential state lives in the method (DESIGN lesson 6): :meth:`compute` remembers the
keys it wrote, :meth:`commit` adds their k kᵀ to K_p K_pᵀ.  The keys of layer l were read
with the updates of layers < l already in place, and the projection's input at layer l
does not depend on its own or later layers' output projections, so they are the keys
the edited model has: AlphaEdit's code recomputes them after the edit; kedit reuses them.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kedit.methods.base import Delta, EditRequest
from kedit.methods.core.solve import nullspace_projector, nullspace_update
from kedit.methods.locate.memit import MEMIT, MemitParams
from kedit.methods.registry import register

log = logging.getLogger(__name__)

#: Format tag of the projector cache files.
PROJECTOR_FORMAT = "kedit-nullspace/1"


@dataclass(frozen=True)
class AlphaEditParams(MemitParams):
    # AlphaEdit's published value for GPT-2 XL, GPT-J and Llama3-8B (hparams/AlphaEdit/*.json).
    nullspace_threshold: float = 2e-2
    l2: float = 10.0                           # their "L2": ridge on (K_p K_pᵀ + K Kᵀ) P

    def check(self) -> str | None:
        if not self.mom2_adjustment:
            return "key 'mom2_adjustment': AlphaEdit needs the covariance statistics (true) for its null space"
        if self.nullspace_threshold <= 0:
            return "key 'nullspace_threshold': must be > 0"
        if self.l2 <= 0:
            return "key 'l2': must be > 0 (the null-space solve needs the ridge)"
        return super().check()


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()).hexdigest()


def projector_path(stats_file: Path, threshold: float) -> Path:
    """``<stats file stem>.nullspace-t<threshold>.safetensors``, beside the statistics."""
    return stats_file.with_name(f"{stats_file.stem}.nullspace-t{threshold:.6g}.safetensors")


def projector(C: torch.Tensor, stats_file: Path | None, threshold: float) -> tuple[torch.Tensor, int, bool]:
    """P for ``C`` and ``threshold``: ``(P float64 CPU, null-space dim, loaded from cache)``.

    The cache file sits beside the statistics file and is keyed by the SHA-256 of C's
    float64 bytes (so recomputed statistics invalidate it) and the threshold (in the
    name and the metadata); a mismatched or unreadable file is rebuilt and replaced,
    atomically.  ``stats_file`` None: no cache.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from kedit.util.atomic import atomic_path

    C = C.detach().to("cpu", torch.float64)
    if stats_file is None:
        P, dim = nullspace_projector(C, threshold)
        return P, dim, False
    path = projector_path(Path(stats_file), threshold)
    expect = {"format": PROJECTOR_FORMAT, "threshold": repr(float(threshold)), "stats_file": Path(stats_file).name,
              "stats_sha256": _tensor_sha256(C)}
    if path.exists():
        why = None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                P = f.get_tensor("P")
            bad = [k for k, v in expect.items() if meta.get(k) != v]
            if bad:
                why = f"metadata mismatch ({', '.join(bad)})"
            elif tuple(P.shape) != tuple(C.shape) or not torch.isfinite(P).all():
                why = f"bad tensor of shape {tuple(P.shape)}"
            else:
                return P.to(torch.float64), int(meta.get("dim", "0")), True
        except Exception as e:  # noqa: BLE001 - any unreadable file is rebuilt
            why = f"unreadable ({(str(e).strip().splitlines() or [type(e).__name__])[0]})"
        log.warning("null-space projector cache %s: %s; rebuilding", path, why)
    P, dim = nullspace_projector(C, threshold)
    with atomic_path(path) as tmp:
        save_file({"P": P.contiguous()}, str(tmp), metadata={**expect, "dim": str(dim), "d_key": str(C.shape[0])})
    return P, dim, False


@register
class AlphaEdit(MEMIT):
    name = "alphaedit"
    description = "MEMIT projected onto the null space of preserved keys (Fang et al. 2025)"
    Params = AlphaEditParams

    def prepare(self) -> None:
        if getattr(self, "_null_ready", False):
            return
        super().prepare()
        t0 = time.perf_counter()
        p, d = self.params, self.adapter.key_size
        self.P: dict[int, torch.Tensor] = {}
        self.null_dim: dict[int, int] = {}
        for layer in p.layers:
            info = self.stats_info.get(layer)
            P, dim, cached = projector(self.C[layer], info.path if info else None, p.nullspace_threshold)
            self.P[layer] = P.to(self.adapter.layer_device(layer))
            self.null_dim[layer] = dim
            self.ctx.say(f"alphaedit layer {layer}: null space {dim}/{d} (threshold {p.nullspace_threshold:g}"
                         f"{', cached' if cached else ''})")
        # Σ k kᵀ over the keys of committed edits, per layer (K_p K_pᵀ).
        self.preserved = {layer: torch.zeros(d, d, dtype=torch.float64, device=self.adapter.layer_device(layer))
                          for layer in p.layers}
        self.committed = 0
        self._pending: tuple[Delta, dict[int, torch.Tensor]] | None = None
        self._batch_keys: dict[int, torch.Tensor] = {}
        self.ctx.add_time("prepare", time.perf_counter() - t0)
        self._null_ready = True

    def _layer_update(self, layer: int, R: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        self._batch_keys[layer] = K.detach().double()
        return nullspace_update(R, K, self.P[layer], self.preserved[layer], self.params.l2)

    def compute(self, requests: Sequence[EditRequest]) -> Delta:
        self.prepare()
        self._batch_keys = {}
        delta = super().compute(requests)
        delta.meta["null_space_dim"] = {str(layer): dim for layer, dim in self.null_dim.items()}
        self._pending = (delta, self._batch_keys)
        return delta

    def commit(self, delta: Delta) -> None:
        """The delta stays: its keys join the preserved ones (K_p K_pᵀ += K Kᵀ per layer)."""
        if self._pending is None or self._pending[0] is not delta:
            raise RuntimeError("AlphaEdit.commit: expects the delta returned by the last compute()")
        for layer, K in self._pending[1].items():
            self.preserved[layer] += K @ K.T
        self.committed += int(next(iter(self._pending[1].values())).shape[1]) if self._pending[1] else 0
        self._pending = None

    def state(self) -> dict[str, torch.Tensor]:
        """K_p K_pᵀ per layer (``preserved.<layer>``) and the number of committed edits."""
        self.prepare()
        out = {f"preserved.{layer}": m.detach().to("cpu") for layer, m in self.preserved.items()}
        out["committed"] = torch.tensor(self.committed, dtype=torch.int64)
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state` (resuming a sequential run); names must match this config's layers."""
        self.prepare()
        want = {f"preserved.{layer}" for layer in self.params.layers} | {"committed"}
        if set(tensors) != want:
            raise ValueError(f"alphaedit state: expected {sorted(want)}, got {sorted(tensors)}")
        d = self.adapter.key_size
        for layer in self.params.layers:
            m = tensors[f"preserved.{layer}"]
            if tuple(m.shape) != (d, d):
                raise ValueError(f"alphaedit state: preserved.{layer} has shape {tuple(m.shape)}, expected ({d}, {d})")
            self.preserved[layer] = m.to(self.adapter.layer_device(layer), torch.float64).clone()
        self.committed = int(tensors["committed"])
        self._pending = None
