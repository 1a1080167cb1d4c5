"""Fine-tuning baselines: FT-L and FT-M, one optimiser loop with two objectives.

Both tune the MLP output projection weights of ``layers`` (with ``mlp_in: true`` also the
MLP input projections: GPT-2 ``c_fc``, LLaMA ``gate_proj`` and ``up_proj``, ...; always
the weights only, never biases) on the edit prompts of the batch, with Adam, and
everything else frozen.

* **FT-L** (``ft_l``; the "FT+L" baseline of the ROME paper after Zhu et al. 2020,
  EasyEdit's FT with ``objective_optimization: prompt_last``): the loss of one request is
  −(1/m) Σⱼ log p(tⱼ | prompt), every target token tⱼ (j = 1..m) read from the *same*
  distribution, the one at the prompt's last token (not teacher-forced: for a one-token
  target it is that token's NLL; for longer ones it asks the next-token distribution to
  cover all target tokens, as the reference code does).
* **FT-M** (``ft_m``; EasyEdit's FT with ``objective_optimization: target_new``): the
  teacher-forced NLL of the target given the prompt, −(1/m) Σⱼ log p(tⱼ | prompt, t₍<ⱼ₎),
  i.e. the language-model loss on prompt + target with the prompt tokens masked out.

The batch loss is the mean over requests.  Prompt and target are tokenised together
(``tokens.encode_prompt_target``: one space between them, as the evaluation scores
them), rows right-padded, and one forward of prompt + target gives both objectives
(causal attention: the prompt's last position does not see the target).

**L∞ bound** (``norm_constraint``): after every Adam step each tuned weight is clamped
elementwise to ``[W₀ − ε, W₀ + ε]``, so ``max |ΔW| <= ε`` exactly (``null``: no bound).

**Early stop**: before each step the batch loss is computed; when it is below
``early_stop_loss`` (EasyEdit's 1e-2) no further step is taken.  ``steps`` is the number
of Adam steps taken.

The change is optimised as a separate float32 tensor ΔW per weight, the forward runs on
``W₀ + ΔW`` through ``torch.func.functional_call``, so the model's own parameters are
never written: the model is bit-identical on return (its ``requires_grad`` flags are
cleared during the loop and restored after).  Adam on ΔW is Adam on W (same gradients);
``weight_decay`` decays ΔW, i.e. pulls the weights towards W₀ (EasyEdit's Adam decays W
towards 0; its published FT configs use 0, where the two agree).

Requests of one ``compute`` call are fitted together.  ``batch_native`` is False: ``kedit
edit`` edits case by case from the original weights, as EasyEdit does for FT;
``kedit bench --batch-size B`` fits B cases together.

LoRA is not offered: a low-rank ΔW has no elementwise bound to enforce, and the full
ΔW of a few projections of a small model is cheap, so a ``peft`` dependency would buy
nothing here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch.func import functional_call

from kedit.methods.base import Delta, EditRequest, Method
from kedit.methods.core.keys import Row, batch_tensors, pad_id
from kedit.methods.registry import register
from kedit.models.hooks import frozen
from kedit.models.tokens import encode_prompt_target

Objective = Literal["prompt_last", "target_new"]


@dataclass(frozen=True)
class FtParams:
    LAYER_KEY: ClassVar[str] = "layers"
    OBJECTIVE: ClassVar[str] = "prompt_last"
    METHOD: ClassVar[str] = "ft_l"

    layers: tuple[int, ...] = (0,)
    mlp_in: bool = False                 # also tune the MLP input projections
    lr: float = 5e-4
    num_steps: int = 25
    norm_constraint: float | None = 5e-4  # L∞ bound on each weight's change; None: unbounded
    weight_decay: float = 0.0
    early_stop_loss: float = 1e-2
    objective: Objective = "prompt_last"
    kl_factor: float = 0.0               # EasyEdit's FT files carry 0; kedit's FT has no KL term

    def check(self) -> str | None:
        if not self.layers:
            return "key 'layers': needs at least one layer"
        if len(set(self.layers)) != len(self.layers):
            return f"key 'layers': repeated layer in {list(self.layers)}"
        if self.lr <= 0:
            return "key 'lr': must be > 0"
        if self.num_steps < 1:
            return "key 'num_steps': must be >= 1"
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            return "key 'norm_constraint': must be > 0 (or null for no bound)"
        if self.weight_decay < 0:
            return "key 'weight_decay': must be >= 0"
        if self.kl_factor != 0:
            return "key 'kl_factor': kedit's FT has no KL term; only 0 is accepted"
        if self.objective != self.OBJECTIVE:
            other = "ft_m" if self.objective == "target_new" else "ft_l"
            return (f"key 'objective': method {self.METHOD} optimises '{self.OBJECTIVE}', "
                    f"got '{self.objective}' (use --method {other})")
        return None


@dataclass(frozen=True)
class FtMParams(FtParams):
    OBJECTIVE: ClassVar[str] = "target_new"
    METHOD: ClassVar[str] = "ft_m"

    norm_constraint: float | None = None
    objective: Objective = "target_new"


def edit_rows(tokenizer, requests: Sequence[EditRequest]) -> list[Row]:
    """One row per request: prompt + target_new; ``lookup`` is the prompt's last token."""
    rows = []
    for i, r in enumerate(requests):
        pt = encode_prompt_target(tokenizer, r.prompt, r.target_new)
        if pt.target_start < 1:
            raise ValueError(f"case {r.case_id}: empty prompt, nothing to condition the target on")
        rows.append(Row(i, pt.input_ids, pt.target_start - 1, pt.target_start, pt.target_end))
    return rows


def loss_terms(rows: Sequence[Row], objective: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Where to read the loss: (row index, logit position, target token id) per term, and
    each term's weight 1/m (m = the row's number of target tokens)."""
    rix, pos, tok, w = [], [], [], []
    for i, r in enumerate(rows):
        targets = r.ids[r.target_start:r.target_end]
        m = len(targets)
        for j, t in enumerate(targets):
            rix.append(i)
            # prompt_last: every target token from the last prompt position; target_new: teacher-forced
            pos.append(r.lookup if objective == "prompt_last" else r.target_start - 1 + j)
            tok.append(t)
            w.append(1.0 / m)
    terms = torch.tensor([rix, pos, tok], dtype=torch.long, device=device)
    return terms, torch.tensor(w, dtype=torch.float32, device=device)


def per_row_loss(logits: torch.Tensor, terms: torch.Tensor, weights: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Each row's loss: Σ over its terms of −log p(token at position) · 1/m."""
    rix, pos, tok = terms
    logp = torch.log_softmax(logits[rix, pos].float(), dim=-1).gather(-1, tok[:, None])[:, 0]
    return torch.zeros(n_rows, device=logits.device).index_add(0, rix, -logp * weights)


def below(eps: float, dtype: torch.dtype) -> float:
    """The largest number of ``dtype`` that is <= ``eps`` (float32(1e-3) is above 1e-3)."""
    x = torch.tensor(eps, dtype=dtype)
    if float(x) > eps:
        x = torch.nextafter(x, torch.zeros_like(x))
    return float(x)


class FineTune(Method):
    """The shared loop; subclasses fix the name, description and ``Params`` (objective)."""

    batch_native = False

    def param_names(self) -> list[str]:
        """Weights tuned: each layer's MLP output projection (and input projections with ``mlp_in``)."""
        adapter, names = self.adapter, []
        module_names = {id(m): n for n, m in self.loaded.model.named_modules()} if self.params.mlp_in else {}
        for layer in self.params.layers:
            adapter.check_layer(layer)
            if self.params.mlp_in:
                names += [f"{module_names[id(m)]}.weight" for m in adapter.mlp_in(layer)]
            names.append(adapter.mlp_out_param(layer))
        return names

    def prepare(self) -> None:
        self.param_names()  # layer range checked before any case is evaluated

    def compute(self, requests: Sequence[EditRequest]) -> Delta:
        p, model = self.params, self.loaded.model
        requests = list(requests)
        if not requests:
            return Delta({}, {"method": self.name, "cases": []})
        t0 = time.perf_counter()
        params = dict(model.named_parameters())
        names = self.param_names()
        base = {n: params[n].detach() for n in names}
        delta = {n: torch.zeros(w.shape, dtype=torch.float32, device=w.device, requires_grad=True)
                 for n, w in base.items()}
        opt = torch.optim.Adam(list(delta.values()), lr=p.lr, weight_decay=p.weight_decay)

        rows = edit_rows(self.loaded.tokenizer, requests)
        ids, mask = batch_tensors(rows, pad_id(self.loaded.tokenizer), self.loaded.device)
        terms, weights = loss_terms(rows, p.objective, ids.device)

        def losses() -> torch.Tensor:
            tuned = {n: (base[n].float() + delta[n]).to(base[n].dtype) for n in names}
            logits = functional_call(model, tuned, args=(), kwargs={"input_ids": ids, "attention_mask": mask,
                                                                     "use_cache": False}).logits
            return per_row_loss(logits, terms, weights, len(rows))

        steps, history, first = 0, [], None
        with frozen(model):
            for _ in range(p.num_steps + 1):
                row_loss = losses()
                loss = row_loss.mean()
                history.append(loss.item())
                first = row_loss.detach().cpu().tolist() if first is None else first
                if loss.item() < p.early_stop_loss or steps == p.num_steps:
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                if p.norm_constraint is not None:
                    eps = below(p.norm_constraint, torch.float32)
                    with torch.no_grad():
                        for d in delta.values():
                            d.clamp_(-eps, eps)
        final = row_loss.detach().cpu().tolist()
        tensors = {n: delta[n].detach().to(base[n].dtype) for n in names}
        if p.norm_constraint is not None:  # a lower-precision cast may round past the bound
            tensors = {n: t.clamp(-below(p.norm_constraint, t.dtype), below(p.norm_constraint, t.dtype))
                       for n, t in tensors.items()}
        seconds = time.perf_counter() - t0
        self.ctx.add_time("finetune", seconds)
        max_change = max(float(t.abs().max()) for t in tensors.values())
        cases = [{"case_id": r.case_id, "steps": steps, "loss": final[i], "loss_start": first[i],
                  "max_abs_change": max_change} for i, r in enumerate(requests)]
        return Delta(tensors, {"method": self.name, "cases": cases, "params": names, "loss_history": history})


@register
class FTL(FineTune):
    name = "ft_l"
    description = "Fine-tuning of MLP weights, L∞-bounded, loss at the prompt's last token (ROME's FT+L)"
    Params = FtParams


@register
class FTM(FineTune):
    name = "ft_m"
    description = "Fine-tuning of MLP weights on the target tokens, prompt masked (EasyEdit's FT-M)"
    Params = FtMParams
