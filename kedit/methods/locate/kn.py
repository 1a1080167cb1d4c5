"""KN: Knowledge Neurons (Dai et al., ACL 2022), locate the MLP neurons that express a fact
by integrated gradients, then write the new answer into their output weights.

A *neuron* is one unit of an MLP's intermediate activation: the i-th input a_i of layer
l's MLP output projection (kedit's key, ``adapter.mlp_out``; after the nonlinearity and,
for gated MLPs, the gate), whose output weight column W_l[:, i] it adds to the residual
stream.  For a prompt x and its answer token y (the original answer's first token):

1. attribution (integrated gradients, the paper's eq. 3 with its Riemann sum):

       Attr(a_l,i) = ā_l,i · (1/m) Σ_{k=1..m} ∂P(y | x; a_l = (k/m)·ā_l) / ∂a_l,i

   ā_l: layer l's activations at the prompt's last token in the unedited forward; the
   whole layer's activations at that position are scaled together from 0 to ā_l (as
   EasyEdit's code does), the rest of the forward runs as usual;
   m = ``steps`` (20, the paper's).  P is the next-token probability at the prompt's
   last position;
2. coarse neurons of the prompt: Attr > t with t = ``adaptive_threshold`` × the
   largest attribution of that prompt over all layers and neurons (0.2: the paper's t);
3. aggregation over prompts: the prompts are the edit prompt alone and behind each of
   kedit's context prefixes (``core.templates``, as ROME/MEMIT use them), standing in
   for the paper's several prompts of one fact; with ``refine`` a neuron is kept when it
   is coarse in more than ``p`` × (number of prompts) of them (the paper's sharing
   threshold p), else every coarse neuron of any prompt is kept;
4. the edit (the paper's "updating facts"): for every kept neuron (l, i),

       W_l[:, i] += λ_target · e(target) − λ_orig · e(original)

   e(·) the input word embedding of the first token of the new target and of the
   original answer (``target_true``; without one, the model's argmax at the bare
   prompt's last position), λ = ``lambda_target``, ``lambda_orig``.  With
   ``activation_sign: true`` (kedit's option, off by default) the change is multiplied by
   sign(ā_l,i) of the bare prompt: a neuron whose activation is negative (SiLU/GELU gates
   and SwiGLU products can be) would otherwise write −e(target) into the residual stream;
   the paper's BERT neurons (GELU outputs) are mostly positive.

Cost: the positions before the last one do not depend on the scaled activations, so
their attention keys/values are computed once per prompt and every (layer, step) pair
is one row of a single-token forward against that cache (``batch_rows`` rows at a time).

Where kedit differs from EasyEdit's ``easyeditor/models/kn`` (the ``knowledge_neurons``
package): EasyEdit's SmolLM2-size configs use ``steps: 1``, and its scaling uses
``linspace(0, 1, steps)``, so one step evaluates the gradient at zero activations only
(the integral degenerates); kedit uses α = k/m, k = 1..m, the paper's sum.  EasyEdit
attributes LLaMA's gate projection output (before SiLU and the up projection) and
GPT-2's ``c_fc`` output (before GELU), not the activation the output weights multiply;
kedit the latter.  EasyEdit attributes each token of a multi-token answer by greedy
decoding and adds the embeddings of every target token (λ = 2 for a single token);
kedit reads the first answer token at the prompt's last position, as the paper's
single-token answers, and adds the first target token's embedding.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from kedit.data.cases import EditRequest
from kedit.methods.base import Delta, Method
from kedit.methods.core.keys import key_rows
from kedit.methods.core.templates import context_templates
from kedit.methods.registry import register
from kedit.models.cache import cache_arg
from kedit.models.hooks import edit_input, record
from kedit.models.tokens import encode_prompt_target


@dataclass(frozen=True)
class KnParams:
    layers: tuple[int, ...] = ()              # () = every layer (the paper)
    steps: int = 20                           # m, the Riemann sum's steps
    adaptive_threshold: float = 0.2           # t = this × the prompt's largest attribution
    refine: bool = True
    p: float = 0.5                            # keep neurons coarse in more than p × prompts
    context_template_length_params: tuple[tuple[int, int], ...] = ((10, 2),)
    lambda_target: float = 8.0
    lambda_orig: float = 1.0
    activation_sign: bool = False             # kedit's option: write sign(ā_l,i) × the change (see docstring)
    batch_rows: int = 200                     # (layer, step) rows per forward

    def check(self) -> str | None:
        if self.steps < 1:
            return "key 'steps': must be >= 1"
        if not 0 < self.adaptive_threshold < 1:
            return "key 'adaptive_threshold': must be in (0, 1)"
        if not 0 <= self.p < 1:
            return "key 'p': must be in [0, 1)"
        if self.batch_rows < 1:
            return "key 'batch_rows': must be >= 1"
        if len(set(self.layers)) != len(self.layers):
            return f"key 'layers': repeated layer in {list(self.layers)}"
        return None


@register
class KN(Method):
    name = "kn"
    description = "Knowledge neurons: integrated-gradient attribution, embeddings written into output weights (Dai et al. 2022)"
    Params = KnParams

    def prepare(self) -> None:
        if getattr(self, "_ready", False):
            return
        p = self.params
        self.layers = list(p.layers) if p.layers else list(range(self.adapter.n_layers))
        for layer in self.layers:
            self.adapter.check_layer(layer)
        t0 = time.perf_counter()
        self.templates = context_templates(self.loaded, p.context_template_length_params, self.ctx.seed)
        self.ctx.add_time("prepare", time.perf_counter() - t0)
        self._ready = True

    # --- attribution --------------------------------------------------------------------
    def attribution(self, ids: Sequence[int], answer: int) -> torch.Tensor:
        """Integrated gradients of P(answer | ids) at the last position, ``(len(layers), d_key)``
        float32 (see the module docstring)."""
        return self._attribution(ids, answer)[0]

    def _attribution(self, ids: Sequence[int], answer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(attribution, ā): the attribution and the unedited activations, both ``(len(layers), d_key)``."""
        loaded, adapter, p = self.loaded, self.adapter, self.params
        model, device = loaded.model, loaded.device
        mods = {str(layer): adapter.mlp_out(layer) for layer in self.layers}
        ids_t = torch.tensor([list(ids)], device=device)
        with torch.no_grad(), record(mods, inputs=True) as seen:
            model(input_ids=ids_t, use_cache=False)
        base = torch.stack([seen[str(layer)][0, -1].float() for layer in self.layers])      # (L, d_key)
        P = len(ids) - 1
        cache_name = cache_arg(model.forward)
        prefix = None
        if P > 0:
            prefix = DynamicCache()
            with torch.no_grad():
                model(input_ids=ids_t[:, :P], **{cache_name: prefix}, use_cache=True)
        alphas = torch.arange(1, p.steps + 1, dtype=torch.float32, device=device) / p.steps
        pairs = [(li, k) for li in range(len(self.layers)) for k in range(p.steps)]
        grads = torch.zeros_like(base)
        for start in range(0, len(pairs), p.batch_rows):
            chunk = pairs[start: start + p.batch_rows]
            B = len(chunk)
            rows_of: dict[int, list[int]] = {}
            for b, (li, _k) in enumerate(chunk):
                rows_of.setdefault(li, []).append(b)
            leaves = {li: (alphas[[chunk[b][1] for b in rows]][:, None] * base[li][None]).requires_grad_(True)
                      for li, rows in rows_of.items()}
            extra: dict = {"use_cache": False}
            mask = torch.ones(B, P + 1, dtype=torch.long, device=device)
            if prefix is not None:
                data = [(layer.keys.expand(B, *layer.keys.shape[1:]).contiguous(),
                         layer.values.expand(B, *layer.values.shape[1:]).contiguous()) for layer in prefix.layers]
                extra = {cache_name: DynamicCache(ddp_cache_data=data), "use_cache": True,
                         "position_ids": torch.full((B, 1), P, device=device)}

            def replace(li: int):
                rows = torch.tensor(rows_of[li], device=device)

                def fn(x: torch.Tensor) -> torch.Tensor:
                    return x.index_put((rows, torch.full_like(rows, x.shape[1] - 1)), leaves[li].to(x.dtype))
                return fn

            with contextlib.ExitStack() as stack, torch.enable_grad():
                for li in rows_of:
                    stack.enter_context(edit_input(adapter.mlp_out(self.layers[li]), replace(li)))
                logits = model(input_ids=ids_t[:, -1:].expand(B, 1), attention_mask=mask, **extra).logits[:, -1]
                prob = F.softmax(logits.float(), dim=-1)[:, answer]
                got = torch.autograd.grad(prob.sum(), [leaves[li] for li in rows_of])
            for li, g in zip(rows_of, got):
                grads[li] += g.sum(0)
        return base * grads / p.steps, base

    def neurons(self, request: EditRequest, answer: int) -> tuple[list[tuple[int, int]], list[dict]]:
        """The kept neurons ``(layer, index)`` for one request, and per-prompt details."""
        return self._neurons(request, answer)[:2]

    def _neurons(self, request: EditRequest, answer: int):
        """Kept neurons, per-prompt details, and the bare prompt's activations ā (layers, d_key)."""
        p = self.params
        rows = key_rows(self.loaded.tokenizer, [request], self.templates, "last")
        counts: Counter = Counter()
        details = []
        bare = None
        for row in rows:
            attr, base = self._attribution(row.ids, answer)
            bare = base if bare is None else bare
            top = float(attr.max())
            coarse = (attr > p.adaptive_threshold * top).nonzero().tolist() if top > 0 else []
            counts.update((self.layers[li], i) for li, i in coarse)
            details.append({"max_attribution": top, "coarse": len(coarse)})
        need = p.p * len(rows) if p.refine else 0
        kept = sorted(n for n, c in counts.items() if c > need)
        return kept, details, bare

    # --- the edit -------------------------------------------------------------------------
    def _first_token(self, prompt: str, text: str) -> int:
        pt = encode_prompt_target(self.loaded.tokenizer, prompt, text)
        return pt.input_ids[pt.target_start]

    def compute(self, requests: Sequence[EditRequest]) -> Delta:
        """One edit per request, summed (the neurons are located on the unedited model)."""
        self.prepare()
        adapter, loaded = self.adapter, self.loaded
        emb = adapter.embed().weight
        cols: dict[int, torch.Tensor] = {}            # layer -> (d_out, d_key) change of W (out, in)
        info = []
        for r in requests:
            t0 = time.perf_counter()
            target = self._first_token(r.prompt, r.target_new)
            if r.target_true:
                orig = self._first_token(r.prompt, r.target_true)
            else:
                ids = torch.tensor([list(loaded.tokenizer(r.prompt)["input_ids"])], device=loaded.device)
                with torch.no_grad():
                    orig = int(loaded.model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            kept, details, bare = self._neurons(r, orig)
            t1 = time.perf_counter()
            write = (self.params.lambda_target * emb[target].double() - self.params.lambda_orig * emb[orig].double())
            for layer, i in kept:
                sign = float(torch.sign(bare[self.layers.index(layer), i])) if self.params.activation_sign else 1.0
                if layer not in cols:
                    d_out = adapter.weight_out_in(layer).shape[0]
                    cols[layer] = torch.zeros(d_out, adapter.key_size, dtype=torch.float64,
                                              device=adapter.layer_device(layer))   # the edited layer's device
                cols[layer][:, i] += sign * write.to(cols[layer].device)
            self.ctx.add_time("locate", t1 - t0)
            self.ctx.add_time("update", time.perf_counter() - t1)
            info.append({"case_id": r.case_id, "neurons": [list(n) for n in kept], "n_neurons": len(kept),
                         "answer_token": orig, "target_token": target, "prompts": details})
        tensors = {adapter.mlp_out_param(layer): adapter.to_param_layout(dW).to(adapter.dtype)
                   for layer, dW in sorted(cols.items())}
        return Delta(tensors, {"method": self.name, "cases": info})
