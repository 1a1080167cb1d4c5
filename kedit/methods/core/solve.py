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


def nullspace_projector(C: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """AlphaEdit (Fang et al. 2025, §3.2): the projector onto the null space of the preserved keys.

    ``C = E[k kᵀ]`` (d_key, d_key) is the keys' second moment over a corpus (AlphaEdit
    writes K₀K₀ᵀ, the same matrix up to the number of tokens).  With the eigen-
    decomposition C = U Λ Uᵀ and U₀ the eigenvectors whose eigenvalue is *below*
    ``threshold``, P = U₀ U₀ᵀ.  The threshold is absolute, on the eigenvalues of the
    per-token mean C (kedit's and ROME's ``mom2``), exactly as AlphaEdit's code applies
    ``nullspace_threshold`` (2e-2) to the singular values of ``mom2.moment()``: its meaning
    therefore depends on the scale of the model's keys.  ‖P k‖ is small for any key k with
    most of its energy in the top eigen-directions, so an update ΔW = ΔW P barely moves
    W k₀ for the preserved keys: ‖ΔW K₀‖² = tr(ΔW P C P ΔWᵀ)·N ≤ threshold·‖ΔW‖²·N.

    Returns ``(P, dim)`` with P float64 (symmetric, P² = P) and dim = rank of P.
    """
    evals, U = torch.linalg.eigh(C.double())
    U0 = U[:, evals < threshold]
    return U0 @ U0.T, int(U0.shape[1])


def nullspace_update(R: torch.Tensor, K: torch.Tensor, P: torch.Tensor, Kp_Kp: torch.Tensor | None,
                     l2: float) -> torch.Tensor:
    """AlphaEdit (Fang et al. 2025, eq. 9 with the ridge of their code):
    ΔW = R Kᵀ P ((K_p K_pᵀ + K Kᵀ) P + L2·I)⁻¹.

    ``R`` (d_out, n) residuals, ``K`` (d_key, n) keys of this batch, ``P`` (d_key, d_key)
    the null-space projector (:func:`nullspace_projector`), ``Kp_Kp`` (d_key, d_key) the
    sum of k kᵀ over the keys of earlier *committed* edits (sequential editing; None = 0),
    ``l2`` their ``L2`` (> 0).  In kedit's layout (v = W k, W is (d_out, d_key)) P acts on
    the key side, i.e. it multiplies ΔW from the right.  Solved as their code does, in
    the transposed layout: X = ΔWᵀ = (P M + L2·I)⁻¹ P K Rᵀ with M = K_p K_pᵀ + K Kᵀ
    (Mᵀ = M, Pᵀ = P).  From P M X + L2·X = P K Rᵀ, X = P(K Rᵀ − M X)/L2 lies in the range of
    P, so ΔW = ΔW P: the update is exactly (up to rounding) orthogonal to the preserved
    subspace.  Returns (d_out, d_key) float64.
    """
    K64 = K.double()
    dev = K64.device
    R64, P64 = R.double().to(dev), P.double().to(dev)
    M = K64 @ K64.T
    if Kp_Kp is not None:
        M = M + Kp_Kp.double().to(dev)
    A = P64 @ M + l2 * torch.eye(M.shape[0], dtype=torch.float64, device=dev)
    return torch.linalg.solve(A, P64 @ (K64 @ R64.T)).T


def equality_constrained_update(R: torch.Tensor, K: torch.Tensor, C: torch.Tensor, lam: float,
                                ridge: float = 0.0, norm_lambda: float = 0.0) -> torch.Tensor:
    """EMMET (Gupta et al. 2024, "A Unified Framework for Model Editing"): batched ROME.

    Minimise the change on the preserved keys, ‖ΔW K₀‖² with K₀K₀ᵀ ≈ A = λ·C + μ·I
    (λ = ``mom2_update_weight``, μ = ``norm_lambda``, their ``update_norm_lambda``),
    subject to the n equality constraints (W + ΔW) K = W K + R.  Lagrange multipliers
    give the closed form

        ΔW = R D⁻¹ Kᵀ A⁻¹,   D = Kᵀ A⁻¹ K (+ ``ridge``·I when n > 1),

    with ``ridge`` their ``emmet_lambda``, added, as in their code, only for batches of
    more than one edit (D is ill-conditioned when keys are nearly parallel); with
    ridge = 0 the constraints hold exactly, and for n = 1 this is ROME's rank-one update.
    Note that λ only matters through λ·ridge (ΔW = R (KᵀC⁻¹K + λ·ridge·I)⁻¹ KᵀC⁻¹ for μ = 0),
    and that by the push-through identity Kᵀ(λC + KKᵀ)⁻¹ = (KᵀC⁻¹K + λI)⁻¹KᵀC⁻¹, MEMIT's
    :func:`least_squares_update` with weight λ is this update with λ·ridge = λ: EMMET is
    MEMIT with the ridge taken (nearly) to zero.
    ``R`` (d_out, n), ``K`` (d_key, n), ``C`` (d_key, d_key); returns (d_out, d_key) float64.
    """
    K64 = K.double()
    dev = K64.device
    R64 = R.double().to(dev)
    A = lam * C.double().to(dev)
    if norm_lambda:
        A = A + norm_lambda * torch.eye(A.shape[0], dtype=torch.float64, device=dev)
    Y = torch.linalg.solve(A, K64)                      # A⁻¹ K, (d_key, n)
    D = K64.T @ Y                                       # (n, n), symmetric
    if D.shape[0] > 1 and ridge:
        D = D + ridge * torch.eye(D.shape[0], dtype=torch.float64, device=dev)
    return R64 @ torch.linalg.solve(D, Y.T)             # R D⁻¹ Yᵀ
