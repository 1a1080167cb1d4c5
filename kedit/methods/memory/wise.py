"""WISE: a side memory for one MLP output projection, behind an activation router.

Wang et al., "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large
Language Models", NeurIPS 2024; the authors' code is EasyEdit's ``easyeditor/models/wise``.
This module implements both variants of the paper: **WISE-Merge** (shards merged by TIES
into one side memory, ``retrieve: false``, EasyEdit's default) and **WISE-Retrieve**
(``retrieve: true``: each merged group of shards kept as a memory of its own, top-1
routing by activation; the SmolLM2 default, see ``configs/methods/wise/``).

Memories
--------
The *main memory* is the MLP output projection ``W`` (``(out, in)``; LLaMA ``down_proj``)
of one layer ``layer``, never changed.  A *side memory* is a copy ``W' = W + ΔW``.  The
wrapper (:class:`WiseWrapper`) holds, as weight changes ``ΔW`` against ``W``:

* ``merged``: the side memory that knowledge shards are merged into (none before the
  first merge);
* ``pending``: shards saved and waiting for the next merge (only when
  ``save_freq < merge_freq``);
* ``shard``: the shard being written now (the last ``count mod save_freq`` edits).

Activation score and router
---------------------------
With ``a_t(x)`` the projection's input at token ``t`` (the MLP activation, ``A(x)`` of the
paper) and ``ΔW`` a side memory's change, the score of one input is

    Δ_act(x) = (1/|T|) Σ_{t∈T} ‖ΔW a_t(x)‖₂          (T: the row's non-padding tokens)

i.e. the paper's ‖A(x)(W' − W)‖₂ per token, averaged over the tokens of the input as
EasyEdit averages its per-token distances.  Routing is decided per row of a batch: among
the side memories (merged or retrieved groups, pending shards, current shard) whose score
reaches their threshold, the one with the highest score is used for the whole row:

    τ_m = act_ratio · min_{e ∈ E_m} Δ_act(e)    (scores as recorded when each edit finished
                                                 training)

where E_m is every edit made so far (WISE-Merge: one threshold for all memories) or, with
``retrieve``, the edits written into memory m (EasyEdit keeps one activation record per
retrieved memory).  If no memory reaches its threshold the row goes through the main memory
(``W``, bit-identical to the base model).
The output of a routed row is ``W a_t + ΔW a_t`` (plus the base bias, if any).

*Score: the paper's, not EasyEdit's.*  EasyEdit measures ``‖silu(W' a) − silu(W a)‖``:
it applies the model's hidden activation (SiLU) to the projection's *output*, where the
model applies none.  SiLU flattens negative outputs, so a change that drives an output
coordinate from −1 to −30 scores almost nothing; the linear score sees every direction
of the change, is what the paper defines, and costs one matrix product.  The margins
α, β, γ are absolute numbers whatever the score, so they are chosen per model anyway
(``configs/methods/wise/``).

Padding and generation: the row's tokens are those the attention mask marks (the
wrapper asks for the mask, ``wants_attention_mask``), so padding never votes.  With a
key/value cache (``generate``) later calls see one new position; the wrapper keeps the
decision made on the prompt pass per row and reuses it while the calls continue that
batch (a call continues when its attention mask is longer than its input).  The whole
generated text therefore goes through one memory, as its cached prefix did; deciding
again on each new token alone would switch memories mid-answer on one token's score.
A call without a mask is decided on its own positions.

Training one edit
-----------------
The edit prompt is put after each context prefix (``context_templates``, EasyEdit's
``[[5, 5], [10, 5]]``: the bare prompt and ten short generated prefixes), followed by the
target: rows ``e_1..e_R``.  The *irrelevant* inputs ``x_1..x_K`` (``n_irrelevant``; EasyEdit
uses one per edit) are natural questions with their answers (``loc + " " + loc_ans``, the
NQ questions of the shipped zsRE file, as EasyEdit feeds its ``loc_prompts``), drawn
without replacement and deterministically from ``(seed, edit number, case)``, never the
edit's own case.  Only the current shard's ``ΔW`` is trained:

    L = (1/R) Σ_r NLL_r + L_act,
    NLL_r = −(1/m) Σ_j log p_{W'}(y_j | e_r, y_<j)          (target tokens only)
    L_act = mean⁺_k [Δ(x_k) − α]₊ + mean⁺_r [β − Δ(e_r)]₊ + mean⁺_{r,k} [γ − (Δ(e_r) − Δ(x_k))]₊

(the paper's Eq. for the routing loss, α, β, γ = ``act_margin``; ``mean⁺`` is the mean
over the terms that are positive, 0 if none, as EasyEdit averages the violated margins).
Plain SGD with learning rate ``edit_lr``, at most ``n_iter`` steps; after the backward
pass the gradient (plus ``weight_decay · ΔW``) is multiplied by the shard's random mask
(each entry kept with probability ``mask_ratio``, drawn once per shard from the seed
and the shard number), so a shard writes only its own random subset of entries; then
``ΔW`` is clamped to ``±norm_constraint`` per entry (EasyEdit clamps ``W'`` to
``W ± norm_constraint``, the same thing).  Training stops early when the loss is at most
``early_stop_loss`` and changed by at most ``early_stop_delta`` since the previous step
(EasyEdit's ``EarlyStopMeter``).  When the edit is done its score ``mean_r Δ(e_r)`` under
the shard updates ``min_e Δ_act(e)``.

Cheap steps: the projection's input ``a_t`` does not depend on ``W'``, so one forward
pass (main memory) records ``a_t`` for every row, the projection's output ``m`` and the
residual stream ``h`` leaving block ``layer``; a step then feeds ``h + ΔW a`` to the blocks
above (``hooks.replay_from``), stops after the last block, and applies the final norm and the
head at the target positions only.  Where the MLP output reaches the residual stream through
its own norm N (Gemma's post-feed-forward RMSNorm) the block adds ``N(m + ΔW a) − N(m)``
instead, exactly what it adds when the side memory answers.  The irrelevant rows need no
forward at all, only ``Δ(x_k)``.

Shards and merging (EasyEdit's WISE-Merge)
------------------------------------------
Edit number ``n`` (from 0) starts a new shard, with a new mask, when ``n mod save_freq
== 0``; after ``save_freq`` edits the shard is saved (``pending``); every ``merge_freq``
edits the saved shards are merged by TIES into ``merged``:

* first merge: ``merged = TIES(shards, weights = weights/k each)``;
* later ones: ``merged = TIES(shards + [merged], weights = 0.4/k each, 0.6)``
  (EasyEdit's constants);
* with ``retrieve``: the k saved shards become one more memory,
  ``TIES(shards, weights = weights/k each)``, with the smallest score of their edits for its
  threshold; ``merge_freq: null`` never merges, so every shard stays a memory of its own
  (with ``save_freq: 1``, one memory per edit).  EasyEdit's optional *replay* for
  WISE-Retrieve (training a new shard also against the activations of earlier groups'
  edits) is not implemented;

TIES (Yadav et al. 2023, EasyEdit's ``GTA('magnitude', 'sum', normalize=True)``), on
weight changes ``δ_i`` with weights ``w_i``: trim each ``δ_i`` to its ``⌊density·N⌋``
largest magnitudes; elect per entry the sign of ``Σ_i w_i δ_i`` (``+`` when 0); keep per
entry the ``δ_i`` that are nonzero and of the elected sign, ``S``; the merged change is
``Σ_{i∈S} w_i δ_i / Σ_{i∈S} w_i`` (0 where ``S`` is empty): a disjoint weighted mean.

Where EasyEdit differs, and what kedit does
-------------------------------------------
* The score: linear, as the paper (above).
* Pending shards: EasyEdit's inference routes between ``merged`` and the current shard
  only, and on its first forward call after ``save_freq`` edits merges the pending
  shards (evaluation changes the memory).  Here the model never changes when called:
  pending shards are routed to like the other side memories (highest score wins).
* The NLL is the mean over the target tokens of each row (EasyEdit's divides by a mask
  that also counts some prompt and padding positions), and the row scores average the
  non-padding tokens (EasyEdit's include padding).
* Weight decay pulls ``W'`` towards ``W`` on the shard's entries; EasyEdit's SGD decays
  every entry of ``W'`` towards 0 (outside the mask too, so the whole side memory
  shrinks with the number of steps).
* Early stopping is checked on the current and previous loss (EasyEdit: on the two
  previous ones); the recorded score is that of the final ``ΔW``.
* ``n_irrelevant`` irrelevant inputs per edit (EasyEdit: one); 1 gives EasyEdit's loss.
* ``n_subject_swaps`` more irrelevant inputs per edit (default 0, the paper): the edit's
  own template asked of other subjects (the ``subject`` values of the irrelevant-data
  file).  The routing score averages over the input's tokens, and for a prompt of the
  same relation the relation's tokens dominate it; these inputs penalise exactly that.
* One edit per step: a batch of requests is edited one after another into the state.

State
-----
The edit is a :class:`~kedit.methods.edit.ModuleEdit` holding the wrapper's whole state
after the edit (``cumulative``): ``compute`` reads the state of a :class:`WiseWrapper`
already installed at the projection (sequential runs) and returns the next one; the
model is unchanged on return.  Shards are stored sparsely (packed mask bits and the
values under the mask, ``mask_ratio`` of the entries), the merged memory densely; the
counters and the minimum score are tensors too, so a checkpoint resumes exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from kedit.methods.base import EditRequest, Method, ModuleEdit
from kedit.methods.core.keys import Row, batch_tensors, pad_id
from kedit.methods.core.templates import context_templates, fill
from kedit.methods.edit import EditWrapper, WrapperSpec
from kedit.methods.registry import register
from kedit.models.hooks import frozen, record, replay_from, run_until_stopped
from kedit.models.tokens import encode_prompt_target
from kedit.util.paths import package_data

IRRELEVANT_FILE = "benchmarks/zsre_mend_train-1k.json"
# EasyEdit's weights for merging new shards into an existing merged memory (merge_weight).
LATER_MERGE_SHARDS, LATER_MERGE_MERGED = 0.4, 0.6


@dataclass(frozen=True)
class WiseParams:
    layer: int = 27
    edit_lr: float = 1.0
    n_iter: int = 70
    mask_ratio: float = 0.2
    act_margin: tuple[float, float, float] = (5.0, 20.0, 10.0)    # alpha, beta, gamma
    act_ratio: float = 0.88
    save_freq: int = 500
    merge_freq: int | None = 1000          # null: never merge (every shard its own memory)
    retrieve: bool = False                 # WISE-Retrieve: merged groups kept apart, top-1 routing
    merge_alg: Literal["ties"] = "ties"
    densities: float = 0.53
    weights: float = 1.0
    norm_constraint: float | None = 1.0
    weight_decay: float = 1e-5
    early_stop_loss: float = 0.02
    early_stop_delta: float = 1e-4
    objective_optimization: Literal["only_label"] = "only_label"
    context_template_length_params: tuple[tuple[int, int], ...] = ((5, 5), (10, 5))
    irrelevant_data: str | None = None     # JSON array with 'loc'/'loc_ans' (default: the shipped zsRE file)
    n_irrelevant: int = 1                  # irrelevant inputs per edit (EasyEdit: 1)
    n_subject_swaps: int = 0               # kedit's: the edit's template with other subjects, as irrelevant inputs

    def check(self) -> str | None:
        if self.edit_lr <= 0:
            return "key 'edit_lr': must be > 0"
        if self.n_iter < 1:
            return "key 'n_iter': must be >= 1"
        if not 0 < self.mask_ratio <= 1:
            return "key 'mask_ratio': must be in (0, 1]"
        if self.act_ratio <= 0:
            return "key 'act_ratio': must be > 0"
        if self.save_freq < 1 or (self.merge_freq is not None and self.merge_freq < 1):
            return "keys 'save_freq', 'merge_freq': must be >= 1 (merge_freq: or null, never merge)"
        if self.merge_freq is not None and self.merge_freq % self.save_freq:
            return f"key 'merge_freq': must be a multiple of save_freq ({self.merge_freq} vs {self.save_freq})"
        if not 0 < self.densities <= 1:
            return "key 'densities': must be in (0, 1]"
        if self.weights <= 0:
            return "key 'weights': must be > 0"
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            return "key 'norm_constraint': must be > 0 (or null for no bound)"
        if self.weight_decay < 0:
            return "key 'weight_decay': must be >= 0"
        if self.n_irrelevant < 1:
            return "key 'n_irrelevant': must be >= 1"
        if self.n_subject_swaps < 0:
            return "key 'n_subject_swaps': must be >= 0"
        if self.irrelevant_data and not Path(self.irrelevant_data).expanduser().is_file():
            return f"key 'irrelevant_data': {self.irrelevant_data}: no such file"
        return None


# ======================================================================== TIES


def ties_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES merge of weight changes (see the module docstring): trim each to its
    ``floor(density * numel)`` largest magnitudes, elect the sign of the weighted sum,
    average the agreeing nonzero entries with their weights."""
    if not deltas or len(deltas) != len(weights):
        raise ValueError("ties_merge needs one weight per delta, and at least one delta")
    trimmed = []
    for d in deltas:
        d = d.float()
        if density < 1:
            k = int(density * d.numel())
            if k < 1:
                raise ValueError(f"density {density} keeps no entry of a tensor of {d.numel()}")
            flat = d.reshape(-1)
            order = torch.sort(flat.abs(), descending=True, stable=True).indices[:k]
            keep = torch.zeros_like(flat)
            keep[order] = 1
            d = (flat * keep).reshape(d.shape)
        trimmed.append(d)
    stacked = torch.stack(trimmed)
    w = torch.tensor([float(x) for x in weights], dtype=stacked.dtype, device=stacked.device)
    w = w.reshape(-1, *([1] * (stacked.dim() - 1)))
    weighted = stacked * w
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = weighted.sign() == elected
    total = (weighted * agree).sum(0)
    divisor = (w * agree).sum(0)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return total / divisor


# ======================================================================== packed masks


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor -> uint8 bits (8 entries a byte, flat order, little end first)."""
    flat = mask.reshape(-1).to("cpu", torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.reshape(-1, 8).to(torch.int32) << torch.arange(8, dtype=torch.int32)
    return bits.sum(1).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The inverse of :func:`pack_mask`: a flat boolean tensor of ``numel`` entries."""
    bits = (packed.to(torch.int32)[:, None] >> torch.arange(8, dtype=torch.int32, device=packed.device)) & 1
    return bits.reshape(-1)[:numel].bool()


# ======================================================================== state


@dataclass
class WiseState:
    """The wrapper's state, dense, on one device (see the module docstring)."""

    shape: tuple[int, int]
    count: int = 0
    merges: int = 0
    min_act: float = math.inf            # over every edit (WISE-Merge's one threshold)
    merged: torch.Tensor | None = None
    pending: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)   # (mask, ΔW)
    shard: tuple[torch.Tensor, torch.Tensor] | None = None                         # (mask, ΔW)
    retrieve: bool = False
    pending_min: list[float] = field(default_factory=list)     # per saved shard (WISE-Retrieve)
    shard_min: float = math.inf                                # of the current shard
    retrieved: list[torch.Tensor] = field(default_factory=list)   # merged groups (WISE-Retrieve)
    retrieved_min: list[float] = field(default_factory=list)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {"shape": torch.tensor(self.shape, dtype=torch.int64),
               "count": torch.tensor(self.count, dtype=torch.int64),
               "merges": torch.tensor(self.merges, dtype=torch.int64),
               "min_act": torch.tensor(self.min_act, dtype=torch.float64),
               "retrieve": torch.tensor(int(self.retrieve), dtype=torch.int64),
               "shard_min": torch.tensor(self.shard_min, dtype=torch.float64),
               "pending_min": torch.tensor(self.pending_min, dtype=torch.float64),
               "retrieved_min": torch.tensor(self.retrieved_min, dtype=torch.float64)}
        if self.merged is not None:
            out["merged"] = self.merged.detach().float().cpu().contiguous()
        shards = [*self.pending, *([self.shard] if self.shard is not None else [])]
        # merged groups of WISE-Retrieve are stored like shards, under their nonzero entries
        groups = [(d != 0, d) for d in self.retrieved]
        named = [("shard" if self.shard is not None and i == len(shards) - 1 else f"pending{i}", s)
                 for i, s in enumerate(shards)] + [(f"retrieved{i}", g) for i, g in enumerate(groups)]
        for name, (mask, delta) in named:
            m = mask.reshape(-1).cpu()
            out[f"{name}_mask"] = pack_mask(m)
            out[f"{name}_values"] = delta.detach().float().reshape(-1).cpu()[m].contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> WiseState:
        shape = tuple(int(x) for x in tensors["shape"].tolist())
        numel = shape[0] * shape[1]

        def dense(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            mask = unpack_mask(tensors[f"{name}_mask"].cpu(), numel)
            values = torch.zeros(numel, dtype=torch.float32)
            values[mask] = tensors[f"{name}_values"].float().cpu()
            return mask.reshape(shape).to(device), values.reshape(shape).to(device)

        def count(prefix: str) -> int:
            return sum(1 for k in tensors if k.startswith(prefix) and k.endswith("_mask"))

        def floats(name: str) -> list[float]:
            return [float(x) for x in tensors[name].tolist()] if name in tensors else []

        pending = [dense(f"pending{i}") for i in range(count("pending"))]
        return cls(shape=(shape[0], shape[1]), count=int(tensors["count"]), merges=int(tensors["merges"]),
                   min_act=float(tensors["min_act"]),
                   merged=tensors["merged"].float().to(device).reshape(shape) if "merged" in tensors else None,
                   pending=pending,
                   shard=dense("shard") if "shard_mask" in tensors else None,
                   retrieve=bool(int(tensors["retrieve"])) if "retrieve" in tensors else False,
                   pending_min=floats("pending_min") or [math.inf] * len(pending),
                   shard_min=float(tensors["shard_min"]) if "shard_min" in tensors else math.inf,
                   retrieved=[dense(f"retrieved{i}")[1] for i in range(count("retrieved"))],
                   retrieved_min=floats("retrieved_min"))

    def memories(self) -> list[torch.Tensor]:
        """The side memories a row can be routed to, in routing order (merged or the
        retrieved groups, pending shards, current shard)."""
        out = [self.merged] if self.merged is not None else []
        out += list(self.retrieved)
        out += [d for _, d in self.pending]
        if self.shard is not None:
            out.append(self.shard[1])
        return out

    def minima(self) -> list[float]:
        """Per memory of :meth:`memories`, the smallest edit score its threshold is taken from:
        WISE-Merge one minimum over every edit, WISE-Retrieve each memory its own edits'."""
        if not self.retrieve:
            return [self.min_act] * len(self.memories())
        return [*self.retrieved_min, *self.pending_min, *([self.shard_min] if self.shard is not None else [])]


# ======================================================================== the wrapper


class WiseWrapper(EditWrapper):
    """The MLP output projection with WISE's side memories and router (module docstring)."""

    kind: ClassVar[str] = "memory"
    mergeable: ClassVar[bool] = False
    wants_attention_mask: ClassVar[bool] = True

    def __init__(self, base: torch.nn.Module, config: dict[str, Any]):
        super().__init__(base, config)
        self.state = WiseState(shape=(0, 0))
        self.memory: list[torch.Tensor] = []
        self.main_only = False                 # compute() reads the main memory through this
        self.last_route: torch.Tensor | None = None    # per row: -1 main, else index into memory
        self._route_batch: int | None = None

    def _device(self) -> torch.device:
        return next(self.base.parameters()).device

    @contextlib.contextmanager
    def main_memory(self):
        """Inside the block every row goes through the main memory (``compute`` reads the
        unedited activations so)."""
        old, self.main_only = self.main_only, True
        try:
            yield self
        finally:
            self.main_only = old

    def wrapper_state(self) -> dict[str, torch.Tensor]:
        return self.state.to_tensors()

    def load_wrapper_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.state = WiseState.from_tensors(tensors, self._device())
        self.memory = self.state.memories()
        self.last_route, self._route_batch = None, None

    @property
    def threshold(self) -> float:
        """The smallest routing threshold of any side memory (WISE-Merge: the one threshold)."""
        t = self.thresholds()
        return float(t.min()) if t.numel() else math.inf

    def thresholds(self) -> torch.Tensor:
        """Per side memory, act_ratio × its minimum edit score (:meth:`WiseState.minima`)."""
        ratio = float(self.config_dict.get("act_ratio", 0.88))
        return torch.tensor([ratio * m for m in self.state.minima()], dtype=torch.float32)

    def scores(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Per row and side memory, the activation score (``(memories, batch)``), and each
        memory's output change ``ΔW a``."""
        changes = [F.linear(x, d.to(device=x.device, dtype=x.dtype)) for d in self.memory]
        if valid is None:
            valid = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        v = valid.to(torch.float32)
        denom = v.sum(-1).clamp_min(1.0)
        s = [(c.float().norm(dim=-1) * v).sum(-1) / denom for c in changes]
        return torch.stack(s) if s else x.new_zeros(0, x.shape[0]), changes

    def _valid(self, x: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        """The current positions that are not padding, and whether the call continues a cached batch."""
        mask = self.attention_mask
        if mask is None or mask.dim() != 2 or mask.shape[0] != x.shape[0] or mask.shape[1] < x.shape[1]:
            return None, False
        return mask[:, -x.shape[1]:].to(x.device) > 0, mask.shape[1] > x.shape[1]

    def keep_rows(self, index: torch.Tensor) -> None:
        """The routes of the rows that go on (a cached step reuses its row's route)."""
        if (self.last_route is not None and self._route_batch == self.last_route.shape[0]
                and index.numel() and int(index.max()) < self._route_batch):
            self.last_route = self.last_route[index.to(self.last_route.device)]
            self._route_batch = int(index.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.main_only or not self.memory or x.dim() != 3:
            return out
        valid, continues = self._valid(x)
        s, changes = self.scores(x, valid)
        if continues and self.last_route is not None and self._route_batch == x.shape[0]:
            route = self.last_route.to(x.device)
        else:
            # a memory competes only where its score reaches its own threshold; the highest wins
            over = s >= self.thresholds().to(s.device)[:, None]
            best, idx = torch.where(over, s, torch.full_like(s, -math.inf)).max(0)
            route = torch.where(over.any(0), idx, torch.full_like(idx, -1))
            self.last_route, self._route_batch = route.detach(), x.shape[0]
        for i, c in enumerate(changes):
            rows = (route == i)[:, None, None]
            out = torch.where(rows, out + c.to(out.dtype), out)
        return out


# ======================================================================== the method


def _seed_int(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()[:8], "little")


def _masked_mean_norm(change: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    v = valid.to(torch.float32)
    return (change.float().norm(dim=-1) * v).sum(-1) / v.sum(-1).clamp_min(1.0)


def _residual_change(norm: nn.Module | None, m0: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a change ``c`` of the projection's output ``m0`` adds to the block's output: ``c``
    itself, or ``norm(m0 + c) − norm(m0)`` where the MLP output reaches the residual stream
    through its own norm (Gemma's post-feed-forward RMSNorm)."""
    if norm is None:
        return lambda c: c
    base = norm(m0)
    return lambda c: norm(m0 + c.to(m0.dtype)) - base


def _hinge_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of the positive entries (0 when none), EasyEdit's way of averaging margins."""
    pos = x > 0
    return (x * pos).sum() / pos.sum() if bool(pos.any()) else x.sum() * 0


@register
class Wise(Method):
    name = "wise"
    kind = "memory"
    description = "WISE: side memories of one MLP output projection behind an activation router (merged by TIES, or retrieved top-1)"
    Params = WiseParams
    batch_native = False

    def __init__(self, loaded, params, ctx=None):
        super().__init__(loaded, params, ctx)
        self._irrelevant: tuple[str, list[tuple[str, str]], list[str]] | None = None

    # --- inputs ------------------------------------------------------------------------
    def _irrelevant_data(self) -> tuple[str, list[tuple[str, str]], list[str]]:
        """The irrelevant-data file, read once: its path; (question + answer, the case's own
        prompt) of every record with an NQ question; its distinct ``subject`` values in file order."""
        if self._irrelevant is None:
            path = self.params.irrelevant_data or str(package_data() / IRRELEVANT_FILE)
            with open(path, encoding="utf-8") as f:
                records = json.load(f)
            pool = [(f"{r['loc']} {r['loc_ans']}".strip(), str(r.get("src", ""))) for r in records
                    if str(r.get("loc", "")).strip()]
            subjects = list(dict.fromkeys(str(r["subject"]).strip() for r in records
                                          if str(r.get("subject", "")).strip()))
            self._irrelevant = (path, pool, subjects)
        return self._irrelevant

    def irrelevant_pool(self) -> list[tuple[str, str]]:
        path, pool, _ = self._irrelevant_data()
        if len(pool) < 2:
            raise ValueError(f"{path}: WISE needs at least two records with 'loc' questions")
        return pool

    def subject_pool(self) -> list[str]:
        path, _, subjects = self._irrelevant_data()
        if len(subjects) < 2:
            raise ValueError(f"{path}: n_subject_swaps needs records with a 'subject'")
        return subjects

    def swapped_texts(self, request: EditRequest, count: int) -> list[str]:
        """``n_subject_swaps`` inputs that ask the edit's question of other subjects: the edit's
        template filled with subjects of the irrelevant-data file (never the edit's own),
        drawn from ``(seed, count, case id, prompt)``.  The model must answer them as before,
        so they teach the router the subject, not the relation (kedit's addition; 0 = the
        paper)."""
        k = self.params.n_subject_swaps
        if k == 0:
            return []
        own = request.subject.strip().casefold()
        subjects = [x for x in self.subject_pool() if x.casefold() != own]
        rng = random.Random(_seed_int("swap", self.ctx.seed, count, request.case_id, request.prompt))
        return [request.template.replace("{}", subjects[i], 1) for i in rng.sample(range(len(subjects)), k)]

    def irrelevant_texts(self, request: EditRequest, count: int) -> list[str]:
        """The irrelevant inputs of edit number ``count``: ``n_irrelevant`` records of the pool
        drawn without replacement from ``(seed, count, case id, prompt)``, never one whose
        question is the edit's prompt."""
        own = request.prompt.strip()
        pool = [text for text, src in self.irrelevant_pool() if src.strip() != own]
        if len(pool) < self.params.n_irrelevant:
            raise ValueError(f"case {request.case_id}: fewer than {self.params.n_irrelevant} irrelevant questions "
                             "other than the case's own")
        rng = random.Random(_seed_int(self.ctx.seed, count, request.case_id, request.prompt))
        return [pool[i] for i in rng.sample(range(len(pool)), self.params.n_irrelevant)]

    def prepare(self) -> None:
        self.adapter.check_layer(self.params.layer)
        self.irrelevant_pool()
        context_templates(self.loaded, self.params.context_template_length_params, seed=self.ctx.seed)

    def shard_mask(self, shard: int, shape: tuple[int, int], device) -> torch.Tensor:
        """The random mask of shard number ``shard`` (each entry with probability mask_ratio)."""
        g = torch.Generator(device="cpu").manual_seed(_seed_int("wise-mask", self.ctx.seed, shard) % (2 ** 63))
        return (torch.rand(shape, generator=g) < self.params.mask_ratio).to(device)

    # --- compute -------------------------------------------------------------------------
    def compute(self, requests: Sequence[EditRequest]) -> ModuleEdit:
        p, model, adapter = self.params, self.loaded.model, self.adapter
        path = adapter.mlp_out_name(p.layer)
        module = model.get_submodule(path)
        wrapper = module if isinstance(module, WiseWrapper) else None
        base = wrapper.base if wrapper is not None else module
        device = base.weight.device
        if wrapper is not None:
            state = WiseState.from_tensors(wrapper.wrapper_state(), device)
        else:
            w = base.weight
            shape = tuple(w.shape) if adapter.spec.weight_layout == "out_in" else tuple(w.shape[::-1])
            state = WiseState(shape=(int(shape[0]), int(shape[1])), retrieve=p.retrieve)
        if state.retrieve != p.retrieve:
            raise ValueError(f"the installed WISE memory was built with retrieve={state.retrieve}, "
                             f"this edit asks for retrieve={p.retrieve}")
        cases = []
        t0 = time.perf_counter()
        with frozen(model), (wrapper.main_memory() if wrapper is not None else contextlib.nullcontext()):
            for r in requests:
                cases.append(self._edit_one(state, r))
        self.ctx.add_time("wise", time.perf_counter() - t0)
        config = {"act_ratio": p.act_ratio}
        spec = WrapperSpec(WiseWrapper, config, state.to_tensors())
        return ModuleEdit({path: spec}, {"method": self.name, "cases": cases, "layer": p.layer,
                                         "count": state.count, "merges": state.merges,
                                         "memories": len(state.memories()),
                                         "threshold": min((p.act_ratio * m for m in state.minima()), default=math.inf)})

    def _rows(self, request: EditRequest, count: int) -> tuple[list[Row], list[Row]]:
        tok = self.loaded.tokenizer
        rows = []
        for tmpl in context_templates(self.loaded, self.params.context_template_length_params, seed=self.ctx.seed):
            pt = encode_prompt_target(tok, fill(tmpl, request.prompt), request.target_new)
            if pt.target_start < 1:
                raise ValueError(f"case {request.case_id}: empty prompt, nothing to condition the target on")
            rows.append(Row(0, pt.input_ids, pt.target_start - 1, pt.target_start, pt.target_end))
        irrelevant = []
        for text in [*self.irrelevant_texts(request, count), *self.swapped_texts(request, count)]:
            ids = tuple(int(t) for t in tok(text)["input_ids"])
            irrelevant.append(Row(0, ids, len(ids) - 1, kind="irrelevant"))
        return rows, irrelevant

    def _edit_one(self, state: WiseState, request: EditRequest) -> dict:
        p, loaded, adapter, model = self.params, self.loaded, self.adapter, self.loaded.model
        device = loaded.device
        alpha, beta, gamma = p.act_margin
        L, n_layers = p.layer, adapter.n_layers
        if state.count % p.save_freq == 0 or state.shard is None:
            state.shard = (self.shard_mask(state.count // p.save_freq, state.shape, device),
                           torch.zeros(state.shape, dtype=torch.float32, device=device))
        mask, start_delta = state.shard

        rows, irrelevant = self._rows(request, state.count)
        all_rows = [*rows, *irrelevant]
        ids, attn = batch_tensors(all_rows, pad_id(loaded.tokenizer), device)
        valid = attn.bool()
        n = len(rows)

        # One pass through the main memory: the projection's input for every row, its output
        # and the residual stream leaving block L (edit rows), and a block output's structure.
        block = adapter.block(L)
        structure: list = []
        hook = block.register_forward_hook(lambda _m, _a, out: structure.append(out) if not structure else None)
        try:
            with torch.no_grad(), record({"a": adapter.mlp_out(L)}, inputs=True) as seen_in, \
                    record({"m": adapter.mlp_out(L)}, inputs=False) as seen_mlp, \
                    record({"h": block}, inputs=False, stop_after=block) as seen_out:
                run_until_stopped(lambda: model(input_ids=ids, attention_mask=attn, use_cache=False))
        finally:
            hook.remove()
        acts = seen_in["a"].float()
        a_edit, a_irr = acts[:n], acts[n:]
        h0 = seen_out["h"][:n]
        residual_change = _residual_change(adapter.mlp_out_norm(L), seen_mlp["m"][:n])
        ids_e, attn_e, valid_e, valid_i = ids[:n], attn[:n], valid[:n], valid[n:]

        rix, pos, lab = [], [], []
        for i, r in enumerate(rows):
            for t in range(r.target_start, r.target_end):
                rix.append(i)
                pos.append(t - 1)
                lab.append(r.ids[t])
        rix_t = torch.tensor(rix, device=device)
        pos_t = torch.tensor(pos, device=device)
        lab_t = torch.tensor(lab, device=device)
        per_row = torch.zeros(n, device=device).index_add(0, rix_t, torch.ones(len(rix), device=device))
        blocks = [adapter.block(i) for i in range(min(L + 2, n_layers))]
        last = adapter.block(n_layers - 1)
        norm, head = adapter.final_norm(), adapter.lm_head()

        def nll(h: torch.Tensor) -> torch.Tensor:
            if L < n_layers - 1:
                with replay_from(blocks, lambda: h, structure[0]), \
                        record({"h": last}, inputs=False, stop_after=last, detach=False) as seen:
                    run_until_stopped(lambda: model(input_ids=ids_e, attention_mask=attn_e, use_cache=False))
                h = seen["h"]
            logp = torch.log_softmax(head(norm(h[rix_t, pos_t])).float(), dim=-1)
            tok_nll = -logp.gather(-1, lab_t[:, None])[:, 0]
            return (torch.zeros(n, device=device).index_add(0, rix_t, tok_nll) / per_row).mean()

        delta = start_delta.clone().requires_grad_(True)
        maskf = mask.to(torch.float32)
        history: list[float] = []
        trace: list[list[float]] = []          # per step: NLL, mean edit score, irrelevant score
        steps = 0
        first = None
        for it in range(p.n_iter + 1):
            change_e = F.linear(a_edit, delta)
            s_e = _masked_mean_norm(change_e, valid_e)
            s_i = _masked_mean_norm(F.linear(a_irr, delta), valid_i)
            loss_nll = nll(h0 + residual_change(change_e).to(h0.dtype))
            loss_act = (_hinge_mean(s_i - alpha) + _hinge_mean(beta - s_e)
                        + _hinge_mean(gamma - (s_e[:, None] - s_i[None, :])))
            loss = loss_nll + loss_act
            history.append(float(loss.detach()))
            trace.append([round(float(loss_nll.detach()), 4), round(float(s_e.detach().mean()), 3),
                          round(float(s_i.detach().mean()), 3)])
            if first is None:
                first = {"loss": history[0], "nll": float(loss_nll.detach()), "act_edit": float(s_e.detach().mean()),
                         "act_irrelevant": float(s_i.detach().mean())}
            done = (len(history) > 1 and history[-1] <= p.early_stop_loss
                    and abs(history[-1] - history[-2]) <= p.early_stop_delta)
            if done or steps == p.n_iter:
                break
            grad, = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                if p.weight_decay:
                    grad = grad + p.weight_decay * delta
                delta -= p.edit_lr * grad * maskf
                if p.norm_constraint is not None:
                    delta.clamp_(-p.norm_constraint, p.norm_constraint)
            steps += 1
        delta = delta.detach()
        with torch.no_grad():
            act_edit = float(_masked_mean_norm(F.linear(a_edit, delta), valid_e).mean())
            act_irr = float(_masked_mean_norm(F.linear(a_irr, delta), valid_i).mean())
        state.shard = (mask, delta)
        state.min_act = min(state.min_act, act_edit)
        state.shard_min = min(state.shard_min, act_edit)
        shard_no = state.count // p.save_freq
        state.count += 1
        merged_now = False
        if state.count % p.save_freq == 0:
            state.pending.append(state.shard)
            state.pending_min.append(state.shard_min)
            state.shard, state.shard_min = None, math.inf
        if p.merge_freq is not None and state.count % p.merge_freq == 0 and state.pending:
            shards = [d for _, d in state.pending]
            k = len(shards)
            if state.retrieve:
                # EasyEdit's WISE-Retrieve: the group becomes one more memory, with the
                # smallest score of its edits for its threshold
                state.retrieved.append(ties_merge(shards, [p.weights / k] * k, p.densities))
                state.retrieved_min.append(min(state.pending_min))
            elif state.merged is None:
                state.merged = ties_merge(shards, [p.weights / k] * k, p.densities)
            else:
                state.merged = ties_merge([*shards, state.merged],
                                          [LATER_MERGE_SHARDS / k] * k + [LATER_MERGE_MERGED], p.densities)
            state.pending, state.pending_min = [], []
            state.merges += 1
            merged_now = True
        thresholds = [p.act_ratio * m for m in state.minima()]
        return {"case_id": request.case_id, "steps": steps, "loss_start": first["loss"], "loss": history[-1],
                "nll": float(loss_nll.detach()), "act_edit_start": first["act_edit"], "act_edit": act_edit,
                "act_irrelevant": act_irr, "threshold": min(thresholds, default=math.inf), "shard": shard_no,
                "edit_number": state.count, "merged": merged_now, "trace": trace}
