"""The closed-form weight updates, written once, in float64 whatever the model dtype.

Notation: a projection maps keys to values, ``v = W k`` with ``W`` of shape
``(d_out, d_key)``; ``C = E[k kᵀ]`` is the keys' uncentred second moment over a corpus.
"""

from __future__ import annotations

import torch


def rank_one_update(delta_v: torch.Tensor, k: torch.Tensor, C: torch.Tensor | None) -> torch.Tensor:
    """ROME (Meng et al. 2022, eq. 2): ΔW = δ uᵀ / (uᵀ k) with u = C⁻¹ k (u = k without C).

    Minimises the change ‖ΔW K₀‖ on the corpus keys (covariance C) subject to
    (W + ΔW) k = W k + δ.  ``delta_v`` (d_out,), ``k`` (d_key,); returns (d_out, d_key) float64.
    """
    k64 = k.double().flatten()
    u = torch.linalg.solve(C.double().to(k64.device), k64) if C is not None else k64
    return torch.outer(delta_v.double().flatten(), u) / torch.dot(u, k64)


def rank_one_direction(k_avg: torch.Tensor, C: torch.Tensor | None) -> torch.Tensor:
    """u = C⁻¹ k̄ (float64), the update's key-side direction."""
    k64 = k_avg.double().flatten()
    return torch.linalg.solve(C.double().to(k64.device), k64) if C is not None else k64


def least_squares_update(R: torch.Tensor, K: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
    """MEMIT (Meng et al. 2023, eq. 14): ΔW = R Kᵀ (λ·C + K Kᵀ)⁻¹.

    ``R`` (d_out, n): residual value changes; ``K`` (d_key, n): keys; ``C`` (d_key, d_key);
    ``lam`` = ``mom2_update_weight``.  Solved with ``torch.linalg.solve`` (no explicit
    inverse); returns (d_out, d_key) float64.
    """
    K64, R64 = K.double(), R.double().to(K.device)
    A = lam * C.double().to(K.device) + K64 @ K64.T
    # ΔW = R (A⁻¹ K)ᵀ since A is symmetric.
    return R64 @ torch.linalg.solve(A, K64).T
