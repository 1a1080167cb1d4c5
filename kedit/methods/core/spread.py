"""The layer loop of MEMIT-style batch edits, written once: write a residual into the MLP
output projections of consecutive layers, each layer solving for its share with the
updates of the layers below it already in the model.

For layer l_i (ascending, i = 0 .. m−1):

    K   = the projection's keys at the fact token, averaged over the context prefixes
          (``core.keys.compute_keys``), read with the updates of l_0 .. l_{i−1} in place;
    cur = ``current()``: what the target z is compared with, read now (MEMIT: the residual
          stream after the last edited block; PMET: the last edited layer's MLP output);
    R   = (z − cur) / ``divisor(m − i)``   (MEMIT: m − i, the remaining change spread evenly;
          PMET: sqrt(m − i));
    R   ← ``J⁺ R`` when the targets are residual-stream vectors (``residual_targets``) and the
          architecture puts a norm between the projection and the residual stream (Gemma-3's
          post-feed-forward RMSNorm, ``adapter.mlp_out_norm``): the projection's output change
          that moves the norm's output by R to first order, with J the norm's Jacobian at the
          projection's output o (at the fact token, averaged over the context prefixes as the
          keys are) and J⁺ its pseudo-inverse.  An RMSNorm is blind to the direction
          of o itself (J o = 0), so J⁺ R has no component along o; without this mapping a
          change written for the residual stream arrives scaled by gain / rms(o) and
          MEMIT-style edits miss their targets (docs/models.md, Gemma-3).  When the targets
          are the last edited layer's projection outputs (PMET) and there is such a norm, R is
          first taken to the residual stream through that layer's norm, ``J_last R``, then
          mapped as above (``J_l⁺ J_last R``): each layer writes the residual change its share
          of the gap stands for (the per-layer norms' gains over their inputs' rms differ by
          a factor of six over Gemma-3's layers 2-6), and the last layer still writes R less
          its component along the projection's own output, which the norm does not pass;
    ΔW  = ``layer_update(l_i, R, K)``       (MEMIT's least squares, AlphaEdit's null-space
          projection, EMMET's equality constraints ...),

and ΔW is added to the weights before the next layer's keys are read.  The weights are
restored (copied back) before returning, so the model is unchanged.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import torch

from kedit.data.cases import EditRequest
from kedit.methods.core.keys import compute_keys, read_at_fact_token


def through_norm(norm: torch.nn.Module, outputs: torch.Tensor, R: torch.Tensor, rtol: float = 1e-2,
                 chunk: int = 64) -> torch.Tensor:
    """The change of a norm's input that moves its output by ``R`` to first order.

    ``outputs`` (n, t, d): the norm's inputs at n requests × t prefixes, averaged over the
    prefixes into ō; ``R`` (n, d) the wanted change of its output.  Returns (n, d), float32
    on ``R``'s device: the minimum-norm least-squares answer ``J⁺ R`` with ``J = J(ō)`` the
    norm's Jacobian (module docstring), as ``Jᵀ y`` with ``(J Jᵀ + μ I) y = R``, in float64,
    μ = (rtol · σ_max)²: directions whose gain is under ``rtol`` of the largest are dropped
    rather than inverted (an RMSNorm's eps leaves ō's own direction a gain of about
    eps / mean(ō²), not exactly 0).  The system is solved by conjugate gradients
    preconditioned with its diagonal (a norm's Jacobian is a diagonal scaling up to a
    low-rank term, so a handful of iterations do), ``chunk`` requests at a time: O(d²) per
    request, never a d × d factorisation."""
    f64 = copy.deepcopy(norm).to(device=R.device, dtype=torch.float64).requires_grad_(False)
    out = []
    for start in range(0, R.shape[0], chunk):
        mean = outputs[start:start + chunk].to(R.device, torch.float64).mean(1)
        with torch.no_grad():
            jac = torch.func.vmap(torch.func.jacfwd(lambda v: f64(v[None])[0]))(mean)   # (m, d, d)
        b = R[start:start + chunk].to(torch.float64)
        with torch.no_grad():
            out.append(_solve_gram(jac, b, rtol).float())
    return torch.cat(out)


def along_norm(norm: torch.nn.Module, outputs: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """``J dz``: how far a change ``dz`` (n, d) of a norm's input moves its output to first
    order, with J the norm's Jacobian at the inputs ``outputs`` (n, t, d) averaged over the
    prefixes (as in :func:`through_norm`).  Float32 on ``dz``'s device."""
    f64 = copy.deepcopy(norm).to(device=dz.device, dtype=torch.float64).requires_grad_(False)
    mean = outputs.to(dz.device, torch.float64).mean(1)
    with torch.no_grad():
        _, moved = torch.func.vmap(lambda v, t: torch.func.jvp(lambda x: f64(x[None])[0], (v,), (t,)))(
            mean, dz.to(torch.float64))
    return moved.float()


def _solve_gram(jac: torch.Tensor, b: torch.Tensor, rtol: float, max_iter: int = 50) -> torch.Tensor:
    """``Jᵀ y`` with ``(J Jᵀ + μ I) y = b`` per row (see :func:`through_norm`)."""
    jac_t = jac.transpose(1, 2).contiguous()

    def gram(u: torch.Tensor) -> torch.Tensor:
        return torch.bmm(jac, torch.bmm(jac_t, u[:, :, None]))[:, :, 0]

    # σ_max² ≤ ‖J‖₁ ‖J‖∞ (largest absolute column and row sums): one pass, an upper bound
    top = jac.abs().sum(1).amax(-1, keepdim=True) * jac.abs().sum(2).amax(-1, keepdim=True)
    mu = (rtol ** 2) * top
    precond = (jac * jac).sum(-1) + mu                    # the diagonal of J Jᵀ + μ I
    y = torch.zeros_like(b)
    r = b.clone()
    z = r / precond
    p = z.clone()
    rz = (r * z).sum(-1, keepdim=True)
    stop = 1e-16 * (b * b).sum(-1, keepdim=True)
    for _ in range(max_iter):
        if bool(((r * r).sum(-1, keepdim=True) <= stop).all()):
            break
        ap = gram(p) + mu * p
        alpha = rz / (p * ap).sum(-1, keepdim=True).clamp_min(1e-300)
        y, r = y + alpha * p, r - alpha * ap
        z = r / precond
        rz_new = (r * z).sum(-1, keepdim=True)
        p = z + (rz_new / rz.clamp_min(1e-300)) * p
        rz = rz_new
    return torch.bmm(jac_t, y[:, :, None])[:, :, 0]


def _outputs(loaded, requests: Sequence[EditRequest], layer: int, templates: Sequence[str],
             position: str) -> torch.Tensor:
    """The MLP output projection's outputs at the fact token, (n, t, d), one per prefix."""
    proj = loaded.adapter.mlp_out(layer)
    return read_at_fact_token(loaded, requests, {"o": proj}, templates, position, inputs=False, stop_after=proj)["o"]


def spread_over_layers(loaded, requests: Sequence[EditRequest], layers: Sequence[int], templates: Sequence[str],
                       position: str, z: torch.Tensor, current: Callable[[], torch.Tensor],
                       layer_update: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
                       divisor: Callable[[int], float], ctx=None,
                       residual_targets: bool = True) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The updates of ``layers`` (parameter name -> tensor in the parameter's layout, model
    dtype) and per-layer norms; ``z`` (n, d) the targets, ``current()`` -> (n, d) (see the
    module docstring); ``residual_targets``: z lives in the residual stream (MEMIT), not at
    the last layer's projection output (PMET).  ``ctx`` (a RunContext) gets the ``key`` and ``update`` times."""
    adapter, model = loaded.adapter, loaded.model
    saved: dict[str, torch.Tensor] = {}           # parameter -> its value before (copied back at the end)
    tensors: dict[str, torch.Tensor] = {}
    info: list[dict] = []
    try:
        for i, layer in enumerate(layers):
            t0 = time.perf_counter()
            K = compute_keys(loaded, requests, [layer], templates, position)[layer].mean(1)
            dev = adapter.layer_device(layer)             # a device map may put layers on other devices
            K = K.T.to(dev)                                                     # (d_key, n)
            cur = current().to(dev)                                             # (n, d)
            t1 = time.perf_counter()
            R = (z.to(dev) - cur) / divisor(len(layers) - i)          # (n, d_out)
            norm = adapter.mlp_out_norm(layer)
            if norm is not None:
                outputs = _outputs(loaded, requests, layer, templates, position)
                if not residual_targets:      # a gap at the last layer's projection output
                    last = outputs if layer == layers[-1] else _outputs(loaded, requests, layers[-1],
                                                                        templates, position)
                    R = along_norm(adapter.mlp_out_norm(layers[-1]), last, R)
                R = through_norm(norm, outputs, R)
            R = R.T                                                             # (d_out, n)
            dW = layer_update(layer, R, K)
            name = adapter.mlp_out_param(layer)
            upd = adapter.to_param_layout(dW).to(adapter.dtype)
            param = model.get_parameter(name)
            saved.setdefault(name, param.detach().clone())
            with torch.no_grad():
                param.add_(upd.to(param.device))
            tensors[name] = upd
            info.append({"layer": layer, "residual_norm": float(R.norm()), "update_norm": float(dW.norm())})
            if ctx is not None:
                ctx.add_time("key", t1 - t0)
                ctx.add_time("update", time.perf_counter() - t1)
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                model.get_parameter(name).copy_(value)
    return tensors, info
