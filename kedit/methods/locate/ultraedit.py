"""UltraEdit (Gu et al. 2025, "UltraEdit: Training-, Subject-, and Memory-Free Lifelong
Editing in Large Language Models"): a closed-form weight shift from one forward/backward
pass per turn, with feature statistics that keep running across turns.

Per turn (one ``compute`` call: the requests of a batch), for every chosen projection
``W`` (``v = W k``, W of shape (d_out, d_in)):

1. keys and gradients: one teacher-forced pass over each request's ``prompt + target_new``
   with the loss L = Σ_requests mean-token NLL(target_new | prompt); at the chosen
   positions t (``token: ans``: the positions whose logits predict a target token;
   ``token: mask``: every position of the row), k_t = the projection's input and
   g_t = ∂L/∂v_t, the gradient at its output (one request's rows only ever see its own
   loss, so a request's k, g do not depend on the rest of the batch);
2. lifelong normalisation: the running count n, mean μ and sum of squared deviations M
   of z_t = [k_t; g_t] (per projection) absorb this turn's rows (Chan et al.'s exact
   merge), then ẑ_t = (z_t − μ) / (σ + ε), σ = sqrt(M / (n − 1)) (0 while n = 1),
   ε = float32 machine epsilon, split into [k̂_t; ĝ_t];
3. pseudo-targets: v_t = −η ‖k̂_t‖² ĝ_t (η = ``lr``): a gradient step on the output,
   scaled by how far the key lies from what the editor has seen;
4. the shift: ΔW = Vᵀ K (Kᵀ K + ridge·I)⁻¹ over the turn's rows, K the *raw* keys
   (N, d_in), V the pseudo-targets (N, d_out) -- the reference code's
   ΔW_(in,out) = (KᵀK + I)⁻¹ Kᵀ V, transposed into kedit's (out, in) layout; it is
   MEMIT's least-squares solve with C = I and λ = ridge
   (``core.solve.least_squares_update``).  All shifts of a turn are computed on the
   unedited model and returned together as one :class:`Delta`.

Sequential state (``state`` / ``load_state``): the normaliser of each projection, float64
(n, μ, M), so a resumed run continues bit-identically.  ``compute`` merges a copy of the
committed statistics with the turn's rows; :meth:`commit` keeps that copy (the edit
stays), so an independent edit (reverted, never committed) normalises with the committed
statistics plus its own rows only, and never sees another case.

Where kedit differs from EasyEdit's ``easyeditor/models/ultraedit`` (and MALMEN's
``RunningMeanStd`` it uses):

* the running variance is the exact merge; the reference adds ``N·x.var(0)`` (the
  unbiased per-turn variance times N, NaN for a turn of one row) where the sum of squared
  deviations belongs;
* one normaliser per edited projection; the reference shares one between all projections
  of the same shape (gate and up projections of all layers pool their statistics);
* ``token: ans`` reads the positions that predict the target tokens; EasyEdit's ``ans``
  mask is built from the label ids alone and lands on the first positions of the
  sentence, and its shipped config uses ``mask`` (every position);
* no padding of a turn to ``editor_batch_size`` (padded rows are cut off again before
  the solve in the reference, so it changes nothing).

The paper edits the gate/up projections of a few late-middle layers of LLaMA/Qwen
(``modules: [mlp_in]``) and the down projections of two late layers of Mistral
(``modules: [mlp_out]``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from kedit.data.cases import EditRequest
from kedit.methods.base import Delta, Method
from kedit.methods.core.keys import batch_tensors, pad_id, target_rows
from kedit.methods.core.solve import least_squares_update
from kedit.methods.registry import register
from kedit.models.arch import module_device
from kedit.models.hooks import edit_output, record, run_until_stopped

#: ε of the normalisation (the reference adds float32's machine epsilon to σ).
EPS = float(torch.finfo(torch.float32).eps)


@dataclass(frozen=True)
class UltraEditParams:
    layers: tuple[int, ...] = (20, 21, 22, 23, 24)
    modules: tuple[Literal["mlp_out", "mlp_in"], ...] = ("mlp_out",)   # mlp_in: gate and up (or c_fc / fc_in)
    lr: float = 1e-6                          # η in v = −η ‖k̂‖² ĝ
    ridge: float = 1.0                        # the I in (KᵀK + I)⁻¹
    token: Literal["ans", "mask"] = "ans"
    batch_tokens: int = 4096                  # padded tokens per forward chunk

    def check(self) -> str | None:
        if not self.layers:
            return "key 'layers': needs at least one layer"
        if len(set(self.layers)) != len(self.layers):
            return f"key 'layers': repeated layer in {list(self.layers)}"
        if not self.modules or len(set(self.modules)) != len(self.modules):
            return "key 'modules': a non-empty list of mlp_out / mlp_in without repeats"
        if self.lr <= 0:
            return "key 'lr': must be > 0"
        if self.ridge <= 0:
            return "key 'ridge': must be > 0 (KᵀK + ridge·I must be invertible)"
        return None


@dataclass
class RunningStats:
    """Count, mean and sum of squared deviations of the rows seen so far (float64)."""

    n: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def empty(cls, size: int, device) -> RunningStats:
        z = torch.zeros(size, dtype=torch.float64, device=device)
        return cls(torch.zeros((), dtype=torch.float64, device=device), z, z.clone())

    def merged(self, x: torch.Tensor) -> RunningStats:
        """The statistics of the rows seen so far plus the rows of ``x`` (N, size)."""
        x = x.double()
        nb = x.new_tensor(float(x.shape[0]))
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n = self.n + nb
        d = mean_b - self.mean
        return RunningStats(n, self.mean + d * (nb / n), self.m2 + m2_b + d * d * (self.n * nb / n))

    def std(self) -> torch.Tensor:
        if float(self.n) <= 1:
            return torch.zeros_like(self.mean)
        return (self.m2 / (self.n - 1)).sqrt()

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.double() - self.mean) / (self.std() + EPS)


@register
class UltraEdit(Method):
    name = "ultraedit"
    description = "Training-free lifelong editing: closed-form shift from keys and normalised gradients (Gu et al. 2025)"
    Params = UltraEditParams
    # A turn is one compute() call: one case unless --batch-size groups cases (the paper's
    # turns hold 100 edits).  Not batch-native, so a sequential run is a stream of turns.
    batch_native = False

    def prepare(self) -> None:
        if getattr(self, "_ready", False):
            return
        p, adapter = self.params, self.adapter
        names = {id(m): n for n, m in self.loaded.model.named_modules()}
        self.sites: list[tuple[str, torch.nn.Module]] = []      # (parameter name, module)
        for layer in p.layers:
            adapter.check_layer(layer)
            for kind in p.modules:
                mods = (adapter.mlp_out(layer),) if kind == "mlp_out" else adapter.mlp_in(layer)
                self.sites.extend((f"{names[id(m)]}.weight", m) for m in mods)
        self.stats: dict[str, RunningStats] = {}
        for param, m in self.sites:
            d_out, d_in = self._shape(m)
            self.stats[param] = RunningStats.empty(d_in + d_out, module_device(m))   # the edited module's device
        self.turns = 0
        self._pending: tuple[Delta, dict[str, RunningStats]] | None = None
        self._ready = True

    def _shape(self, module: torch.nn.Module) -> tuple[int, int]:
        """(d_out, d_in) of a projection in kedit's v = W k convention."""
        w = module.weight
        return (w.shape[1], w.shape[0]) if self.adapter.spec.weight_layout == "in_out" else tuple(w.shape)

    def keys_and_grads(self, requests: Sequence[EditRequest]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per site: the projection's inputs k (N, d_in) and output gradients g (N, d_out),
        float64, at the chosen positions of every request's rows (in request order)."""
        from kedit.methods.core.keys import _chunks

        p, loaded = self.params, self.loaded
        rows = target_rows(loaded.tokenizer, requests, ["{}"], "last")
        got: dict[str, tuple[list, list]] = {param: ([], []) for param, _ in self.sites}
        head, norm = self.adapter.lm_head(), self.adapter.final_norm()
        last = self.adapter.block(self.adapter.n_layers - 1)
        for _start, chunk in _chunks(rows, p.batch_tokens):
            ids, mask = batch_tensors(chunk, pad_id(loaded.tokenizer), loaded.device)
            probes: dict[str, torch.Tensor] = {}

            def probe(param):
                def fn(out: torch.Tensor) -> torch.Tensor:
                    probes[param] = torch.zeros_like(out, requires_grad=True)
                    return out + probes[param]
                return fn

            with contextlib.ExitStack() as stack:
                for param, m in self.sites:
                    stack.enter_context(edit_output(m, probe(param)))
                keys = stack.enter_context(record({param: m for param, m in self.sites}, inputs=True))
                hidden = stack.enter_context(record({"h": last}, inputs=False, stop_after=last, detach=False))
                with torch.enable_grad():
                    run_until_stopped(lambda: loaded.model(input_ids=ids, attention_mask=mask, use_cache=False))
                    loss = ids.new_zeros((), dtype=torch.float32)
                    for b, r in enumerate(chunk):
                        pos = torch.arange(r.target_start - 1, r.target_end - 1, device=ids.device)
                        logp = F.log_softmax(head(norm(hidden["h"][b, pos])).float(), dim=-1)
                        tgt = torch.tensor(r.ids[r.target_start: r.target_end], device=ids.device)
                        loss = loss - logp[torch.arange(len(pos), device=ids.device), tgt].mean()
                    grads = torch.autograd.grad(loss, [probes[param] for param, _ in self.sites])
            for (param, _), g in zip(self.sites, grads):
                for b, r in enumerate(chunk):
                    pos = (range(r.target_start - 1, r.target_end - 1) if p.token == "ans" else range(len(r.ids)))
                    pos = torch.tensor(list(pos), device=ids.device)
                    got[param][0].append(keys[param][b, pos].double())
                    got[param][1].append(g[b, pos].double())
        return {param: (torch.cat(k), torch.cat(g)) for param, (k, g) in got.items()}

    def compute(self, requests: Sequence[EditRequest]) -> Delta:
        """One turn: the shifts of every chosen projection (the model is not changed)."""
        self.prepare()
        p, adapter = self.params, self.adapter
        requests = list(requests)
        if not requests:
            return Delta({}, {"method": self.name, "cases": []})
        t0 = time.perf_counter()
        kg = self.keys_and_grads(requests)
        t1 = time.perf_counter()
        tensors: dict[str, torch.Tensor] = {}
        new_stats: dict[str, RunningStats] = {}
        info = []
        for param, m in self.sites:
            K, G = kg[param]
            d_in = K.shape[1]
            stats = self.stats[param].merged(torch.cat([K, G], dim=1))
            z = stats.normalise(torch.cat([K, G], dim=1))
            k_hat, g_hat = z[:, :d_in], z[:, d_in:]
            V = -p.lr * (k_hat * k_hat).sum(-1, keepdim=True) * g_hat                   # (N, d_out)
            eye = torch.eye(d_in, dtype=torch.float64, device=K.device)
            dW = least_squares_update(V.T, K.T, eye, p.ridge)                             # (d_out, d_in)
            tensors[param] = adapter.to_param_layout(dW).to(adapter.dtype)
            new_stats[param] = stats
            info.append({"param": param, "rows": int(K.shape[0]), "update_norm": float(dW.norm()),
                         "pseudo_target_norm": float(V.norm())})
        self.ctx.add_time("key", t1 - t0)
        self.ctx.add_time("update", time.perf_counter() - t1)
        cases = [{"case_id": r.case_id} for r in requests]
        delta = Delta(tensors, {"method": self.name, "cases": cases, "sites": info, "turn": self.turns})
        self._pending = (delta, new_stats)
        return delta

    def commit(self, delta: Delta) -> None:
        """The turn's shift stays: its rows join the running statistics."""
        if self._pending is None or self._pending[0] is not delta:
            raise RuntimeError("UltraEdit.commit: expects the delta returned by the last compute()")
        self.stats.update(self._pending[1])
        self.turns += 1
        self._pending = None

    def state(self) -> dict[str, torch.Tensor]:
        """Each projection's normaliser (``norm.<param>.n|mean|m2``, float64) and the turn count."""
        self.prepare()
        out = {"turns": torch.tensor(self.turns, dtype=torch.int64)}
        for param, s in self.stats.items():
            for field in ("n", "mean", "m2"):
                out[f"norm.{param}.{field}"] = getattr(s, field).detach().to("cpu").clone()
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state` (resuming a sequential run); names must match this config's sites."""
        self.prepare()
        want = {"turns"} | {f"norm.{param}.{f}" for param in self.stats for f in ("n", "mean", "m2")}
        if set(tensors) != want:
            raise ValueError(f"ultraedit state: expected {sorted(want)[:4]}..., got {sorted(tensors)[:4]}...")
        for param, s in self.stats.items():
            dev = s.mean.device
            got = {f: tensors[f"norm.{param}.{f}"] for f in ("n", "mean", "m2")}
            if tuple(got["mean"].shape) != tuple(s.mean.shape) or tuple(got["m2"].shape) != tuple(s.m2.shape):
                raise ValueError(f"ultraedit state: norm.{param} has shape {tuple(got['mean'].shape)}, "
                                 f"expected {tuple(s.mean.shape)}")
            self.stats[param] = RunningStats(*(got[f].to(dev, torch.float64).clone()
                                               for f in ("n", "mean", "m2")))
        self.turns = int(tensors["turns"])
        self._pending = None
