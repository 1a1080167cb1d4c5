"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al., ICLR 2022).

An editor network, trained beforehand (``kedit train mend``), turns the gradient of one
edit into a weight change.

**The gradient's factors.**  For an edited weight W (a linear map x -> W x, out x in) the
gradient of the edit loss L over a sequence is a sum of rank-one terms,
∇_W L = Σ_t δ_t x_tᵀ, with x_t the weight's input at token t and δ_t = ∂L/∂(W x_t) the
gradient at its output.  MEND never forms ∇_W L: it transforms the pairs (x_t, δ_t).
The edit loss is the mean negative log-likelihood of ``target_new``'s tokens after the
edit prompt (teacher forced); with several requests in one call, the sum of their losses.

**The editor** (one per weight *shape*, shared by the weights of that shape; each weight
is one *mode* of it).  The input z = [x̂; δ̂] stacks the two factors after normalisation,
x̂ = (x − μ_x)/(σ_x + 1e-7), δ̂ likewise, with means and standard deviations that are
running statistics over every token seen in training (frozen afterwards; before any
statistics exist there is no normalisation).  Then ``n_hidden + 1`` low-rank residual
layers, layer k:

    z ← z + ReLU(s_{k,m} ⊙ (U_k V_k z + b_k) + o_k,m)

(U_k: dim x r, V_k: r x dim, r = min(rank, dim); s, o: a scale and an offset per mode m;
U_k starts at zero, so the untrained editor is the identity), and the output splits
into (x̃, δ̃).  The edit of weight ℓ is

    ΔW_ℓ = −α_ℓ Σ_t δ̃_t x̃_tᵀ

with a learned step α_ℓ per weight (starting at ``edit_lr``).  The untrained editor
therefore takes one gradient-descent step of size ``edit_lr``: ΔW = −α ∇_W L.

**Training** (Mitchell et al. §3; the authors' ``EditTrainer``): for a training edit
(prompt p, target y, rephrasing p′, unrelated prompt u), the editor computes ΔW from the
gradient on (p, y), then the meta-loss of the edited model is

    L_meta = c_edit · NLL(y | p′; W + ΔW) + c_loc · KL(P_W(·|u) ‖ P_{W+ΔW}(·|u))

(the KL per position over every token of u followed by its answer, averaged); x and δ
are treated as data (no second-order terms); Adam on the editor (``lr``) and on the
steps α (``lr_lr``); ``batch_size`` edits per optimiser step, each applied on its own.

**Where EasyEdit differs, and what kedit does:**

* EasyEdit's trainer computes the post-edit edit loss on the *edit prompt itself*
  (``edit_inner``); the paper and the authors' code use the *rephrasing*
  (``edit_outer``).  ``edit_loss_on: rephrase`` (default) is the paper's,
  ``edit_loss_on: prompt`` EasyEdit's.
* The authors' code adds ``α · Σ x̃ δ̃ᵀ`` (a gradient *ascent* step while the editor is
  untrained; training flips it), and steps α with two Adam optimisers at once (``lr`` and
  ``lr_lr``).  kedit follows the paper: ΔW = −α Σ δ̃ x̃ᵀ, one Adam with two parameter
  groups.
* kedit applies an edit during training as what it is, a change of the weights, but
  computed in factored form: a hook adds −α (h X̃ᵀ) D̃ to the weight's output for input
  h, which equals h through W + ΔW; rows of a batch carry their own edit.  The blocks
  below the first edited layer run once per step (their residual stream is replayed,
  ``hooks.replay_from``); they do not depend on the edit.

**Defaults** (``configs/methods/mend/<model>.yaml``): the MLP projections (input and
output) of the last three layers, as the paper edits; ``rank`` 1920 and ``n_hidden`` 1,
``edit_lr`` 1e-4, ``lr`` 1e-6, ``lr_lr`` 1e-4, ``c_edit`` 0.1, ``c_loc`` 1.0, grad clip 100
are the authors' (``config/alg/mend.yaml``, ``config/config.yaml``).

An edit is a weight :class:`~kedit.methods.edit.Delta` of the edited weights.  Which
editor edits: ``editor`` names a training run directory or its ``editor.safetensors``;
unset, the newest editor trained for this model's fingerprint; ``untrained``, the
freshly initialised editor (the gradient step).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from kedit.config import ConfigError
from kedit.methods.base import Delta, EditRequest, Method
from kedit.methods.core.keys import pad_id
from kedit.methods.learned.trainer import LearnCase, editor_path, resolve_editor
from kedit.methods.registry import register
from kedit.models.hooks import frozen, record, replay_from, run_until_stopped
from kedit.models.tokens import encode_prompt_target, pad_batch


@dataclass(frozen=True)
class MendParams:
    # --- the editor (fixed when it is trained; an edit uses the trained editor's own values)
    layers: tuple[int, ...] | None = None     # None: the last three layers
    mlp_in: bool = True                       # also the MLP input projections (GPT-2 c_fc; LLaMA gate/up)
    rank: int = 1920
    n_hidden: int = 1
    edit_lr: float = 1e-4                     # initial α of every weight
    # --- training (kedit train mend)
    lr: float = 1e-6
    lr_lr: float = 1e-4
    c_edit: float = 0.1
    c_loc: float = 1.0
    edit_loss_on: Literal["rephrase", "prompt"] = "rephrase"
    batch_size: int = 10
    grad_clip: float = 100.0
    steps: int = 1000
    val_every: int = 100
    val_cases: int = 100
    patience: int = 5
    log_every: int = 10
    early_stop_on: Literal["edit_success", "rephrase", "rewrite", "score"] = "edit_success"   # score: harmonic
    #                                                                      mean of edit_success and locality
    max_train: int | None = None              # use only the first N training cases
    # --- editing
    editor: str | None = None                 # run dir / editor file; None: newest for this model; "untrained"

    def check(self) -> str | None:
        for k in ("rank", "batch_size", "steps", "val_every", "val_cases", "patience", "log_every"):
            if getattr(self, k) < 1:
                return f"key '{k}': must be >= 1"
        if self.n_hidden < 0:
            return "key 'n_hidden': must be >= 0"
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
            return "key 'layers': a non-empty list of distinct layers (or null for the last three)"
        for k in ("lr", "lr_lr", "grad_clip"):
            if getattr(self, k) <= 0:
                return f"key '{k}': must be > 0"
        if self.c_edit < 0 or self.c_loc < 0:
            return "keys 'c_edit', 'c_loc': must be >= 0"
        return None


# ============================================================================ edited weights


@dataclass(frozen=True)
class Site:
    """One edited weight: its parameter and module, its input and output widths, its
    shape class (``"<in>x<out>"``) and its mode (index within that class)."""

    param: str
    module: str
    layer: int
    d_in: int
    d_out: int
    shape: str
    mode: int


def edit_sites(loaded, layers: Sequence[int] | None, mlp_in: bool) -> list[Site]:
    adapter = loaded.adapter
    layers = list(layers) if layers is not None else list(range(max(0, adapter.n_layers - 3), adapter.n_layers))
    names = {id(m): n for n, m in loaded.model.named_modules()}
    sites: list[Site] = []
    modes: dict[str, int] = {}
    for layer in layers:
        adapter.check_layer(layer)
        mods = (list(adapter.mlp_in(layer)) if mlp_in else []) + [adapter.mlp_out(layer)]
        for m in mods:
            w = m.weight
            d_out, d_in = (w.shape[1], w.shape[0]) if adapter.spec.weight_layout == "in_out" else tuple(w.shape)
            shape = f"{d_in}x{d_out}"
            sites.append(Site(f"{names[id(m)]}.weight", names[id(m)], layer, int(d_in), int(d_out), shape,
                              modes.get(shape, 0)))
            modes[shape] = modes.get(shape, 0) + 1
    return sites


# ============================================================================ the editor network


class LowRankResidual(nn.Module):
    """z + ReLU(s_m ⊙ (U V z + b) + o_m), U = 0 at the start (the identity)."""

    def __init__(self, dim: int, rank: int, n_modes: int, generator: torch.Generator):
        super().__init__()
        r = min(rank, dim)
        self.u = nn.Parameter(torch.zeros(dim, r))
        self.v = nn.Parameter(torch.randn(r, dim, generator=generator))   # the authors' init: N(0, 1)
        self.bias = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_modes, dim))
        self.shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, z: torch.Tensor, mode: torch.Tensor) -> torch.Tensor:
        pre = (z @ self.v.T) @ self.u.T + self.bias
        pre = pre * self.scale[mode] + self.shift[mode]
        return z + pre.clamp(min=0)   # clamp, not relu: the gradient passes at 0, where U = 0 starts


class FactorNet(nn.Module):
    """The editor of one weight shape: normalisation (running statistics) and the layers."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_hidden: int, n_modes: int, generator: torch.Generator):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        dim = d_in + d_out
        self.layers = nn.ModuleList([LowRankResidual(dim, rank, n_modes, generator) for _ in range(n_hidden + 1)])
        # running statistics (float64): count, mean and sum of squared deviations of [x; δ]
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def _update(self, z: torch.Tensor) -> None:
        """Chan et al.'s merge of a batch into the running mean and squared deviations."""
        n_b = z.shape[0]
        if n_b == 0:
            return
        z = z.double()
        mean_b = z.mean(0)
        m2_b = ((z - mean_b) ** 2).sum(0)
        n = self.count
        total = n + n_b
        d = mean_b - self.mean
        self.mean.add_(d * (n_b / total))
        self.m2.add_(m2_b + d * d * (n * n_b / total))
        self.count.fill_(total)

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        if self.count < 2:
            return z
        std = (self.m2 / (self.count - 1)).sqrt()
        return ((z.double() - self.mean) / (std + 1e-7)).to(z.dtype)

    def forward(self, x: torch.Tensor, d: torch.Tensor, mode: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.cat([x.float(), d.float()], -1)
        if self.training:
            self._update(z)
        z = self.normalise(z)
        for layer in self.layers:
            z = layer(z, mode)
        return z[:, : self.d_in], z[:, self.d_in:]


class MendEditor(nn.Module):
    """The editor of every site: one :class:`FactorNet` per shape, one step α per site."""

    def __init__(self, sites: Sequence[Site], rank: int, n_hidden: int, edit_lr: float, seed: int):
        super().__init__()
        self.sites = list(sites)
        g = torch.Generator().manual_seed(seed)
        shapes: dict[str, list[Site]] = {}
        for s in self.sites:
            shapes.setdefault(s.shape, []).append(s)
        self.nets = nn.ModuleDict({k: FactorNet(v[0].d_in, v[0].d_out, rank, n_hidden, len(v), g)
                                   for k, v in shapes.items()})
        self.edit_lrs = nn.Parameter(torch.full((len(self.sites),), float(edit_lr)))

    def transform(self, x: Sequence[torch.Tensor], d: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per site: its factor rows ``(N_i, d_in)``, ``(N_i, d_out)`` -> transformed rows."""
        out: list[Any] = [None] * len(self.sites)
        for shape, net in self.nets.items():
            idx = [i for i, s in enumerate(self.sites) if s.shape == shape]
            xs = torch.cat([x[i] for i in idx])
            ds = torch.cat([d[i] for i in idx])
            mode = torch.cat([torch.full((x[i].shape[0],), self.sites[i].mode, dtype=torch.long) for i in idx])
            xt, dt = net(xs, ds, mode.to(xs.device))
            start = 0
            for i in idx:
                n = x[i].shape[0]
                out[i] = (xt[start:start + n], dt[start:start + n])
                start += n
        return out


# ============================================================================ tokens and factors


@dataclass(frozen=True)
class TRow:
    ids: tuple[int, ...]
    start: int      # target tokens: ids[start:end]
    end: int


def trow(tok, prompt: str, target: str) -> TRow:
    pt = encode_prompt_target(tok, prompt, target)
    if pt.target_start < 1:
        raise ValueError(f"empty prompt before target {target!r}")
    return TRow(pt.input_ids, pt.target_start, pt.target_end)


def target_terms(rows: Sequence[TRow], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, logit position, token) of every target token, as three tensors."""
    r, p, t = [], [], []
    for i, row in enumerate(rows):
        for j in range(row.start, row.end):
            r.append(i)
            p.append(j - 1)
            t.append(row.ids[j])
    return (torch.tensor(r, device=device), torch.tensor(p, device=device), torch.tensor(t, device=device))


def row_nll(logits_at: torch.Tensor, terms, n_rows: int) -> torch.Tensor:
    """Mean NLL of each row's target tokens, from the logits at those positions."""
    r, _, t = terms
    logp = torch.log_softmax(logits_at.float(), -1).gather(-1, t[:, None])[:, 0]
    total = torch.zeros(n_rows, device=logp.device).index_add(0, r, -logp)
    count = torch.zeros(n_rows, device=logp.device).index_add(0, r, torch.ones_like(logp))
    return total / count


@contextlib.contextmanager
def capture_factors(modules: Sequence[nn.Module]) -> Iterator[tuple[list, list]]:
    """Record each module's input (detached) and output (made to require grad, so that
    ∂L/∂output can be asked for); the forward is otherwise unchanged."""
    xs: list[Any] = [None] * len(modules)
    outs: list[Any] = [None] * len(modules)
    handles = []
    for i, m in enumerate(modules):
        def hook(_m, args, out, i=i):
            xs[i] = args[0].detach()
            if not out.requires_grad:
                out = out.detach().requires_grad_(True)
            outs[i] = out
            return out
        handles.append(m.register_forward_hook(hook))
    try:
        yield xs, outs
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def factored_update(modules: Sequence[nn.Module], alphas: torch.Tensor, xt: Sequence[torch.Tensor],
                    dt: Sequence[torch.Tensor], owner: torch.Tensor) -> Iterator[None]:
    """Each module's output plus −α_i (h X̃ᵀ) D̃ for row r, with X̃, D̃ the factors of
    the edit ``owner[r]`` (``xt[i]``: ``(edits, S, d_in)``, zero-padded): the forward of
    ``W + ΔW`` with every row carrying its own edit."""
    handles = []
    for i, m in enumerate(modules):
        def hook(_m, args, out, i=i):
            h = args[0]
            x = xt[i][owner]          # (R, S, d_in)
            d = dt[i][owner]          # (R, S, d_out)
            add = torch.bmm(torch.bmm(h.float(), x.transpose(1, 2)), d)
            return out + (-alphas[i] * add).to(out.dtype)
        handles.append(m.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _last_block_output(loaded, ids, mask, extra: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """Run the model, return the last block's output (the head is applied by the caller,
    only where needed)."""
    last = loaded.adapter.block(loaded.adapter.n_layers - 1)
    with contextlib.ExitStack() as stack:
        if extra is not None:
            stack.enter_context(extra)
        seen = stack.enter_context(record({"h": last}, inputs=False, stop_after=last, detach=False))
        run_until_stopped(lambda: loaded.model(input_ids=ids, attention_mask=mask, use_cache=False))
    return seen["h"]


def head(loaded, h: torch.Tensor) -> torch.Tensor:
    return loaded.adapter.lm_head()(loaded.adapter.final_norm()(h))


def gradient_factors(loaded, modules: Sequence[nn.Module], rows: Sequence[TRow], ids: torch.Tensor,
                     mask: torch.Tensor, replay: contextlib.AbstractContextManager | None = None):
    """The edit loss's gradient factors at every site: per site (x, δ, row of each token),
    only the tokens of real (non-pad) positions with non-zero x and δ; and each row's
    edit loss before the edit."""
    terms = target_terms(rows, ids.device)
    with capture_factors(modules) as (xs, outs):
        h = _last_block_output(loaded, ids, mask, replay)
    nll = row_nll(head(loaded, h[terms[0], terms[1]]), terms, len(rows))
    deltas = torch.autograd.grad(nll.sum(), outs)
    out = []
    for x, d in zip(xs, deltas):
        keep = mask.bool() & (d != 0).any(-1) & (x != 0).any(-1)
        rows_of = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(keep)[keep]
        out.append((x[keep].float(), d[keep].float(), rows_of))
    return out, nll.detach()


def padded_by_owner(t: torch.Tensor, owner: torch.Tensor, n_owners: int) -> torch.Tensor:
    """Rows ``t`` (owner-sorted) -> ``(n_owners, S, dim)``, zero-padded (differentiable)."""
    counts = torch.bincount(owner, minlength=n_owners)
    s = int(counts.max()) if owner.numel() else 1
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(owner.shape[0], device=owner.device) - starts[owner]
    out = torch.zeros(n_owners, max(s, 1), t.shape[-1], dtype=t.dtype, device=t.device)
    return out.index_put((owner, pos), t)


def _pad(loaded, rows: Sequence[TRow]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pad_batch([r.ids for r in rows], pad_id(loaded.tokenizer), side="right")
    return ids.to(loaded.device), mask.to(loaded.device)


class LowerPass:
    """The blocks below the first edited layer, run once (no gradient) for every distinct
    row of a batch: the residual stream entering that block per row, a block output's
    structure (for ``replay_from``) and, for ``last_for`` rows, the last block's output
    (the pre-edit distribution).  Rows go in length-sorted chunks, so little is padding."""

    def __init__(self, loaded, layer: int, rows: Sequence[TRow], last_for: Sequence[TRow], budget: int = 4096):
        adapter = loaded.adapter
        self.loaded = loaded
        self.blocks = [adapter.block(i) for i in range(layer + 1)]
        self.resid: dict[tuple[int, ...], torch.Tensor] = {}
        last_ids = [r.ids for r in last_for]
        structure: list = []
        hook = self.blocks[-1].register_forward_hook(lambda _m, _a, out: structure.append(out) if not structure else None)
        try:
            for full, group in ((False, [r.ids for r in rows if r.ids not in set(last_ids)]), (True, last_ids)):
                got = self._run(sorted(set(group), key=len), full, budget)
                self.resid.update({k: v[0] for k, v in got.items()})
                if full:
                    self.last = [got[k][1] for k in last_ids]
        finally:
            hook.remove()
        self.structure = structure[0]

    @torch.no_grad()
    def _run(self, seqs: list[tuple[int, ...]], full: bool, budget: int) -> dict:
        out: dict = {}
        start = 0
        while start < len(seqs):
            end = start + 1
            while end < len(seqs) and len(seqs[end]) * (end - start + 1) <= budget:
                end += 1
            chunk = seqs[start:end]
            ids, mask = pad_batch(chunk, pad_id(self.loaded.tokenizer), side="right")
            ids, mask = ids.to(self.loaded.device), mask.to(self.loaded.device)
            stop = self.loaded.adapter.block(self.loaded.adapter.n_layers - 1) if full else self.blocks[-1]
            with record({"r": self.blocks[-1]}, inputs=True) as res, \
                    record({"h": stop}, inputs=False, stop_after=stop) as seen:
                run_until_stopped(lambda: self.loaded.model(input_ids=ids, attention_mask=mask, use_cache=False))
            for j, seq in enumerate(chunk):
                out[seq] = (res["r"][j, :len(seq)], seen["h"][j, :len(seq)] if full else None)
            start = end
        return out

    def replay(self, rows: Sequence[TRow], length: int) -> contextlib.AbstractContextManager:
        """Replay from the first edited block for ``rows`` padded to ``length``."""
        first = self.resid[rows[0].ids]
        h = torch.zeros(len(rows), length, first.shape[-1], dtype=first.dtype, device=first.device)
        for i, r in enumerate(rows):
            h[i, :len(r.ids)] = self.resid[r.ids]
        return replay_from(self.blocks, lambda: h, self.structure)


# ============================================================================ training


class MendLearner:
    """What ``kedit train mend`` trains: the editor, the meta-loss, the validation."""

    method = "mend"

    def __init__(self, loaded, params: MendParams, seed: int):
        self.loaded, self.params = loaded, params
        self.sites = edit_sites(loaded, params.layers, params.mlp_in)
        self.editor = MendEditor(self.sites, params.rank, params.n_hidden, params.edit_lr, seed).to(loaded.device)
        named = dict(loaded.model.named_modules())
        self.modules = [named[s.module] for s in self.sites]
        self.first_layer = min(s.layer for s in self.sites)

    def module(self) -> nn.Module:
        return self.editor

    def param_groups(self) -> list[dict[str, Any]]:
        nets = [p for n, p in self.editor.named_parameters() if n != "edit_lrs"]
        return [{"params": nets, "lr": self.params.lr}, {"params": [self.editor.edit_lrs], "lr": self.params.lr_lr}]

    def editor_config(self) -> dict[str, Any]:
        p = self.params
        return {"layers": sorted({s.layer for s in self.sites}), "mlp_in": p.mlp_in, "rank": p.rank,
                "n_hidden": p.n_hidden, "edit_lr": p.edit_lr, "edit_loss_on": p.edit_loss_on,
                "sites": [asdict(s) for s in self.sites], "training": asdict(p)}

    def _edit_and_score(self, cases: Sequence[LearnCase], evaluate: bool) -> dict[str, Any]:
        """One batch: edit each case from its own gradient, then the post-edit forward of the
        rows that score it -- training: the loss rows (rephrasing or prompt) and the locality
        rows; validation: the prompt, the rephrasing and the locality rows."""
        loaded, device, tok = self.loaded, self.loaded.device, self.loaded.tokenizer
        b = len(cases)
        rows = {"edit": [trow(tok, c.prompt, c.target) for c in cases],
                "reph": [trow(tok, c.rephrase, c.target) for c in cases],
                "loc": [trow(tok, c.loc_prompt, c.loc_answer) for c in cases]}
        post_key = "reph" if self.params.edit_loss_on == "rephrase" else "edit"
        scored = ["edit", "reph", "loc"] if evaluate else [post_key, "loc"]
        lower = LowerPass(loaded, self.first_layer, [r for k in dict.fromkeys(["edit", *scored]) for r in rows[k]],
                          last_for=rows["loc"])
        # the gradient factors of the edit rows, then the editor
        ids, mask = _pad(loaded, rows["edit"])
        with torch.enable_grad():
            factors, pre_nll = gradient_factors(loaded, self.modules, rows["edit"], ids, mask,
                                                lower.replay(rows["edit"], ids.shape[1]))
        transformed = self.editor.transform([f[0] for f in factors], [f[1] for f in factors])
        xt = [padded_by_owner(t[0], f[2], b) for t, f in zip(transformed, factors)]
        dt = [padded_by_owner(t[1], f[2], b) for t, f in zip(transformed, factors)]
        # the edited model on the scoring rows, each row with its own case's edit
        post_rows = [r for k in scored for r in rows[k]]
        ids, mask = _pad(loaded, post_rows)
        owner = torch.arange(b, device=device).repeat(len(scored))
        with factored_update(self.modules, self.editor.edit_lrs, xt, dt, owner):
            h_post = _last_block_output(loaded, ids, mask, lower.replay(post_rows, ids.shape[1]))
        h = {k: h_post[i * b:(i + 1) * b] for i, k in enumerate(scored)}
        terms = target_terms(rows[post_key], device)
        l_edit_rows = row_nll(head(loaded, h[post_key][terms[0], terms[1]]), terms, b)
        # locality: KL(pre ‖ post) at every real position of the locality rows, mean per row
        loc_mask = mask[scored.index("loc") * b:(scored.index("loc") + 1) * b].bool()
        with torch.no_grad():
            pre_logp = torch.log_softmax(head(loaded, torch.cat(lower.last)).float(), -1)
        post_logits = head(loaded, h["loc"][loc_mask]).float()
        kl_tok = (pre_logp.exp() * (pre_logp - torch.log_softmax(post_logits, -1))).sum(-1)
        loc_owner = torch.arange(b, device=device)[:, None].expand_as(loc_mask)[loc_mask]
        kl_rows = (torch.zeros(b, device=device).index_add(0, loc_owner, kl_tok)
                   / torch.bincount(loc_owner, minlength=b).clamp(min=1))
        return {"l_edit_rows": l_edit_rows, "kl_rows": kl_rows, "pre_nll": pre_nll, "h": h, "rows": rows,
                "pre_loc_argmax": pre_logp.argmax(-1), "post_loc_argmax": post_logits.argmax(-1), "loc_mask": loc_mask}

    def train_loss(self, cases: Sequence[LearnCase]) -> tuple[torch.Tensor, dict[str, float]]:
        p = self.params
        with frozen(self.loaded.model):
            r = self._edit_and_score(cases, evaluate=False)
        l_edit, l_loc = r["l_edit_rows"].mean(), r["kl_rows"].mean()
        loss = p.c_edit * l_edit + p.c_loc * l_loc
        return loss, {"loss": float(loss.detach()), "loss_edit": float(l_edit.detach()), "loss_loc": float(l_loc.detach()),
                      "nll_before": float(r["pre_nll"].mean()),
                      "alpha_mean": float(self.editor.edit_lrs.detach().mean())}

    @torch.no_grad()
    def validate(self, cases: Sequence[LearnCase]) -> dict[str, float]:
        p, bs = self.params, self.params.batch_size
        sums: dict[str, float] = {}
        for start in range(0, len(cases), bs):
            chunk = cases[start:start + bs]
            with frozen(self.loaded.model):
                r = self._edit_and_score(chunk, evaluate=True)
            scores = {"rewrite": _token_acc(self.loaded, r["h"]["edit"], r["rows"]["edit"]),
                      "rephrase": _token_acc(self.loaded, r["h"]["reph"], r["rows"]["reph"]),
                      "locality": _loc_agreement(r, r["rows"]["loc"], len(chunk)),
                      "loss_edit": r["l_edit_rows"], "loss_loc": r["kl_rows"], "nll_before": r["pre_nll"]}
            scores["loss"] = p.c_edit * scores["loss_edit"] + p.c_loc * scores["loss_loc"]
            for k, v in scores.items():
                sums[k] = sums.get(k, 0.0) + float(v.sum())
        out = {k: v / len(cases) for k, v in sums.items()}
        out["edit_success"] = (out["rewrite"] + out["rephrase"]) / 2
        e, loc = out["edit_success"], out["locality"]
        out["score"] = 0.0 if e + loc == 0 else 2 * e * loc / (e + loc)
        return {k: out[k] for k in ("edit_success", "rewrite", "rephrase", "locality", "score", "loss", "loss_edit",
                                     "loss_loc", "nll_before")}


def _token_acc(loaded, h: torch.Tensor, rows: Sequence[TRow]) -> torch.Tensor:
    """Per row: the share of target tokens that are the argmax (teacher forced)."""
    terms = target_terms(rows, h.device)
    hit = (head(loaded, h[terms[0], terms[1]]).argmax(-1) == terms[2]).float()
    n = len(rows)
    return (torch.zeros(n, device=h.device).index_add(0, terms[0], hit)
            / torch.zeros(n, device=h.device).index_add(0, terms[0], torch.ones_like(hit)))


def _loc_agreement(r: dict, loc: Sequence[TRow], b: int) -> torch.Tensor:
    """Per row: the share of the locality answer's positions whose argmax the edit kept."""
    mask = r["loc_mask"]
    flat_row = torch.arange(b, device=mask.device)[:, None].expand_as(mask)[mask]
    flat_pos = torch.arange(mask.shape[1], device=mask.device)[None, :].expand_as(mask)[mask]
    same = (r["pre_loc_argmax"] == r["post_loc_argmax"]).float()
    starts = torch.tensor([row.start for row in loc], device=mask.device)
    ends = torch.tensor([row.end for row in loc], device=mask.device)
    sel = ((flat_pos >= starts[flat_row] - 1) & (flat_pos < ends[flat_row] - 1)).float()
    return (torch.zeros(b, device=mask.device).index_add(0, flat_row, same * sel)
            / torch.zeros(b, device=mask.device).index_add(0, flat_row, sel).clamp(min=1))


# ============================================================================ the method


@register
class MEND(Method):
    name = "mend"
    kind = "weights"
    description = "MEND: a trained editor network turns the edit's gradient into a weight change (kedit train mend)"
    Params = MendParams
    batch_native = False

    def __init__(self, loaded, params, ctx=None):
        super().__init__(loaded, params, ctx)
        self._editor: MendEditor | None = None
        self._info: dict[str, Any] = {}

    @classmethod
    def learner(cls, loaded, params: MendParams, seed: int) -> MendLearner:
        return MendLearner(loaded, params, seed)

    def check(self) -> None:
        """The trained editor exists, is one of this method's and was trained for this model."""
        if self.params.editor != "untrained":
            editor_path(self.name, self.params.editor, self.loaded)

    def prepare(self) -> None:
        if self._editor is not None:
            return
        p = self.params
        if p.editor == "untrained":
            learner = MendLearner(self.loaded, p, self.ctx.seed)
            self._editor, self._info = learner.editor, {"editor": "untrained", "seed": self.ctx.seed}
        else:
            tensors, meta = resolve_editor(self.name, p.editor, self.loaded)
            cfg = meta["config"]
            sites = edit_sites(self.loaded, cfg["layers"], cfg["mlp_in"])
            if [asdict(s) for s in sites] != cfg["sites"]:
                raise ConfigError(f"editor {meta['file']}: its edited weights do not match this model's")
            editor = MendEditor(sites, cfg["rank"], cfg["n_hidden"], cfg["edit_lr"], 0)
            editor.load_state_dict(tensors)
            self._editor = editor.to(self.loaded.device)
            self._info = {"editor": meta["file"], "editor_step": meta["step"],
                          "editor_scores": meta["scores"]}
            self.ctx.say(f"mend editor {meta['file']} (step {meta['step']}, validation edit success "
                         f"{meta['scores'].get('edit_success', float('nan')):.2f})")
        self._editor.train(False)
        self._editor.requires_grad_(False)

    def compute(self, requests: Sequence[EditRequest]) -> Delta:
        self.prepare()
        requests = list(requests)
        editor, loaded = self._editor, self.loaded
        if not requests:
            return Delta({}, {"method": self.name, "cases": []})
        t0 = time.perf_counter()
        rows = [trow(loaded.tokenizer, r.prompt, r.target_new) for r in requests]
        ids, mask = pad_batch([r.ids for r in rows], pad_id(loaded.tokenizer), side="right")
        ids, mask = ids.to(loaded.device), mask.to(loaded.device)
        named = dict(loaded.model.named_modules())
        modules = [named[s.module] for s in editor.sites]
        with frozen(loaded.model), torch.enable_grad():
            factors, pre_nll = gradient_factors(loaded, modules, rows, ids, mask)
        with torch.no_grad():
            transformed = editor.transform([f[0] for f in factors], [f[1] for f in factors])
            tensors = {}
            for i, (site, (xt, dt)) in enumerate(zip(editor.sites, transformed)):
                w = loaded.model.get_parameter(site.param)
                dw = -editor.edit_lrs[i] * (dt.T.double() @ xt.double())          # (out, in)
                tensors[site.param] = loaded.adapter.to_param_layout(dw).to(w.dtype)
        seconds = time.perf_counter() - t0
        self.ctx.add_time("mend", seconds)
        norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors.values())))
        cases = [{"case_id": r.case_id, "loss_start": float(pre_nll[i]), "delta_norm": norm}
                 for i, r in enumerate(requests)]
        return Delta(tensors, {"method": self.name, "cases": cases, "params": list(tensors), **self._info})
