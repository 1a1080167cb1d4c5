"""SERAC: Semi-parametric editing with a retrieval-augmented counterfactual model
(Mitchell et al., ICML 2022).

The base model's weights never change.  Edits go into an **edit memory**; a **scope
classifier** decides whether an input falls in the scope of a stored edit; if it does,
a **counterfactual model** answers, reading the edit before the input; if not, the base
model answers, untouched.

**Scope classifier** (the original's embedding classifier, ``cross_attend: false``,
squared Euclidean distance, scale 1): an input x and an edit e are embedded by the same
encoder g, and

    log s(x, e) = −‖g(x) − g(e)‖²,      s ∈ (0, 1],

x is in the scope of e* = argmax_e s(x, e) when s(x, e*) > 0.5.  The original's encoder
is a separately fine-tuned DistilBERT; kedit's reads the **base model's own hidden
states** -- the residual stream leaving block ``cls_layer``, averaged over the input's
tokens so far, normalised (layer norm without parameters) -- through a trained MLP
(d -> ``cls_hidden`` -> ``cls_dim``), so no second tokenizer or network is needed.  The
edit is embedded from its prompt (without its target, as the original does for
decoder-only models); a query at position t from its tokens up to t (causal), so in
teacher-forced scoring the first target token is decided by the prompt alone.

**Counterfactual model**: the original trains a separate copy of a (smaller) model on
"edit + query" inputs.  kedit's counterfactual model is the base model itself (same
tokenizer, same weights) plus a trained low-rank change ΔW = B A of the MLP output
projections (rank ``cntr_rank``, B = 0 at the start, so the untrained counterfactual
model is the base model doing in-context editing); ``cntr_rank: 0`` keeps it frozen, the
original's ``freeze_cntr: true``.  Its input is the edit written out, then the query:
``"{edit prompt} {target}{separator}{query}"``.  A routed position takes the
counterfactual model's final hidden state at the same token (so the same output head).

**Training** (the original's supervised trainer, ``SupervisedTrainer``): a batch of
edits e_i with a rephrasing r_i (a positive: in scope of e_i) and an unrelated prompt
u_i (a negative: out of scope of e_i):

    L = c_edit · NLL(y_i | e_i ⊕ r_i; counterfactual model)                (mean over i)
      + c_loc · [ −mean_i log s(r_i, e_i) − mean_i log(1 − s(u_i, e_i)) ]   (balanced BCE)

with Adam; ``c_edit`` 0.1 and ``c_loc`` 1.0 as the original's ``cedit``/``cloc``.

**The edit** is a :class:`~kedit.methods.edit.ModuleEdit`: a :class:`SeracWrapper` around
the model's transformer body (the module holding the blocks), holding the memory (the
token ids of every edit's context and its embedding) and the trained classifier and
counterfactual change.  Edits accumulate: an edit's wrapper state holds the whole
memory so far (cumulative).  Everything the model computes through its body -- scoring,
padded batches, ``generate()`` with its key/value cache -- is routed: positions out of
scope keep the base model's output bit for bit; a routed row of a cached generation is
recomputed by the counterfactual model from its whole history at each step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from kedit.config import ConfigError
from kedit.methods.base import EditRequest, Method, ModuleEdit
from kedit.methods.core.keys import pad_id
from kedit.methods.edit import EditError, EditWrapper, WrapperSpec
from kedit.methods.learned.trainer import LearnCase, editor_path, resolve_editor
from kedit.methods.registry import register
from kedit.models.cache import cache_of, is_fresh
from kedit.models.hooks import record, run_until_stopped
from kedit.models.tokens import encode_prompt_target, pad_batch


@dataclass(frozen=True)
class SeracParams:
    # --- the editor (fixed when trained; an edit uses the trained editor's own values)
    cls_layer: int | None = None          # residual stream leaving this block (None: the middle one)
    cls_hidden: int = 512
    cls_dim: int = 128
    cntr_rank: int = 8                    # 0: a frozen counterfactual model (the original's freeze_cntr)
    cntr_layers: tuple[int, ...] | None = None   # MLP output projections with the low-rank change (None: all)
    separator: str = "\n"
    threshold: float = 0.5
    # --- training (kedit train serac)
    lr: float = 1e-4
    cntr_lr: float = 1e-4
    c_edit: float = 0.1
    c_loc: float = 1.0
    batch_size: int = 10
    grad_clip: float = 100.0
    steps: int = 1000
    val_every: int = 100
    val_cases: int = 100
    patience: int = 5
    log_every: int = 10
    early_stop_on: Literal["edit_success", "rephrase", "rewrite", "score"] = "edit_success"
    max_train: int | None = None
    # --- editing
    editor: str | None = None             # run dir / editor file; None: newest for this model; "untrained"

    def check(self) -> str | None:
        for k in ("cls_hidden", "cls_dim", "batch_size", "steps", "val_every", "val_cases", "patience", "log_every"):
            if getattr(self, k) < 1:
                return f"key '{k}': must be >= 1"
        if self.cntr_rank < 0:
            return "key 'cntr_rank': must be >= 0"
        if not 0 < self.threshold < 1:
            return "key 'threshold': must be in (0, 1)"
        for k in ("lr", "cntr_lr", "grad_clip"):
            if getattr(self, k) <= 0:
                return f"key '{k}': must be > 0"
        return None


# ============================================================================ pieces


def body_path(adapter) -> str:
    """The module holding the blocks (and the final norm): what the wrapper goes around."""
    return adapter.spec.layers.rpartition(".")[0]


class ScopeClassifier(nn.Module):
    """g: pooled hidden state (d) -> layer norm -> MLP -> embedding (cls_dim)."""

    def __init__(self, d: int, hidden: int, out: int, generator: torch.Generator):
        super().__init__()
        self.l1 = nn.Linear(d, hidden)
        self.l2 = nn.Linear(hidden, out)
        with torch.no_grad():
            for lin in (self.l1, self.l2):
                bound = 1 / math.sqrt(lin.in_features)
                lin.weight.uniform_(-bound, bound, generator=generator)
                lin.bias.zero_()

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        z = F.layer_norm(pooled.float(), pooled.shape[-1:])
        return self.l2(torch.relu(self.l1(z)))


def log_sim(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """−‖q − k‖², broadcast over leading dimensions (..., dim)."""
    return -((q - k) ** 2).sum(-1)


@dataclass(frozen=True)
class CntrSite:
    param: str          # full parameter name
    rel: str            # the name relative to the body
    layer: int
    d_in: int
    d_out: int


def cntr_sites(loaded, layers: Sequence[int] | None) -> list[CntrSite]:
    adapter = loaded.adapter
    prefix = body_path(adapter) + "."
    layers = list(layers) if layers is not None else list(range(adapter.n_layers))
    out = []
    for layer in layers:
        adapter.check_layer(layer)
        w = adapter.weight_out_in(layer)
        name = adapter.mlp_out_param(layer)
        out.append(CntrSite(name, name.removeprefix(prefix), layer, int(w.shape[1]), int(w.shape[0])))
    return out


class Counterfactual(nn.Module):
    """The low-rank change ΔW = B A of each site (B = 0 at the start)."""

    def __init__(self, sites: Sequence[CntrSite], rank: int, generator: torch.Generator):
        super().__init__()
        self.rank = rank
        self.a = nn.ParameterList([nn.Parameter(torch.randn(rank, s.d_in, generator=generator) / math.sqrt(s.d_in))
                                   for s in sites])
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(s.d_out, rank)) for s in sites])


def merged_weights(base: nn.Module, sites: Sequence[CntrSite], a: Sequence[torch.Tensor], b: Sequence[torch.Tensor],
                   layout: str, relative: bool) -> dict[str, torch.Tensor]:
    """Site parameter -> W + B A in the parameter's layout (for ``functional_call``)."""
    out = {}
    for s, ai, bi in zip(sites, a, b):
        name = s.rel if relative else s.param
        w = base.get_parameter(name)
        d = bi @ ai                                   # (out, in)
        d = d.T if layout == "in_out" else d
        out[name] = w + d.to(w.dtype)
    return out


@torch.no_grad()
def pooled_features(loaded, layer: int, texts: Sequence[str]) -> torch.Tensor:
    """Mean over each text's tokens of the residual stream leaving block ``layer``: (n, d)."""
    tok = loaded.tokenizer
    seqs = [tuple(int(t) for t in tok(t)["input_ids"]) for t in texts]
    ids, mask = pad_batch(seqs, pad_id(tok), side="right")
    ids, mask = ids.to(loaded.device), mask.to(loaded.device)
    block = loaded.adapter.block(layer)
    with record({"f": block}, inputs=False, stop_after=block) as seen:
        run_until_stopped(lambda: loaded.model(input_ids=ids, attention_mask=mask, use_cache=False))
    m = mask.float()[..., None]
    return (seen["f"].float() * m).sum(1) / m.sum(1)


def context_text(prompt: str, target: str, separator: str) -> str:
    return f"{prompt} {target.strip()}{separator}"


# ============================================================================ the wrapper


class SeracWrapper(EditWrapper):
    """The model's body, routed: in-scope positions take the counterfactual model's state.

    State (tensors): ``ctx_ids`` (M, L) and ``ctx_len`` (M,) -- each edit's context
    tokens; ``keys`` (M, cls_dim) -- each edit's embedding; ``cls.*`` -- the classifier;
    ``cntr.a.<i>`` / ``cntr.b.<i>`` -- the counterfactual change.  Config: ``cls_layer``,
    ``blocks`` (the blocks' path inside the body), ``sites`` (relative parameter names),
    ``layout``, ``threshold``, ``cls`` sizes, ``rank``.
    """

    kind = "memory"

    def __init__(self, base: nn.Module, config: dict[str, Any]):
        super().__init__(base, config)
        self._build()
        self._hist: list[list[int]] = []
        self._sum: torch.Tensor | None = None
        self._cnt: torch.Tensor | None = None

    def _build(self) -> None:
        c = self.config_dict
        p = next(self.base.parameters())
        g = torch.Generator().manual_seed(0)
        self.cls = ScopeClassifier(c["d"], c["cls_hidden"], c["cls_dim"], g).to(p.device)
        self.sites = [CntrSite(**s) for s in c["sites"]]
        self.cntr = Counterfactual(self.sites, c["rank"], g).to(p.device) if c["rank"] > 0 else None
        self.requires_grad_(False)
        self.ctx_ids = torch.zeros(0, 1, dtype=torch.long)
        self.ctx_len = torch.zeros(0, dtype=torch.long)
        self.keys = torch.zeros(0, c["cls_dim"])

    def set_config(self, config: dict[str, Any]) -> None:
        if config != self.config_dict:
            self.config_dict = dict(config)
            self._build()

    def wrapper_state(self) -> dict[str, torch.Tensor]:
        out = {"ctx_ids": self.ctx_ids, "ctx_len": self.ctx_len, "keys": self.keys}
        out.update({f"cls.{k}": v for k, v in self.cls.state_dict().items()})
        if self.cntr is not None:
            out.update({f"cntr.{k}": v for k, v in self.cntr.state_dict().items()})
        return out

    def load_wrapper_state(self, tensors: dict[str, torch.Tensor]) -> None:
        dev = next(self.base.parameters()).device
        self.ctx_ids = tensors["ctx_ids"].to(dev)
        self.ctx_len = tensors["ctx_len"].to(dev)
        self.keys = tensors["keys"].to(dev)
        self.cls.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("cls.")})
        if self.cntr is not None:
            self.cntr.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("cntr.")})

    def _counterfactual(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.cntr is None:
            out = self.base(input_ids=ids, attention_mask=mask, use_cache=False)
        else:
            params = merged_weights(self.base, self.sites, list(self.cntr.a), list(self.cntr.b),
                                    self.config_dict["layout"], relative=True)
            out = functional_call(self.base, params, args=(), kwargs={"input_ids": ids, "attention_mask": mask,
                                                                      "use_cache": False})
        return out[0]

    def keep_rows(self, index: torch.Tensor) -> None:
        """The feature sums and token histories of the rows that go on."""
        if self._sum is None or self._cnt is None or not index.numel() or int(index.max()) >= self._sum.shape[0]:
            return                      # no state of this sequence (the wrapper routed nothing)
        index = index.to(self._sum.device)
        self._sum, self._cnt = self._sum[index], self._cnt[index]
        self._hist = [self._hist[i] for i in index.tolist()]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            kwargs["input_ids"], args = args[0], args[1:]
        ids = kwargs.get("input_ids")
        if ids is None or self.keys.shape[0] == 0:
            return self.base(*args, **kwargs)
        c = self.config_dict
        fresh = is_fresh(cache_of(kwargs))
        block = self.base.get_submodule(c["blocks"])[c["cls_layer"]]
        with record({"f": block}, inputs=False) as seen:
            out = self.base(*args, **kwargs)
        b, t = ids.shape
        mask = kwargs.get("attention_mask")
        cur = (mask[:, -t:] if mask is not None else torch.ones_like(ids)).to(ids.device)
        m = cur.float()
        f = seen["f"].float()
        if fresh or self._sum is None or self._sum.shape[0] != b:
            self._sum = torch.zeros(b, f.shape[-1], device=f.device)
            self._cnt = torch.zeros(b, device=f.device)
            self._hist = [[] for _ in range(b)]
        csum = self._sum[:, None] + torch.cumsum(f * m[..., None], 1)
        ccnt = self._cnt[:, None] + torch.cumsum(m, 1)
        before = [len(h) for h in self._hist]
        self._sum, self._cnt = csum[:, -1], ccnt[:, -1]
        for i in range(b):
            self._hist[i] += ids[i][cur[i].bool()].tolist()
        with torch.no_grad():
            emb = self.cls(csum / ccnt.clamp(min=1)[..., None])                 # (b, t, k)
            sims = log_sim(emb[:, :, None, :], self.keys[None, None].to(emb.device))   # (b, t, M)
            best, which = sims.max(-1)
            routed = (best > math.log(c["threshold"])) & cur.bool()
        if not bool(routed.any()):
            return out
        pairs = sorted({(int(i), int(which[i, j])) for i, j in routed.nonzero().tolist()})
        seqs = [tuple(self.ctx_ids[e, : int(self.ctx_len[e])].tolist()) + tuple(self._hist[i]) for i, e in pairs]
        cids, cmask = pad_batch(seqs, 0, side="right")
        with torch.no_grad():
            hc = self._counterfactual(cids.to(ids.device), cmask.to(ids.device))
        h = out[0].clone()
        for p, (i, e) in enumerate(pairs):
            real = cur[i].bool().nonzero()[:, 0]                                 # positions of this call's tokens
            start = int(self.ctx_len[e]) + before[i]
            for k, pos in enumerate(real.tolist()):
                if routed[i, pos] and int(which[i, pos]) == e:
                    h[i, pos] = hc[p, start + k].to(h.dtype)
        out.last_hidden_state = h
        return out


# ============================================================================ training


@dataclass(frozen=True)
class _Rows:
    ids: tuple[int, ...]
    start: int
    end: int


class SeracLearner:
    """What ``kedit train serac`` trains: the scope classifier and the counterfactual change."""

    method = "serac"

    def __init__(self, loaded, params: SeracParams, seed: int):
        self.loaded, self.params = loaded, params
        adapter = loaded.adapter
        self.cls_layer = params.cls_layer if params.cls_layer is not None else adapter.n_layers // 2
        try:
            adapter.check_layer(self.cls_layer)
            self.sites = cntr_sites(loaded, params.cntr_layers) if params.cntr_rank > 0 else []
        except ValueError as e:
            raise ConfigError(f"serac: {e}") from None
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Module()
        self.net.cls = ScopeClassifier(adapter.hidden_size, params.cls_hidden, params.cls_dim, g)
        if params.cntr_rank > 0:
            self.net.cntr = Counterfactual(self.sites, params.cntr_rank, g)
        self.net.to(loaded.device)

    def module(self) -> nn.Module:
        return self.net

    def param_groups(self) -> list[dict[str, Any]]:
        groups = [{"params": list(self.net.cls.parameters()), "lr": self.params.lr}]
        if self.params.cntr_rank > 0:
            groups.append({"params": list(self.net.cntr.parameters()), "lr": self.params.cntr_lr})
        return groups

    def wrapper_config(self) -> dict[str, Any]:
        p, adapter = self.params, self.loaded.adapter
        return {"d": adapter.hidden_size, "cls_layer": self.cls_layer, "cls_hidden": p.cls_hidden, "cls_dim": p.cls_dim,
                "rank": p.cntr_rank, "sites": [asdict(s) for s in self.sites],
                "blocks": adapter.spec.layers.rpartition(".")[2], "layout": adapter.spec.weight_layout,
                "threshold": p.threshold, "separator": p.separator}

    def editor_config(self) -> dict[str, Any]:
        return {"wrapper": self.wrapper_config(), "training": asdict(self.params)}

    # --- pieces
    def _features(self, texts: Sequence[str]) -> torch.Tensor:
        return pooled_features(self.loaded, self.cls_layer, texts)

    def _cntr_rows(self, cases: Sequence[LearnCase], queries: Sequence[str], targets: Sequence[str]) -> list[_Rows]:
        tok = self.loaded.tokenizer
        rows = []
        for c, q, y in zip(cases, queries, targets):
            pt = encode_prompt_target(tok, context_text(c.prompt, c.target, self.params.separator) + q, y)
            rows.append(_Rows(pt.input_ids, pt.target_start, pt.target_end))
        return rows

    def _forward(self, rows: Sequence[_Rows], counterfactual: bool) -> torch.Tensor:
        """Logits at the rows' target-predicting positions, concatenated in row order."""
        loaded = self.loaded
        ids, mask = pad_batch([r.ids for r in rows], pad_id(loaded.tokenizer), side="right")
        ids, mask = ids.to(loaded.device), mask.to(loaded.device)
        r_idx = torch.tensor([i for i, r in enumerate(rows) for _ in range(r.start, r.end)], device=ids.device)
        p_idx = torch.tensor([j - 1 for r in rows for j in range(r.start, r.end)], device=ids.device)
        if counterfactual and self.params.cntr_rank > 0:
            params = merged_weights(loaded.model, self.sites, list(self.net.cntr.a), list(self.net.cntr.b),
                                    loaded.adapter.spec.weight_layout, relative=False)
            logits = functional_call(loaded.model, params, args=(),
                                     kwargs={"input_ids": ids, "attention_mask": mask, "use_cache": False}).logits
        else:
            logits = loaded.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return logits[r_idx, p_idx].float()

    @staticmethod
    def _targets(rows: Sequence[_Rows], device) -> tuple[torch.Tensor, torch.Tensor]:
        r = torch.tensor([i for i, row in enumerate(rows) for _ in range(row.start, row.end)], device=device)
        t = torch.tensor([row.ids[j] for row in rows for j in range(row.start, row.end)], device=device)
        return r, t

    def _nll_rows(self, logits: torch.Tensor, rows: Sequence[_Rows]) -> torch.Tensor:
        r, t = self._targets(rows, logits.device)
        lp = torch.log_softmax(logits, -1).gather(-1, t[:, None])[:, 0]
        n = len(rows)
        return (torch.zeros(n, device=lp.device).index_add(0, r, -lp)
                / torch.zeros(n, device=lp.device).index_add(0, r, torch.ones_like(lp)))

    def _scope(self, cases: Sequence[LearnCase]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log s of (prompt, edit), (rephrasing, edit), (unrelated, edit), per case."""
        b = len(cases)
        f = self._features([c.prompt for c in cases] + [c.rephrase for c in cases] + [c.loc_prompt for c in cases])
        e = self.net.cls(f)
        keys = e[:b]
        return log_sim(e[:b], keys), log_sim(e[b:2 * b], keys), log_sim(e[2 * b:], keys)

    def train_loss(self, cases: Sequence[LearnCase]) -> tuple[torch.Tensor, dict[str, float]]:
        p = self.params
        _, pos, neg = self._scope(cases)
        l_cls = -pos.mean() - torch.log1p(-neg.exp().clamp(max=1 - 1e-6)).mean()
        loss = p.c_loc * l_cls
        info = {"loss_cls": float(l_cls.detach()), "cls_pos_acc": float((pos.detach() > math.log(p.threshold)).float().mean()),
                "cls_neg_acc": float((neg.detach() <= math.log(p.threshold)).float().mean())}
        if p.cntr_rank > 0:
            rows = self._cntr_rows(cases, [c.rephrase for c in cases], [c.target for c in cases])
            l_cntr = self._nll_rows(self._forward(rows, True), rows).mean()
            loss = loss + p.c_edit * l_cntr
            info["loss_cntr"] = float(l_cntr.detach())
        info["loss"] = float(loss.detach())
        return loss, info

    @torch.no_grad()
    def validate(self, cases: Sequence[LearnCase]) -> dict[str, float]:
        """Each case on its own (the memory holds its one edit): the scope decision at the
        query's last prompt token, then the counterfactual or the base model's answer."""
        p, tok = self.params, self.loaded.tokenizer
        thr = math.log(p.threshold)
        sums: dict[str, float] = {}
        for start in range(0, len(cases), p.batch_size):
            chunk = cases[start:start + p.batch_size]
            s_prompt, s_reph, s_loc = self._scope(chunk)
            out: dict[str, torch.Tensor] = {}
            for name, queries, targets, sims in (
                    ("rewrite", [c.prompt for c in chunk], [c.target for c in chunk], s_prompt),
                    ("rephrase", [c.rephrase for c in chunk], [c.target for c in chunk], s_reph),
                    ("locality", [c.loc_prompt for c in chunk], [c.loc_answer for c in chunk], s_loc)):
                plain = [_Rows(*_pt(tok, q, y)) for q, y in zip(queries, targets)]
                base_logits = self._forward(plain, False)
                cf_rows = self._cntr_rows(chunk, queries, targets)
                cf_logits = self._forward(cf_rows, True)
                r, t = self._targets(plain, base_logits.device)
                routed = (sims > thr)[r]
                post = torch.where(routed[:, None], cf_logits, base_logits)
                if name == "locality":
                    hit = (post.argmax(-1) == base_logits.argmax(-1)).float()
                else:
                    hit = (post.argmax(-1) == t).float()
                n = len(chunk)
                out[name] = (torch.zeros(n).index_add(0, r.cpu(), hit.cpu())
                             / torch.zeros(n).index_add(0, r.cpu(), torch.ones_like(hit.cpu())))
            out["cls_pos_acc"] = (s_reph > thr).float().cpu()
            out["cls_neg_acc"] = (s_loc <= thr).float().cpu()
            out["loss_cls"] = (-s_reph - torch.log1p(-s_loc.exp().clamp(max=1 - 1e-6))).cpu()
            rows = self._cntr_rows(chunk, [c.rephrase for c in chunk], [c.target for c in chunk])
            out["loss_cntr"] = self._nll_rows(self._forward(rows, True), rows).cpu()
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.sum())
        res = {k: v / len(cases) for k, v in sums.items()}
        res["edit_success"] = (res["rewrite"] + res["rephrase"]) / 2
        e, loc = res["edit_success"], res["locality"]
        res["score"] = 0.0 if e + loc == 0 else 2 * e * loc / (e + loc)
        res["loss"] = p.c_loc * res["loss_cls"] + (p.c_edit * res["loss_cntr"] if p.cntr_rank > 0 else 0.0)
        order = ("score", "edit_success", "rewrite", "rephrase", "locality", "cls_pos_acc", "cls_neg_acc", "loss",
                 "loss_cls", "loss_cntr")
        return {k: res[k] for k in order}


def _pt(tok, prompt: str, target: str) -> tuple[tuple[int, ...], int, int]:
    pt = encode_prompt_target(tok, prompt, target)
    return pt.input_ids, pt.target_start, pt.target_end


# ============================================================================ the method


@register
class SERAC(Method):
    name = "serac"
    kind = "memory"
    description = ("SERAC: an edit memory, a trained scope classifier and a counterfactual model; "
                   "the weights never change (kedit train serac)")
    Params = SeracParams
    batch_native = False

    def __init__(self, loaded, params, ctx=None):
        super().__init__(loaded, params, ctx)
        self._state: dict[str, torch.Tensor] | None = None
        self._config: dict[str, Any] = {}
        self._info: dict[str, Any] = {}

    @classmethod
    def learner(cls, loaded, params: SeracParams, seed: int) -> SeracLearner:
        return SeracLearner(loaded, params, seed)

    def check(self) -> None:
        """The trained editor exists, is one of this method's and was trained for this model;
        no layer the counterfactual change writes is offloaded by a device map."""
        if self.params.editor != "untrained":
            editor_path(self.name, self.params.editor, self.loaded)
        if self.params.cntr_rank > 0:
            layers = self.params.cntr_layers
            for layer in (layers if layers is not None else range(self.adapter.n_layers)):
                if 0 <= layer < self.adapter.n_layers and self.adapter.offloaded(layer):
                    raise ConfigError(f"'cntr_layers': layer {layer} is offloaded by the device map and cannot "
                                      "carry the counterfactual change: name the layers with 'cntr_layers' "
                                      "or put them on a device")

    def prepare(self) -> None:
        if self._state is not None:
            return
        p = self.params
        if p.editor == "untrained":
            learner = SeracLearner(self.loaded, p, self.ctx.seed)
            self._config = learner.wrapper_config()
            net = learner.net.state_dict()
            self._info = {"editor": "untrained", "seed": self.ctx.seed}
        else:
            tensors, meta = resolve_editor(self.name, p.editor, self.loaded)
            self._config = meta["config"]["wrapper"]
            try:
                expect = [asdict(s) for s in cntr_sites(self.loaded, [s["layer"] for s in self._config["sites"]])]
            except ValueError as e:
                raise ConfigError(f"editor {meta['file']}: {e}") from None
            if expect != self._config["sites"] or self._config["d"] != self.loaded.adapter.hidden_size:
                raise ConfigError(f"editor {meta['file']}: its counterfactual weights do not match this model's")
            net = tensors
            self._info = {"editor": meta["file"], "editor_step": meta["step"], "editor_scores": meta["scores"]}
            self.ctx.say(f"serac editor {meta['file']} (step {meta['step']})")
        self._state = {k: v.detach().cpu().clone() for k, v in net.items()}

    def compute(self, requests: Sequence[EditRequest]) -> ModuleEdit:
        self.prepare()
        loaded, cfg = self.loaded, self._config
        requests = list(requests)
        t0 = time.perf_counter()
        path = body_path(loaded.adapter)
        installed = loaded.model.get_submodule(path)
        if isinstance(installed, EditWrapper) and not isinstance(installed, SeracWrapper):
            raise EditError(f"module '{path}' holds a {type(installed).__name__}, not a SERAC memory")
        if isinstance(installed, SeracWrapper):
            if installed.wrapper_config() != cfg:
                raise EditError(f"the SERAC memory at '{path}' was built by another editor")
            old = {k: v.detach().cpu() for k, v in installed.wrapper_state().items()}
            ids_old = [tuple(old["ctx_ids"][i, : int(old["ctx_len"][i])].tolist()) for i in range(old["ctx_ids"].shape[0])]
            keys_old = old["keys"]
        else:
            ids_old, keys_old = [], torch.zeros(0, cfg["cls_dim"])
        tok = loaded.tokenizer
        new_ids = [tuple(int(t) for t in tok(context_text(r.prompt, r.target_new, cfg["separator"]))["input_ids"])
                   for r in requests]
        if requests:
            cls = ScopeClassifier(cfg["d"], cfg["cls_hidden"], cfg["cls_dim"], torch.Generator().manual_seed(0))
            cls.load_state_dict({k[4:]: v for k, v in self._state.items() if k.startswith("cls.")})
            cls.to(loaded.device)
            with torch.no_grad():
                keys_new = cls(pooled_features(loaded, cfg["cls_layer"], [r.prompt for r in requests])).cpu()
        else:
            keys_new = torch.zeros(0, cfg["cls_dim"])
        all_ids = ids_old + new_ids
        ctx_ids, _ = pad_batch(all_ids, 0, side="right")
        tensors = {"ctx_ids": ctx_ids, "ctx_len": torch.tensor([len(s) for s in all_ids], dtype=torch.long),
                   "keys": torch.cat([keys_old, keys_new]),
                   # copies: every edit owns its tensors (a run file holds many edits; no shared storage)
                   **{k: v.clone() for k, v in self._state.items() if k.startswith(("cls.", "cntr."))}}
        self.ctx.add_time("serac", time.perf_counter() - t0)
        cases = [{"case_id": r.case_id, "memory_size": len(all_ids)} for r in requests]
        return ModuleEdit({path: WrapperSpec(SeracWrapper, cfg, tensors)},
                          {"method": self.name, "cases": cases, **self._info})
