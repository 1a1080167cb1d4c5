"""Keys: the input k of an MLP output projection at the subject's token, written once.

ROME, MEMIT and their relatives read ``k`` at one token of the edit prompt (by default
the subject's last token), averaged over context prefixes.  Prompts of all requests
and all prefixes go through the model in one padded batch; the forward stops after
the deepest layer asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kedit.models.hooks import record, run_until_stopped
from kedit.data.cases import EditRequest
from kedit.methods.core.templates import fill
from kedit.models.tokens import encode_prompt_target, pad_batch, subject_token_indices


@dataclass(frozen=True)
class Row:
    """One tokenised prompt row: which request, its ids, where to read or write, what to predict."""

    request: int
    ids: tuple[int, ...]
    lookup: int                  # token index of the fact token
    target_start: int = 0        # target tokens are ids[target_start:target_end] (0/0: none)
    target_end: int = 0
    kind: str = "rewrite"        # "rewrite" | "kl" | "key"


def key_rows(tokenizer, requests: Sequence[EditRequest], templates: Sequence[str], position: str) -> list[Row]:
    """One row per (request, context template): the prefixed prompt, no target."""
    tmpls, subjects, owners = [], [], []
    for i, r in enumerate(requests):
        for ctx in templates:
            tmpls.append(fill(ctx, r.template))
            subjects.append(r.subject)
            owners.append(i)
    located = subject_token_indices(tokenizer, tmpls, subjects, position)
    rows = []
    for owner, (text, idx) in zip(owners, located):
        ids = tuple(int(t) for t in tokenizer(text)["input_ids"])
        rows.append(Row(owner, ids[: idx + 1], idx, kind="key"))
    return rows


def target_rows(tokenizer, requests: Sequence[EditRequest], templates: Sequence[str], position: str,
                kl_prompts: Sequence[str] = ()) -> list[Row]:
    """Rows for fitting target values: each prefixed prompt followed by ``target_new``
    (kind "rewrite"), and each KL prompt such as ``"{} is a"`` (kind "kl")."""
    rows: list[Row] = []
    for i, r in enumerate(requests):
        tmpls = [fill(ctx, r.template) for ctx in templates]
        located = subject_token_indices(tokenizer, tmpls, [r.subject] * len(tmpls), position)
        for (text, idx) in located:
            pt = encode_prompt_target(tokenizer, text, r.target_new)
            if idx >= pt.target_start:
                raise ValueError(f"case {r.case_id}: fact token {idx} is not inside the prompt {text!r}")
            rows.append(Row(i, pt.input_ids, idx, pt.target_start, pt.target_end, "rewrite"))
        for kl in kl_prompts:
            (text, idx), = subject_token_indices(tokenizer, [kl], [r.subject], position)
            ids = tuple(int(t) for t in tokenizer(text)["input_ids"])
            rows.append(Row(i, ids[: idx + 1], idx, kind="kl"))
    return rows


def batch_tensors(rows: Sequence[Row], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pad_batch([r.ids for r in rows], pad_id, side="right")
    return ids.to(device), mask.to(device)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def read_at_fact_token(loaded, requests: Sequence[EditRequest], modules: dict[str, torch.nn.Module],
                       templates: Sequence[str], position: str = "subject_last", *, inputs: bool,
                       stop_after: torch.nn.Module, batch_tokens: int = 8192) -> dict[str, torch.Tensor]:
    """The input (``inputs=True``) or output of each module at the fact token of every
    (request, context template) prompt: ``name -> (n_requests, n_templates, d)`` float32.

    All prompts go through the model in padded batches; each forward stops once
    ``stop_after`` has run.
    """
    rows = key_rows(loaded.tokenizer, requests, templates, position)
    n_t = len(templates)
    out: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    for _start, chunk in _chunks(rows, batch_tokens):
        ids, mask = batch_tensors(chunk, pad_id(loaded.tokenizer), loaded.device)
        with record(modules, inputs=inputs, stop_after=stop_after) as seen:
            run_until_stopped(lambda: loaded.model(input_ids=ids, attention_mask=mask, use_cache=False))
        look = torch.tensor([r.lookup for r in chunk], device=ids.device)
        arange = torch.arange(len(chunk), device=ids.device)
        for name in modules:
            out[name].append(seen[name][arange, look].float().cpu())
    return {name: torch.cat(v).reshape(len(requests), n_t, -1) for name, v in out.items()}


def output_at_fact_token(loaded, requests: Sequence[EditRequest], module: torch.nn.Module,
                         position: str = "subject_last") -> torch.Tensor:
    """``module``'s output at the fact token of each bare prompt, ``(n, d)`` on the model's
    device (MEMIT compares its targets with a block's, PMET with an MLP's)."""
    return read_at_fact_token(loaded, requests, {"out": module}, ["{}"], position, inputs=False,
                              stop_after=module)["out"][:, 0].to(loaded.device)


def compute_keys(loaded, requests: Sequence[EditRequest], layers: Sequence[int], templates: Sequence[str],
                 position: str = "subject_last", batch_tokens: int = 8192) -> dict[int, torch.Tensor]:
    """Keys per layer, shape ``(n_requests, n_templates, d_key)`` in float32: the inputs of
    the MLP output projections at the fact token.

    ``keys[l].mean(1)`` is the averaged key k̄ of ROME/MEMIT; ``keys[l][:, 0]`` is the
    key of the bare prompt when ``templates[0] == "{}"``.
    """
    adapter = loaded.adapter
    got = read_at_fact_token(loaded, requests, {str(l): adapter.mlp_out(l) for l in layers}, templates, position,
                             inputs=True, stop_after=adapter.mlp_out(max(layers)), batch_tokens=batch_tokens)
    return {l: got[str(l)] for l in layers}


def _chunks(rows: Sequence[Row], batch_tokens: int):
    """Consecutive chunks of rows whose padded size stays under ``batch_tokens``."""
    start = 0
    while start < len(rows):
        end, longest = start, 0
        while end < len(rows):
            longest_next = max(longest, len(rows[end].ids))
            if end > start and longest_next * (end - start + 1) > batch_tokens:
                break
            longest, end = longest_next, end + 1
        yield start, rows[start:end]
        start = end
