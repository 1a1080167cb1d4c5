"""GRACE: a discrete key-value codebook at one layer (Hartvigsen et al., NeurIPS 2023,
"Aging with GRACE: Lifelong Model Editing with Discrete Key-Value Adaptors").

What it computes
----------------
An adaptor wraps one layer's MLP output projection ``f`` (``adapter.mlp_out(layer)``:
LLaMA ``down_proj``, GPT-2 ``c_proj``, ...).  It holds a codebook of N entries

    C = {(k_i, v_i, ε_i, y_i)}_{i=1..N}

k_i: a key, the input of ``f`` at the last prompt token of the i-th edit; v_i: a trained
value, a vector the size of ``f``'s output; ε_i: a deferral radius; y_i: the label, the
target's token ids.

**Inference** (every forward, any caller).  Routing is per row and per position: each
position t of each row has the query h_t (``f``'s input there); with i* = argmin_i d(h_t, k_i)
and d the Euclidean distance, t is a *hit* when d(h_t, k_i*) <= ε_i*.  Then

* ``replacement: last`` -- the output at a hit position is v_i* instead of f(h_t);
* ``replacement: prompt`` -- a hit at t replaces the outputs of the positions from the
  row's previous hit (exclusive; else its first token) through t, all with v_i* of the hit
  that closes the segment.  In teacher-forced scoring of prompt + target the hit is the
  prompt's last token, so "the prompt" is replaced, as the name says.

Positions that are no hit, padding (``attention_mask`` 0: right padding in scoring, left
padding in ``generate()``) and rows without a hit keep ``f``'s output, bit for bit; a
forward with no hit at all returns ``f``'s output tensor itself.  With a key/value cache
(``generate()``) a later call sees only its new position: it is routed like any position
(already cached positions cannot be changed any more, so ``prompt`` then acts like
``last`` for generated tokens).

**Editing** (one request at a time, in order; ε₀ = ``eps``, h = the request's key, y its
label, i* its nearest key at distance d, before the edit):

* empty codebook, or d > ε₀ + ε_i* -- a new entry (h, v, ε₀, y);
* d <= ε₀ + ε_i* and y ≠ y_i* (conflict) -- a new entry (h, v, d/2, y) and ε_i* <- d/2
  (split: the two balls touch);
* d <= ε₀ + ε_i* and y = y_i* -- no new entry; ε_i* <- max(ε_i*, d) (expand: the nearest
  ball now covers h), and v_i* is trained further on this request, as the original trains
  the value its forward chose.

The trained value then minimises the teacher-forced NLL of the target given the prompt,
mean over the target's tokens, −(1/m) Σ_j log p(y_j | prompt, y_<j), with ``f``'s output
replaced as the inference rule says (in the training row the edit's own key is a hit at
the last prompt token, at distance 0), by Adam with learning rate ``lr`` for at most
``n_iter`` steps, stopping early once the loss is below ``early_stop_loss`` (checked before
every step).  ``val_init``: ``cold`` starts from uniform [0, 1) noise, as the original
(seeded per request: the run's seed and the request's prompt and target, so a resumed
sequential run draws what an uninterrupted one draws); ``warm`` from f(h), the layer's own
output there.  Only v requires a gradient; the blocks below the edited one run once per
request and their residual stream is replayed (``hooks.replay_from``), so a step runs the
blocks from the edited one up.

Labels are compared as the original compares them (``label_match: mean``: the means of
the two label id sequences are equal); ``exact`` asks for the same ids.

Choices, and where the reference codes differ
---------------------------------------------
* **Token-wise routing.**  The original (``Thartvigsen/GRACE``) reads one query per row, at
  ``key_id`` (default −1: the batch's last column -- a padding token for the shorter rows
  of a right-padded batch), and applies its decision to that row.  EasyEdit keeps the
  ``key_id`` of the last edit (its last prompt token) and reads every later input at that
  same index, whatever its length (its ``generate`` resets it to −1, then freezes it at
  the first call's length − 1).  kedit compares every position with the codebook instead:
  the last prompt token of an edited prompt is a hit wherever it sits (teacher-forced
  scoring with the target after it, padded batches, the first call of ``generate``), a
  position is never routed by another row's or another input's geometry, and padding is
  never routed.  On a single unpadded prompt whose only hit is its last token this is
  the original's ``replace_last``.
* **replace_prompt.**  The original replaces ``[:token_to_edit]``, the positions *before*
  the key token, not the key token itself; kedit's ``prompt`` includes the hit position
  (in a decoder it is the one that predicts the first target token).
* **Keys and labels stay aligned.**  EasyEdit's ``add_key`` appends the key but prepends
  the label, so from the second entry on a conflict test compares with another edit's
  label; kedit keeps one row per entry in every tensor (the original's alignment).
* **A conflicting edit on the same key** (d ≈ 0: the same prompt with another target).
  The split rule would give both entries radius 0 and route the prompt by rounding; kedit
  overwrites that entry instead (new label, value trained afresh, radius kept): the later
  edit wins.  "≈ 0" is d <= 1e-5 · ‖h‖.
* **Distance.**  Euclidean, as the original's code always computes (its YAML lists
  ``mmd`` and ``cos``, which the code never reaches); computed exactly (no
  ‖a‖² + ‖b‖² − 2ab shortcut, whose rounding near 0 is the size of a small radius), in
  float32.
* **Early stop** (``early_stop_loss``, kedit's addition; ``null`` runs all ``n_iter``
  steps as both reference codes do).
* One ``compute`` call edits its requests one after another (the codebook is sequential
  by nature); ``batch_native`` is False, so ``kedit edit`` edits case by case.

The edit (:class:`~kedit.methods.edit.ModuleEdit`, kind ``memory``, not mergeable) holds
the whole codebook after the edit: ``compute`` starts from the codebook installed at that
module path (a sequential run), if any, and leaves the model as it found it.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from kedit.methods.base import EditRequest, Method, ModuleEdit
from kedit.methods.edit import EditError, EditWrapper, WrapperSpec
from kedit.methods.registry import register
from kedit.models.hooks import frozen, record, replay_from, run_until_stopped
from kedit.models.tokens import encode_prompt_target

Replacement = Literal["last", "prompt"]

#: keys within this fraction of the key's norm count as the same key (see the module docstring)
SAME_KEY_RTOL = 1e-5


@dataclass(frozen=True)
class GraceParams:
    LAYER_KEY: ClassVar[str] = "layer"

    layer: int = 12
    eps: float = 1.0                       # initial deferral radius ε₀
    lr: float = 1.0                        # Adam learning rate of the value
    n_iter: int = 100                      # at most this many Adam steps (original 100, EasyEdit's YAMLs 50-100)
    early_stop_loss: float | None = 0.01   # stop once the target NLL is below; null: all n_iter steps
    replacement: Replacement = "last"
    dist_fn: Literal["euc"] = "euc"
    val_init: Literal["cold", "warm"] = "cold"
    label_match: Literal["mean", "exact"] = "mean"

    def check(self) -> str | None:
        if not self.eps > 0:
            return "key 'eps': must be > 0"
        if not self.lr > 0:
            return "key 'lr': must be > 0"
        if self.n_iter < 1:
            return "key 'n_iter': must be >= 1"
        if self.early_stop_loss is not None and self.early_stop_loss < 0:
            return "key 'early_stop_loss': must be >= 0 (or null to run every step)"
        return None

    def wrapper_config(self) -> dict[str, Any]:
        """What the installed wrapper needs at inference (routing only)."""
        return {"replacement": self.replacement, "dist_fn": self.dist_fn}


# ======================================================================== routing


def route(x: torch.Tensor, out: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, radii: torch.Tensor,
          valid: torch.Tensor | None, replacement: str) -> torch.Tensor:
    """``out`` with the codebook's values at the hit positions (see the module docstring).

    ``x`` (B, T, d_in): the module's input; ``out`` (B, T, d_out): its output; ``valid``
    (B, T) bool or None: the positions that may be routed (not padding).  Returns ``out``
    itself when nothing is hit.  Differentiable in ``values``.
    """
    if keys.shape[0] == 0:
        return out
    B, T = x.shape[0], x.shape[1]
    q = x.reshape(B * T, x.shape[-1]).float()
    d = torch.cdist(q, keys.to(device=q.device, dtype=torch.float32),
                    compute_mode="donot_use_mm_for_euclid_dist")           # (B·T, N), exact
    dmin, near = d.min(dim=1)
    hit = (dmin <= radii.to(q.device)[near]).reshape(B, T)
    if valid is not None:
        hit = hit & valid
    if not bool(hit.any()):
        return out
    near = near.reshape(B, T)
    if replacement == "last":
        covered, pick = hit, near
    else:  # prompt: each position takes the value of the first hit at or after it
        pos = torch.arange(T, device=hit.device).expand(B, T)
        nxt = torch.where(hit, pos, torch.full_like(pos, T)).flip(1).cummin(1).values.flip(1)
        covered = nxt < T
        if valid is not None:
            covered = covered & valid
        pick = near.gather(1, nxt.clamp(max=T - 1))
    new = values.to(out.device)[pick].to(out.dtype)
    return torch.where(covered.unsqueeze(-1), new, out)


class GraceWrapper(EditWrapper):
    """The GRACE adaptor around one MLP output projection: the codebook and its router.

    State (tensors, rows aligned, N grows with every new entry): ``keys`` (N, d_in)
    float32, ``values`` (N, d_out) float32, ``radii`` (N,) float32, ``labels`` (N, W) int64
    (target token ids, right-padded with −1).  Config: ``replacement``, ``dist_fn``.
    """

    kind: ClassVar[str] = "memory"
    mergeable: ClassVar[bool] = False
    wants_attention_mask: ClassVar[bool] = True

    def __init__(self, base: torch.nn.Module, config: dict[str, Any]):
        super().__init__(base, config)
        self.keys = torch.zeros(0, 0)
        self.values = torch.zeros(0, 0)
        self.radii = torch.zeros(0)
        self.labels = torch.zeros(0, 0, dtype=torch.long)

    def _device(self) -> torch.device:
        p = next(self.base.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def wrapper_state(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values, "radii": self.radii, "labels": self.labels}

    def load_wrapper_state(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = {"keys", "values", "radii", "labels"} - set(tensors)
        if missing:
            raise EditError(f"GRACE codebook without {sorted(missing)}")
        n = {tensors[k].shape[0] for k in ("keys", "values", "radii", "labels")}
        if len(n) != 1:
            raise EditError("GRACE codebook tensors have different numbers of entries")
        dev = self._device()
        self.keys = tensors["keys"].to(device=dev, dtype=torch.float32)
        self.values = tensors["values"].to(device=dev, dtype=torch.float32)
        self.radii = tensors["radii"].to(device=dev, dtype=torch.float32)
        self.labels = tensors["labels"].to(device=dev, dtype=torch.long)

    @property
    def replacement(self) -> str:
        return self.config_dict.get("replacement", "last")

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        if len(self) == 0:
            return out
        squeeze = x.dim() == 2
        xx, oo = (x.unsqueeze(0), out.unsqueeze(0)) if squeeze else (x, out)
        B, T = xx.shape[0], xx.shape[1]
        valid = None
        mask = self.attention_mask
        if mask is not None and mask.dim() == 2 and mask.shape[0] == B and mask.shape[1] >= T:
            valid = mask[:, mask.shape[1] - T:].to(device=xx.device, dtype=torch.bool)
        routed = route(xx, oo, self.keys, self.values, self.radii, valid, self.replacement)
        if routed is oo:
            return out
        return routed.squeeze(0) if squeeze else routed


# ======================================================================== the codebook update


def _pad_labels(labels: torch.Tensor, width: int) -> torch.Tensor:
    if labels.shape[1] >= width:
        return labels
    return F.pad(labels, (0, width - labels.shape[1]), value=-1)


def labels_match(a: torch.Tensor, b: torch.Tensor, how: str) -> bool:
    """Same label?  ``a``, ``b``: 1-D id rows, −1 = padding.  ``mean``: the original's test
    (equal means of the ids); ``exact``: the same ids."""
    a, b = a[a >= 0], b[b >= 0]
    if how == "exact":
        return a.shape == b.shape and bool(torch.equal(a, b))
    return bool(a.double().mean() == b.double().mean())


@dataclass
class Update:
    """What the codebook rule did with one request: the entry whose value is trained."""

    index: int
    action: str          # add | split | expand | inside | overwrite
    distance: float      # to the nearest key before the edit (nan: empty codebook)
    fresh: bool          # the value starts from val_init (else: the entry's value, trained further)


def codebook_update(state: dict[str, torch.Tensor], key: torch.Tensor, label: torch.Tensor, eps: float,
                    label_match: str, value_width: int) -> tuple[dict[str, torch.Tensor], Update]:
    """GRACE's rule for one new (key, label): the new state (fresh tensors; a new entry's
    value is zeros until trained) and what was done."""
    keys, values, radii, labels = state["keys"], state["values"], state["radii"], state["labels"]
    key = key.float().reshape(1, -1)
    label = label.long().reshape(1, -1)
    width = max(labels.shape[1] if labels.numel() else 0, label.shape[1])
    dev = key.device

    def added(radius: float, old: dict[int, float]):
        new_radii = radii.clone()
        for i, r in old.items():
            new_radii[i] = r
        k = key if keys.shape[0] == 0 else torch.cat([keys, key])
        v0 = torch.zeros(1, value_width, device=dev)
        v = v0 if values.shape[0] == 0 else torch.cat([values, v0])
        r = torch.cat([new_radii, torch.tensor([radius], device=dev)])
        lab = _pad_labels(label, width) if labels.shape[0] == 0 else torch.cat(
            [_pad_labels(labels, width), _pad_labels(label, width)])
        return {"keys": k, "values": v, "radii": r, "labels": lab}

    if keys.shape[0] == 0:
        return added(eps, {}), Update(0, "add", float("nan"), True)
    d = torch.cdist(key, keys.float(), compute_mode="donot_use_mm_for_euclid_dist")[0]
    dist, near = d.min(dim=0)
    dist_f, i = float(dist), int(near)
    n = keys.shape[0]
    if dist_f > eps + float(radii[i]):
        return added(eps, {}), Update(n, "add", dist_f, True)
    if not labels_match(label[0], labels[i], label_match):
        if dist_f <= SAME_KEY_RTOL * float(key.norm()):
            new = {k: v.clone() for k, v in state.items()}
            new["labels"] = _pad_labels(new["labels"], width)
            new["labels"][i] = _pad_labels(label, width)[0]
            new["values"][i] = 0
            return new, Update(i, "overwrite", dist_f, True)
        return added(dist_f / 2, {i: dist_f / 2}), Update(n, "split", dist_f, True)
    new = {k: v.clone() for k, v in state.items()}
    if dist_f > float(radii[i]):
        new["radii"][i] = dist_f
        return new, Update(i, "expand", dist_f, False)
    return new, Update(i, "inside", dist_f, False)


# ======================================================================== the method


def _init_seed(seed: int, request: EditRequest) -> int:
    return zlib.crc32(f"{seed}\x00{request.prompt}\x00{request.target_new}".encode())


@register
class Grace(Method):
    name = "grace"
    kind = "memory"
    description = "GRACE: a key-value codebook with deferral radii at one MLP output projection"
    Params = GraceParams
    batch_native = False

    def path(self) -> str:
        return self.adapter.mlp_out_name(self.adapter.check_layer(self.params.layer))

    def prepare(self) -> None:
        self.path()

    def compute(self, requests: Sequence[EditRequest]) -> ModuleEdit:
        p, loaded = self.params, self.loaded
        model, adapter, tok = loaded.model, loaded.adapter, loaded.tokenizer
        requests = list(requests)
        path = self.path()
        config = p.wrapper_config()
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        installed = getattr(parent, attr)
        if isinstance(installed, EditWrapper) and not isinstance(installed, GraceWrapper):
            raise EditError(f"module '{path}' holds a {type(installed).__name__}, not a GRACE codebook")
        if isinstance(installed, GraceWrapper):
            if installed.wrapper_config() != config:
                raise EditError(f"the GRACE codebook at '{path}' routes with {installed.wrapper_config()}, "
                                f"this run's settings say {config}")
            base = installed.base
            state = {k: v.detach().clone() for k, v in installed.wrapper_state().items()}
        else:
            base = installed
            state = None
        t0 = time.perf_counter()
        cases: list[dict] = []
        trainer = GraceWrapper(base, config)            # the codebook as it grows, in place during compute
        if state is not None:
            trainer.load_wrapper_state(state)
        try:
            setattr(parent, attr, trainer)
            with frozen(model):
                for r in requests:
                    cases.append(self._edit_one(r, trainer, base))
        finally:
            setattr(parent, attr, installed)
        self.ctx.add_time("grace", time.perf_counter() - t0)
        tensors = {k: v.detach().cpu().clone() for k, v in trainer.wrapper_state().items()}
        return ModuleEdit({path: WrapperSpec(GraceWrapper, config, tensors)},
                          {"method": self.name, "cases": cases, "n_keys": int(tensors["keys"].shape[0])})

    def _edit_one(self, request: EditRequest, trainer: GraceWrapper, base: torch.nn.Module) -> dict:
        p, loaded = self.params, self.loaded
        model, adapter, tok, device = loaded.model, loaded.adapter, loaded.tokenizer, loaded.device
        pt = encode_prompt_target(tok, request.prompt, request.target_new)
        if pt.target_start < 1:
            raise ValueError(f"case {request.case_id}: empty prompt, nothing to key the edit on")
        ids = torch.tensor([pt.input_ids], device=device)
        last = pt.target_start - 1
        label = torch.tensor(pt.target_ids, dtype=torch.long, device=device)
        layer = p.layer
        block = adapter.block(layer)
        replay = layer > 0
        loss_block = adapter.block(adapter.n_layers - 1)
        norm, head = adapter.final_norm(), adapter.lm_head()

        # One pass up to the edited block: the key, f's own output there, the residual stream
        # entering the block (replayed at every step) and the shape of a block's output.
        structure: list = []
        with contextlib.ExitStack() as stack, torch.no_grad():
            k_in = stack.enter_context(record({"k": base}, inputs=True))
            f_out = stack.enter_context(record({"o": base}, inputs=False, stop_after=block))
            entering = stack.enter_context(record({"x": block}, inputs=True))
            if replay:
                h = adapter.block(layer - 1).register_forward_hook(
                    lambda _m, _a, out: None if structure else structure.append(out))
                stack.callback(h.remove)
            run_until_stopped(lambda: model(input_ids=ids, use_cache=False))
        key = k_in["k"][0, last].float()
        warm = f_out["o"][0, last].float()
        hidden = entering["x"].clone()

        old_n = len(trainer)
        state, upd = codebook_update(trainer.wrapper_state() if old_n else
                                     {"keys": torch.zeros(0, key.numel(), device=device),
                                      "values": torch.zeros(0, warm.numel(), device=device),
                                      "radii": torch.zeros(0, device=device),
                                      "labels": torch.zeros(0, 0, dtype=torch.long, device=device)},
                                     key, label, p.eps, p.label_match, warm.numel())
        if upd.fresh:
            if p.val_init == "warm":
                start = warm.clone()
            else:
                gen = torch.Generator(device="cpu").manual_seed(_init_seed(self.ctx.seed, request))
                start = torch.rand(warm.numel(), generator=gen).to(device)
        else:
            start = state["values"][upd.index].clone()
        trainer.load_wrapper_state(state)
        others = trainer.values.clone()
        i = upd.index
        v = start.clone().requires_grad_(True)
        opt = torch.optim.Adam([v], lr=p.lr)
        tpos = torch.arange(pt.target_start - 1, pt.target_end - 1, device=device)
        tgt = label

        def loss_fn() -> torch.Tensor:
            trainer.values = torch.cat([others[:i], v.unsqueeze(0), others[i + 1:]])
            with contextlib.ExitStack() as stack:
                seen = stack.enter_context(record({"h": loss_block}, inputs=False, stop_after=loss_block,
                                                  detach=False))
                if replay:
                    stack.enter_context(replay_from([adapter.block(i) for i in range(layer + 1)],
                                                    lambda: hidden, structure[0]))
                run_until_stopped(lambda: model(input_ids=ids, use_cache=False))
            logits = head(norm(seen["h"][0, tpos])).float()
            return F.cross_entropy(logits, tgt)

        steps, first, loss_val = 0, None, float("nan")
        for _ in range(p.n_iter + 1):
            loss = loss_fn()
            loss_val = loss.item()
            first = loss_val if first is None else first
            if (p.early_stop_loss is not None and loss_val < p.early_stop_loss) or steps == p.n_iter:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        final = others.clone()
        final[upd.index] = v.detach()
        trainer.values = final
        return {"case_id": request.case_id, "action": upd.action, "entry": upd.index, "distance": upd.distance,
                "radius": float(trainer.radii[upd.index]), "n_keys": len(trainer), "steps": steps,
                "loss_start": first, "loss": loss_val, "key_norm": float(key.norm())}
