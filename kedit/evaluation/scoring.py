"""Teacher-forced scoring of target continuations (the one forward-pass path of evaluation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from kedit.models.tokens import PromptTarget, encode_prompt_target, pad_batch

__all__ = ["TargetScore", "model_device", "pad_token_id", "score_targets"]


@dataclass
class TargetScore:
    """Teacher-forced scores of one target after its prompt (all tensors on CPU).

    ``target_ids``: the target's token ids, shape ``(T,)``; ``logprobs``: float64
    log-probability of each target token given everything before it; ``argmax_ids``:
    the model's argmax prediction at each of those positions.
    """

    target_ids: torch.Tensor
    logprobs: torch.Tensor
    argmax_ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.target_ids.numel())


def model_device(model: Any) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless callable)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def pad_token_id(tokenizer: Any) -> int:
    """``tokenizer.pad_token_id``, else the EOS id, else 0 (padding is masked anyway)."""
    for pid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if pid is not None:
            return int(pid)
    return 0


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if logits is None:
        raise TypeError(f"model output {type(out).__name__} has no .logits")
    return logits


def score_targets(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 32,
) -> list[TargetScore]:
    """Score each ``(prompt, target)`` with teacher forcing, in input order.

    Each pair is encoded with :func:`kedit.models.tokens.encode_prompt_target`; pairs are
    sorted by length, right-padded into batches of ``batch_size`` (one forward each,
    with the attention mask, under ``torch.inference_mode()``), and only the logits at
    positions predicting target tokens (position ``i - 1`` predicts token ``i``) are
    kept, cast to float32 before ``log_softmax``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoded: list[PromptTarget] = []
    for prompt, target in pairs:
        pt = encode_prompt_target(tokenizer, prompt, target)
        if pt.target_start < 1:
            raise ValueError(
                f"target {target!r} has no preceding token to predict it from (empty prompt "
                "and no BOS token)"
            )
        encoded.append(pt)
    if not encoded:
        return []

    device = model_device(model)
    pad = pad_token_id(tokenizer)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids), reverse=True)
    results: list[TargetScore | None] = [None] * len(encoded)
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            input_ids, attention_mask = pad_batch([encoded[i].input_ids for i in idx], pad, "right")
            logits = _logits(
                model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
            )
            for row, i in enumerate(idx):
                pt = encoded[i]
                rows = logits[row, pt.target_start - 1 : pt.target_end - 1].float()
                logp = torch.log_softmax(rows, dim=-1)
                tgt = torch.tensor(pt.target_ids, dtype=torch.long, device=logp.device)
                token_logp = logp.gather(-1, tgt[:, None])[:, 0]
                results[i] = TargetScore(
                    target_ids=tgt.cpu(),
                    logprobs=token_logp.double().cpu(),
                    argmax_ids=rows.argmax(-1).long().cpu(),
                )
            del logits
    return results  # type: ignore[return-value]
