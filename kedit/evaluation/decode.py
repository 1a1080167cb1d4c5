"""Greedy decoding with a key/value cache: the loop kedit's greedy generations run through.

Each step is one forward call of the model with the keyword arguments transformers'
``generate`` passes (``input_ids``, the 2-D ``attention_mask``, ``position_ids`` from the mask
(where the forward takes them), the cache under the name the forward takes, ``use_cache``,
``logits_to_keep=1`` where the forward has it), so every edit kind acts as under ``generate``: weight
deltas and adapters are in the modules, memories route with the mask a forward
pre-hook hands them, a context edit sees an empty cache on the first call only.  One
difference: the mask is passed even when it is all ones (``generate`` in transformers
5.2x drops it then, and a wrapper that gets no mask cannot tell a cached step from a new
sequence: WISE would re-route every step of an unpadded batch).  The
next token is the argmax of the last position's logits; no logits processor runs (the
generation settings stored with a model -- repetition penalty, suppressed tokens -- are
not applied: before/after generations differ only by the edit).

What ``generate`` spends per step beyond the forward (logits processors, stopping
criteria over the whole batch, bookkeeping of the growing ids) is gone, and a row that
has ended (an end id: the model's EOS or a stop token) leaves the batch: the cache, the
mask and the per-row state of installed wrappers (:meth:`EditWrapper.keep_rows`) keep
the rows that go on, so the later steps compute only those.  The ids returned are what
``generate`` returns after the prompt: each row's tokens up to and including its end
id, then ``pad_id`` up to the longest row.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch

from kedit.methods.edit import EditWrapper
from kedit.models.cache import cache_arg, new_cache

__all__ = ["end_ids", "greedy_decode"]


def end_ids(model: Any) -> list[int]:
    """The ids that end a generation: the model's EOS ids (its generation config's, else
    its config's; an int or a list)."""
    for owner in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(owner, "eos_token_id", None)
        if value is not None:
            return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return []


def greedy_decode(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  max_new_tokens: int, *, stop_ids: Sequence[int] | torch.Tensor = (), pad_id: int = 0
                  ) -> torch.Tensor:
    """Greedy continuation of a left-padded batch: ``(batch, steps)`` new ids.

    A row ends after ``max_new_tokens`` tokens, after an EOS id (:func:`end_ids`) or after
    a token in ``stop_ids``; the loop ends when every row has.  Run it under
    ``torch.inference_mode`` with the model in eval mode (as :func:`kedit.evaluation.generation.generate` does).
    """
    device = input_ids.device
    batch = input_ids.shape[0]
    ends = torch.tensor(sorted({*end_ids(model), *(int(i) for i in torch.as_tensor(stop_ids).reshape(-1).tolist())}),
                        dtype=torch.long, device=device)
    params = inspect.signature(model.forward).parameters
    cache = new_cache(model)
    fixed: dict[str, Any] = {cache_arg(model.forward): cache, "use_cache": True, "return_dict": True}
    if "logits_to_keep" in params:
        fixed["logits_to_keep"] = 1
    with_positions = "position_ids" in params
    wrappers = [m for m in model.modules() if isinstance(m, EditWrapper)]

    mask = attention_mask.to(device=device, dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    ids = input_ids
    live = torch.arange(batch, device=device)          # the original row of each row still running
    out = torch.full((batch, max_new_tokens), int(pad_id), dtype=torch.long, device=device)
    steps = 0
    for step in range(max_new_tokens):
        extra = {"position_ids": positions} if with_positions else {}
        logits = model(input_ids=ids, attention_mask=mask, **extra, **fixed).logits
        nxt = logits[:, -1, :].argmax(-1)
        out[live, step] = nxt
        steps = step + 1
        done = torch.isin(nxt, ends)
        if bool(done.all()) or steps == max_new_tokens:
            break
        if bool(done.any()):
            keep = (~done).nonzero()[:, 0]
            cache.batch_select_indices(keep)
            for w in wrappers:
                w.keep_rows(keep)
            mask, positions, live, nxt = mask[keep], positions[keep], live[keep], nxt[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        positions = positions[:, -1:] + 1
        ids = nxt[:, None]
    return out[:, :steps]
