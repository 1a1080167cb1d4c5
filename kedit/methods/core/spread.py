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
    ΔW  = ``layer_update(l_i, R, K)``       (MEMIT's least squares, AlphaEdit's null-space
          projection, EMMET's equality constraints ...),

and ΔW is added to the weights before the next layer's keys are read.  The weights are
restored (copied back) before returning, so the model is unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from kedit.data.cases import EditRequest
from kedit.methods.core.keys import compute_keys


def spread_over_layers(loaded, requests: Sequence[EditRequest], layers: Sequence[int], templates: Sequence[str],
                       position: str, z: torch.Tensor, current: Callable[[], torch.Tensor],
                       layer_update: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
                       divisor: Callable[[int], float], ctx=None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The updates of ``layers`` (parameter name -> tensor in the parameter's layout, model
    dtype) and per-layer norms; ``z`` (n, d) the targets, ``current()`` -> (n, d) (see the
    module docstring).  ``ctx`` (a RunContext) gets the ``key`` and ``update`` times."""
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
            R = (z.to(dev) - cur).T / divisor(len(layers) - i)                  # (d_out, n)
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
