"""Target values: the vector δ added at the fact token so the model emits ``target_new``.

Written once for ROME (δ added to the MLP output projection's output at the edited
layer), MEMIT (δ added to the residual stream at the last edited layer) and PMET (one δ
at the attention output and one at the MLP output of the same block, fitted jointly:
pass a sequence of modules; each gets its own δ, its own v0, clamp and weight decay).  All
requests of a batch are optimised together: each has its own δ row and its own
prompt rows, the loss is a sum of per-request losses (so the gradients do not mix),
and a request that has converged leaves the batch.

Loss of request i (ROME ``compute_v`` / MEMIT ``compute_z``, Meng et al. 2022/2023):

    L_i = mean_r NLL(target_new | prefix_r + prompt)                 (mean token NLL per row)
        + kl_factor · mean_j KL(P_δ(· | kl_j) ‖ P_0(· | kl_j))        (next-token distributions
                                                                      at the fact token of the
                                                                      "{subject} is a" prompts;
                                                                      argument order as in the
                                                                      reference code)
        + weight_decay · Σ_m ‖δ_im‖ / ‖v0_im‖²                      (as in the reference code;
                                                                      m: the modules, one for ROME/MEMIT)

with Adam on δ, δ_i clamped to ``clamp_norm_factor · ‖v0_i‖`` after each step (v0_i:
the module's original output at the fact token of the bare prompt; ``clamp_norm_ref``
replaces ‖v0_i‖ in the clamp by a fixed norm per module), and early stop
once a loss is below ``early_stop_loss``: with ``early_stop_on="nll"`` the target NLL
term (the "target loss is small" criterion: it saves most of the steps), with
``"total"`` the whole L_i, as the reference code (ROME, MEMIT, EasyEdit) compares it --
the KL and weight-decay terms keep L_i above the threshold for some steps after the
target is emitted, so "total" runs longer and fits a stronger δ.  Only δ requires a
gradient (every weight is frozen), and logits are computed only at the positions that
enter the loss.  The blocks below the one that holds the edited module do not depend
on δ: they run once, in the initial pass, whose residual stream entering that block is
replayed at every step (``hooks.replay_from``).
Nor do the positions before the fact token, in any block: δ enters at the fact token and
attention is causal.  The initial pass keeps their attention keys/values (a KV cache per
row, for the blocks that run at every step); each step then runs only the positions from
the fact token on, attending to that cache (``prefix_cache``).  With ten-token context
prefixes the fact token sits near the end of every row, so a step computes a quarter of
the tokens it would otherwise: same targets up to float rounding (tested per family).  A
step runs its rows in groups of equal suffix length (``_step_chunks``), so a batch of
requests does not pad one-token KL rows and short suffixes to its longest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from kedit.models.cache import cache_arg
from kedit.models.hooks import edit_output, record, replay_from, run_until_stopped
from kedit.data.cases import EditRequest
from kedit.methods.core.keys import Row, _chunks, batch_tensors, pad_id, target_rows


@dataclass(frozen=True)
class TargetOptions:
    steps: int = 20
    lr: float = 0.5
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    early_stop_on: str = "nll"    # "nll": the target NLL term; "total": the whole loss (reference code)
    loss_layer: int = -1          # block whose output feeds the LM head for the loss (-1: last)
    kl_prompts: tuple[str, ...] = ("{} is a",)
    batch_tokens: int = 4096      # rows per forward chunk (padded tokens); gradients accumulate
    replay: bool = True           # run the blocks below the edited one once (see module docstring)
    prefix_cache: bool = True     # steps run the positions from the fact token on (see module docstring)
    clamp_norm_ref: tuple[float, ...] | None = None  # per module: a fixed ‖v0‖ for the clamp (None: each request's own)


@dataclass
class Targets:
    delta: torch.Tensor           # (n, d) float32: the optimised δ per request ((n, M, d) for M modules)
    v0: torch.Tensor              # (n, d) float32: original output at the fact token, bare prompt (same shape)
    steps: list[int]              # gradient steps used per request
    loss: list[float]             # final loss per request
    nll: list[float]              # final target NLL per request


def _loss_positions(rows: Sequence[Row]) -> tuple[list[int], list[int], list[int], list[int]]:
    """Flattened (row, position, label, owner-row) lists for every logit the loss needs.

    Rewrite rows: positions predicting each target token (label = the token).
    KL rows: the fact token position (label -1).
    """
    rr, pos, lab, own = [], [], [], []
    for j, r in enumerate(rows):
        if r.kind == "rewrite":
            for t in range(r.target_start, r.target_end):
                rr.append(j), pos.append(t - 1), lab.append(r.ids[t]), own.append(j)
        else:
            rr.append(j), pos.append(r.lookup), lab.append(-1), own.append(j)
    return rr, pos, lab, own


def _step_chunks(rows: Sequence[Row], idx: Sequence[int], opts: TargetOptions, by_length: bool):
    """The rows ``idx`` of a gradient step as (rows, row ids) chunks.  With the prefix cache a
    step runs each row from its fact token on, so with ``by_length`` rows are grouped by that
    suffix's length (a batch of requests mixes suffixes of 1 to ~10 tokens; padded to the
    longest, a third of a step's tokens were padding); each group is cut into chunks under
    ``batch_tokens``.  Sliding-window models keep the rows in one group: a chunk of KL rows
    alone (one-token suffixes) did not reproduce the full forward there (tests/test_values.py)."""
    if not (opts.prefix_cache and by_length):
        groups = [list(idx)]
    else:
        by_len: dict[int, list[int]] = {}
        for j in idx:
            by_len.setdefault(len(rows[j].ids) - rows[j].lookup, []).append(j)
        groups = [by_len[k] for k in sorted(by_len)]
    for group in groups:
        for start, chunk in _chunks([rows[j] for j in group], opts.batch_tokens):
            yield chunk, group[start: start + len(chunk)]


def block_index(adapter, module: torch.nn.Module) -> int:
    """The layer whose block is or contains ``module``."""
    for layer in range(adapter.n_layers):
        if any(m is module for m in adapter.block(layer).modules()):
            return layer
    raise ValueError("module is not inside any transformer block")


def optimise_targets(loaded, requests: Sequence[EditRequest], templates: Sequence[str],
                     module: torch.nn.Module | Sequence[torch.nn.Module], position: str, opts: TargetOptions,
                     seed: int = 0) -> Targets:
    """Fit δ for every request at ``module``'s output (see the module docstring).

    ``module`` may be a sequence of modules of one block with outputs of one width (PMET:
    attention and MLP outputs); each gets its own δ, and ``Targets.delta`` / ``v0`` are then
    ``(n, M, d)``.  One module gives ``(n, d)``, computed exactly as before."""
    adapter, tok, model = loaded.adapter, loaded.tokenizer, loaded.model
    device = loaded.device
    single = isinstance(module, torch.nn.Module)
    modules = [module] if single else list(module)
    layers = {block_index(adapter, m) for m in modules}
    if len(layers) != 1:
        raise ValueError(f"optimise_targets: the modules must lie in one block, got blocks {sorted(layers)}")
    edit_layer = layers.pop()
    blocks = [adapter.block(i) for i in range(edit_layer + 1)]
    replay = opts.replay and edit_layer > 0
    row_input: dict[int, torch.Tensor] = {}     # row index -> residual stream entering the edited block
    structure: list = []                        # one real output of the block below (its shape of object)
    # without a KL term its rows would only be computed and multiplied by zero
    rows = target_rows(tok, requests, templates, position, list(opts.kl_prompts) if opts.kl_factor else [])
    n = len(requests)
    loss_layer = adapter.n_layers - 1 if opts.loss_layer < 0 else adapter.check_layer(opts.loss_layer)
    loss_block = adapter.block(loss_layer)
    norm, head = adapter.final_norm(), adapter.lm_head()
    n_rewrite = torch.zeros(n)
    n_kl = torch.zeros(n)
    for r in rows:
        (n_rewrite if r.kind == "rewrite" else n_kl)[r.request] += 1

    cache_name = cache_arg(model.forward)
    first_cached = edit_layer if replay else 0  # blocks that run at every step
    cached_layers = range(first_cached, loss_layer + 1)
    # Sliding-window attention (Gemma-3) counts its window in cache slots: a row's cached prefix
    # must then end right before its suffix (right-aligned), or the unused slots between them
    # would eat into the window.  Full attention does not care; those models keep the
    # left-aligned layout they always had.
    align_right = any(adapter.sliding_window(l) is not None for l in range(adapter.n_layers))
    prefix_kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}   # row -> K/V before its fact token

    def keep_prefix(cache, chunk: Sequence[Row], row_ids: Sequence[int]) -> None:
        for b, (j, r) in enumerate(zip(row_ids, chunk)):
            prefix_kv[j] = [(cache.layers[l].keys[b, :, : r.lookup].clone(),
                             cache.layers[l].values[b, :, : r.lookup].clone()) for l in cached_layers]

    def suffix_inputs(chunk: Sequence[Row], row_ids: Sequence[int]):
        """Ids, mask, positions and KV cache for running only ``ids[lookup:]`` of each row."""
        P = max(r.lookup for r in chunk)
        suffix = [r.ids[r.lookup:] for r in chunk]
        ids, smask = batch_tensors([Row(0, s, 0) for s in suffix], pad_id(tok), device)
        B, S = ids.shape
        past_mask = torch.zeros(B, P, dtype=smask.dtype, device=device)
        first = [P - r.lookup if align_right else 0 for r in chunk]   # slot of each row's first prefix token
        for b, r in enumerate(chunk):
            past_mask[b, first[b]: first[b] + r.lookup] = 1
        positions = torch.tensor([r.lookup for r in chunk], device=device)[:, None] + torch.arange(S, device=device)
        k0, v0_ = prefix_kv[row_ids[0]][0]
        data: list = []
        for li in range(adapter.n_layers):
            if li < first_cached or li > loss_layer:
                # never run (skipped or after the loss block); layer 0 still tells the model the past length
                data.append((torch.zeros(B, k0.shape[0], P, k0.shape[-1], dtype=k0.dtype, device=device),) * 2
                            if li == 0 else (None, None))
                continue
            kd = prefix_kv[row_ids[0]][li - first_cached][0].device   # the layer's own device (sharded models)
            K = torch.zeros(B, k0.shape[0], P, k0.shape[-1], dtype=k0.dtype, device=kd)
            V = torch.zeros(B, v0_.shape[0], P, v0_.shape[-1], dtype=v0_.dtype, device=kd)
            for b, (j, r) in enumerate(zip(row_ids, chunk)):
                k, v = prefix_kv[j][li - first_cached]
                K[b, :, first[b]: first[b] + r.lookup], V[b, :, first[b]: first[b] + r.lookup] = k, v
            data.append((K, V))
        return ids, torch.cat([past_mask, smask], dim=1), positions, DynamicCache(ddp_cache_data=data)

    def forward(chunk: Sequence[Row], delta: torch.Tensor | None, row_ids: Sequence[int]):
        """Log-probs at the loss positions of ``chunk`` (and the module output at fact tokens).

        First pass (``delta`` None): the full model, recording the input of the edited
        block per row (and the prefix KV cache); later passes replay it, skip the blocks
        below and, with ``prefix_cache``, run only the positions from the fact token on.
        """
        suffix_only = opts.prefix_cache and delta is not None
        start = [r.lookup if suffix_only else 0 for r in chunk]
        extra: dict = {"use_cache": False}
        if suffix_only:
            ids, mask, positions, cache = suffix_inputs(chunk, row_ids)
            extra = {"position_ids": positions, cache_name: cache, "use_cache": True}
        else:
            ids, mask = batch_tensors(chunk, pad_id(tok), device)
            if opts.prefix_cache:
                cache = DynamicCache()
                extra = {cache_name: cache, "use_cache": True}
        look = torch.tensor([r.lookup - s0 for r, s0 in zip(chunk, start)], device=device)
        req = torch.tensor([r.request for r in chunk], device=device)
        arange = torch.arange(len(chunk), device=device)
        seen_out: dict[int, torch.Tensor] = {}

        def add_delta(m: int):
            def fn(out: torch.Tensor) -> torch.Tensor:
                # the edited module's device, which a device map may make another than the inputs'
                rows_, look_ = arange.to(out.device), look.to(out.device)
                seen_out[m] = out[rows_, look_].detach()
                if delta is None:
                    return out
                add = torch.zeros_like(out)
                add = add.index_put((rows_, look_), delta[req, m].to(out.device, out.dtype))
                return out + add
            return fn

        def stacked() -> torch.Tensor:
            x = torch.zeros(ids.shape[0], ids.shape[1], row_input[row_ids[0]].shape[-1],
                            dtype=row_input[row_ids[0]].dtype, device=device)
            for b, (j, s0) in enumerate(zip(row_ids, start)):
                part = row_input[j][s0:]
                x[b, : part.shape[0]] = part
            return x

        with contextlib.ExitStack() as stack:
            for m, mod in enumerate(modules):
                stack.enter_context(edit_output(mod, add_delta(m)))
            seen = stack.enter_context(record({"h": loss_block}, inputs=False, stop_after=loss_block, detach=False))
            if replay and delta is not None:
                stack.enter_context(replay_from(blocks, stacked, structure[0]))
            elif replay:
                entering = stack.enter_context(record({"x": blocks[-1]}, inputs=True))
                keep = blocks[-2].register_forward_hook(lambda _m, _a, out: None if structure else structure.append(out))
                stack.callback(keep.remove)
            run_until_stopped(lambda: model(input_ids=ids, attention_mask=mask, **extra))
            if replay and delta is None:
                for b, (j, r) in enumerate(zip(row_ids, chunk)):
                    row_input[j] = entering["x"][b, : len(r.ids)].clone()
        if opts.prefix_cache and delta is None:
            keep_prefix(cache, chunk, row_ids)
        rr, pos, lab, _ = _loss_positions(chunk)
        pos = [p - start[j] for j, p in zip(rr, pos)]
        h = seen["h"]
        h = h[torch.tensor(rr, device=h.device), torch.tensor(pos, device=h.device)]
        logp = F.log_softmax(head(norm(h)).float(), dim=-1).to(device)   # the loss on the inputs' device
        return logp, torch.tensor(rr), torch.tensor(lab), torch.stack([seen_out[m] for m in range(len(modules))], 1)

    # Initial pass (δ = 0): original outputs v0 at the bare prompt, initial KL distributions.
    v0 = torch.zeros(n, len(modules), 0)
    kl_init: dict[int, torch.Tensor] = {}
    first_row = {}
    for j, r in enumerate(rows):
        if r.kind == "rewrite" and r.request not in first_row:
            first_row[r.request] = j
    with torch.no_grad():
        for start, chunk in _chunks(rows, opts.batch_tokens):
            logp, rr, lab, v = forward(chunk, None, range(start, start + len(chunk)))
            if v0.shape[-1] == 0:
                v0 = torch.zeros(n, len(modules), v.shape[-1])
            for j, r in enumerate(chunk):
                if first_row.get(r.request) == start + j:
                    v0[r.request] = v[j].float().cpu()
            for m in range(len(rr)):
                if lab[m] < 0:
                    kl_init[start + int(rr[m])] = logp[m].detach()
    v0 = v0.to(device)
    v0_norm = v0.norm(dim=-1).clamp_min(1e-8)                        # (n, M)
    clamp_ref = None
    if opts.clamp_norm_ref is not None:
        if len(opts.clamp_norm_ref) != len(modules):
            raise ValueError(f"clamp_norm_ref: one norm per module ({len(modules)}), got {len(opts.clamp_norm_ref)}")
        clamp_ref = torch.tensor(opts.clamp_norm_ref, dtype=v0_norm.dtype, device=device).expand_as(v0_norm)

    torch.manual_seed(seed)
    delta = torch.zeros(n, len(modules), v0.shape[-1], device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=opts.lr)
    active = torch.ones(n, dtype=torch.bool)
    steps_used = [0] * n
    last_loss = [float("nan")] * n
    last_nll = [float("nan")] * n
    for it in range(opts.steps):
        update = it < opts.steps - 1
        idx = [j for j, r in enumerate(rows) if active[r.request]]
        if not idx:
            break
        nll = torch.zeros(n)
        kl = torch.zeros(n)
        opt.zero_grad(set_to_none=False)
        with torch.set_grad_enabled(update):
            for chunk, chunk_ids in _step_chunks(rows, idx, opts, by_length=not align_right):
                logp, rr, lab, _ = forward(chunk, delta, chunk_ids)
                owner = torch.tensor([chunk[int(j)].request for j in rr])
                is_tok = lab >= 0
                # NLL terms: -log p(token) / (tokens in its row · rewrite rows of its request)
                ntok = torch.tensor([chunk[int(j)].target_end - chunk[int(j)].target_start for j in rr])
                w_tok = (1.0 / (ntok * n_rewrite[owner])).to(device)
                tok_lp = logp[is_tok.to(device), lab[is_tok].to(device)] if is_tok.any() else logp.new_zeros(0)
                nll_terms = -tok_lp * w_tok[is_tok.to(device)]
                # KL terms: KL(P_δ ‖ P_0) at the fact token of each KL row / KL rows of its request
                kl_pos = (~is_tok).nonzero().flatten()
                if len(kl_pos):
                    init = torch.stack([kl_init[chunk_ids[int(rr[m])]] for m in kl_pos])
                    new = logp[kl_pos.to(device)]
                    kl_terms = (new.exp() * (new - init)).sum(-1) * opts.kl_factor / n_kl[owner[kl_pos]].to(device)
                else:
                    kl_terms = logp.new_zeros(0)
                nll.index_add_(0, owner[is_tok], nll_terms.detach().cpu().float())
                kl.index_add_(0, owner[kl_pos], kl_terms.detach().cpu().float())
                if update:
                    (nll_terms.sum() + kl_terms.sum()).backward()
        wd = (opts.weight_decay * delta.norm(dim=-1) / v0_norm ** 2).sum(1)
        if update:
            wd[active.to(device)].sum().backward()
        total = nll + kl + wd.detach().cpu()
        for i in range(n):
            if active[i]:
                last_loss[i], last_nll[i] = float(total[i]), float(nll[i])
        done = active & ((total if opts.early_stop_on == "total" else nll) < opts.early_stop_loss)
        if not update:
            break
        keep = (~active | done).to(device)
        with torch.no_grad():
            frozen = delta.detach().clone()
            delta.grad[keep] = 0
        opt.step()
        with torch.no_grad():
            delta[keep] = frozen[keep]
            limit = opts.clamp_norm_factor * (v0_norm if clamp_ref is None else clamp_ref)
            scale = (limit / delta.norm(dim=-1).clamp_min(1e-12)).clamp(max=1.0)
            delta.mul_(scale[..., None])
        for i in range(n):
            if active[i] and not done[i]:
                steps_used[i] += 1
        active &= ~done
    delta, v0 = delta.detach().float(), v0.float()
    if single:
        delta, v0 = delta[:, 0], v0[:, 0]
    return Targets(delta, v0, steps_used, last_loss, last_nll)
