"""LoRA and AdaLoRA: the edit is a trained low-rank adapter on chosen projections (kind ``adapter``).

The definitions
---------------
**LoRA** (Hu et al. 2021).  A frozen projection ``h = W₀x`` gets a trainable low-rank
update ``h = W₀x + (α/r) B A x`` with ``A ∈ R^{r×k}`` (peft: Kaiming-uniform init) and
``B ∈ R^{d×r}`` (zero init, so training starts from the unedited model); only ``A`` and
``B`` are trained.

**AdaLoRA** (Zhang et al. 2023).  The update is held in SVD form, ``ΔW = P Λ Q`` with
``P ∈ R^{d×r}`` (peft's ``lora_B``), ``Λ = diag(λ)`` (``lora_E``, zero init) and
``Q ∈ R^{r×k}`` (``lora_A``), and the rank is *allocated* during training: each triplet
``(Pᵢ, λᵢ, Qᵢ)`` gets an importance ``Sᵢ = s(λᵢ) + mean_j s(P_jᵢ) + mean_j s(Q_ij)``, where
for every entry ``w`` the sensitivity ``I = |w ∂L/∂w|`` is smoothed
``Ī ← β₁Ī + (1−β₁)I``, its uncertainty ``Ū ← β₂Ū + (1−β₂)|I − Ī|``, and ``s = Ī·Ū``.  After
each optimiser step (every ``delta_t`` steps) the λ of the least important triplets are
set to 0 so that the number of non-zero λ meets the budget
``b(t) = b_T + (b₀ − b_T)(1 − (t − t_i)/(T − t_i − t_f))³`` (``b₀`` = ``init_rank`` per
module, ``b_T`` = ``rank`` per module on average; ``b₀`` for ``t ≤ tinit``).  The loss adds
the orthogonality regulariser ``γ R`` with ``R = mean over all P and Q of ‖PᵀP − I‖_F
and ‖QQᵀ − I‖_F`` (peft's form: Frobenius norms, not squared as in the paper).  peft
applies ``ΔW = B (A ⊙ E) · α / (r₀ + 1e-5)`` with ``r₀ = init_rank`` (``ranknum``, fixed).

The objective (both variants): the teacher-forced NLL of the new target given the
prompt, prompt tokens masked, averaged over each request's target tokens and then over
the requests of the batch:
``L = (1/N) Σᵢ (1/mᵢ) Σⱼ −log p(tᵢⱼ | promptᵢ, tᵢ,<ⱼ)`` (+ ``γR`` for AdaLoRA).  The target
positions come from tokenising prompt + target together (``kedit.models.tokens``: one
space between them, as the evaluation scores them); rows are right-padded.

Training goes through ``peft``: ``get_peft_model`` injects the adapter (``LoraConfig`` /
``AdaLoraConfig`` with ``total_step = num_steps``) into the model, Adam (``lr``,
``weight_decay``) runs ``num_steps`` steps, AdaLoRA's ``update_and_allocate(step)`` is
called after every optimiser step (steps 0 .. T−1, as peft's examples count them), the
trained factors are read out, and ``unload()`` gives the model back: afterwards every
module, parameter and buffer is the same object with the same data (checked: a module
tree, ``id``/``data_ptr``/``_version`` of every tensor and the model's attributes are
compared, an error otherwise).  Dropout (``lora_dropout``) acts on the adapter's input
during training only; the model itself runs in eval mode as EasyEdit's does.  The
dropout masks and a fresh adapter's initialisation are drawn from a generator seeded by
``ctx.seed`` and the number of steps the adapter has been trained so far, inside a
forked RNG: the caller's random state is untouched and a run is reproducible (CPU).

**Early stop** (``early_stop_loss``, kedit's addition; EasyEdit always takes ``num_steps``
steps): before each step the batch's target NLL (dropout on, regulariser excluded) is
compared with the threshold, and training ends when it is below.  For AdaLoRA the budget
schedule still spans ``num_steps``, so an early stop leaves the rank where the schedule was
(between ``init_rank`` and ``rank``).  ``meta["loss_history"]`` holds that NLL before each
step.

The edit
--------
A :class:`~kedit.methods.edit.ModuleEdit` that puts a :class:`LoraWrapper` (kind
``adapter``, mergeable) around each adapted projection.  The wrapper computes at
inference exactly what peft's layer computes in eval mode -- ``base(x) + (x Aᵀ Bᵀ)·α/r``
(LoRA) or ``base(x) + (x (A⊙E)ᵀ Bᵀ)·α/(r₀+1e-5)`` (AdaLoRA), in the same order of
operations -- and :meth:`LoraWrapper.merged_weight_delta` gives the same update as an
additive weight change in the parameter's own layout (``(out, in)`` for ``nn.Linear``,
``(in, out)`` for GPT-2's ``Conv1D``; the layout stated by ``kedit.models.arch``, checked
against peft's own ``fan_in_fan_out`` detection), so ``kedit apply`` exports a plain model.

**Sequential editing.**  The edit holds the whole adapter (``cumulative``).  When the model
already carries this method's wrappers (a sequential run, or a resumed one), ``compute``
takes their factors out of the model and starts peft's adapter from them: one adapter is
trained across the edits, as EasyEdit keeps training its ``peft_model``.  Each ``compute``
makes a new Adam optimiser (as EasyEdit does per call) and, for AdaLoRA, a new budget
schedule over its ``num_steps`` and fresh importance averages: triplets pruned by an
earlier edit can come back while the budget is above the target.

Module paths
------------
``target_modules: null`` (default) adapts the attention's query and value projections of
every layer in ``layers`` (``[]``: all layers).  ``kedit.models.arch`` names each layer's
attention module but not its projections, so this module looks among the attention's
children for ``q_proj`` + ``v_proj`` (LLaMA, Mistral, Qwen2, GPT-J) or, where query, key and
value are one fused projection, ``c_attn`` (GPT-2) or ``query_key_value`` (GPT-NeoX): on a
fused projection the adapter covers q, k and v together (as EasyEdit's GPT-2 XL file and
peft's defaults do).  A list of names instead adapts every module of each block whose
path ends with one of them (e.g. ``[up_proj, down_proj]``).

Where EasyEdit differs, and what is followed
--------------------------------------------
* **The loss mask.**  EasyEdit masks ``num_prompt_tokens`` labels after the padding, which
  is right only with left padding, and counts the prompt's tokens by tokenising the
  prompt alone (wrong where BPE merges across the boundary).  kedit takes the target
  positions from the joint tokenisation; for one request without padding the two agree.
* **The rank allocator.**  EasyEdit never calls ``update_and_allocate`` (and its peft did
  not ask for ``total_step``), so its AdaLoRA keeps rank ``init_r`` = 12 everywhere and is
  an SVD-parametrised LoRA with the orthogonality term.  kedit runs the allocator as peft
  and the paper require; ``rank_allocation: false`` reproduces EasyEdit's behaviour.
* **``rank``.**  EasyEdit passes ``rank: 8`` as peft's ``r``, which AdaLoRA ignores (it uses
  ``init_r`` 12 and ``target_r`` 8, peft's defaults).  kedit's ``rank`` is LoRA's ``r`` and
  AdaLoRA's ``target_r``; ``init_rank`` (12) is AdaLoRA's ``init_r``: the same numbers.
* **Batches.**  EasyEdit averages the NLL over all target tokens of a chunk; kedit
  averages per request, then over requests (each fact weighs the same).  For one request
  they agree.  The orthogonality term is peft's (EasyEdit gets it through ``loss`` with
  labels; kedit adds it to its own loss, same definition and weight).
* EasyEdit enables gradient checkpointing (memory only; no effect on the result).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from kedit.methods.base import EditRequest, Method, ModuleEdit
from kedit.methods.core.keys import batch_tensors, pad_id
from kedit.methods.edit import EditError, EditWrapper, WrapperSpec
from kedit.methods.finetune.ft import edit_rows, loss_terms, per_row_loss
from kedit.config import ConfigError
from kedit.methods.registry import register
from kedit.models.hooks import frozen

Variant = Literal["adalora", "lora"]

#: Query/value projections as children of an attention module, in order of preference:
#: separate q and v (LLaMA, Mistral, Qwen2, GPT-J), else the fused qkv projection.
QV_PROJECTIONS: tuple[tuple[str, ...], ...] = (("q_proj", "v_proj"), ("c_attn",), ("query_key_value",))
ADAPTER_NAME = "default"
RANKNUM_EPS = 1e-5  # peft's AdaLoRA divides by ranknum + 1e-5


@dataclass(frozen=True)
class LoraParams:
    LAYER_KEY: ClassVar[str] = "layers"

    variant: Variant = "adalora"
    layers: tuple[int, ...] = ()                   # () = every layer (EasyEdit's `layers: []`)
    target_modules: tuple[str, ...] | None = None  # None: the attention's query and value projections
    rank: int = 8                  # LoRA's r; AdaLoRA's target_r (average final rank)
    init_rank: int = 12            # AdaLoRA's init_r (peft's default; EasyEdit's effective value)
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lr: float = 5e-3
    weight_decay: float = 0.0
    num_steps: int = 70
    early_stop_loss: float | None = None  # stop once the batch's target NLL is below it (EasyEdit: never)
    # AdaLoRA only
    rank_allocation: bool = True   # false: never prune (EasyEdit's behaviour)
    orth_reg_weight: float = 0.5
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    # EasyEdit keys with one accepted value (kedit's LoRA has no KL term and no norm bound)
    kl_factor: float = 0.0
    norm_constraint: float | None = None

    def check(self) -> str | None:
        if len(set(self.layers)) != len(self.layers):
            return f"key 'layers': repeated layer in {list(self.layers)}"
        if self.target_modules is not None and not self.target_modules:
            return "key 'target_modules': give at least one name, or null for the attention's q and v"
        if self.rank < 1:
            return "key 'rank': must be >= 1"
        if self.variant == "adalora" and not self.rank <= self.init_rank:
            return f"key 'rank': AdaLoRA's target rank {self.rank} must not exceed init_rank {self.init_rank}"
        if self.lora_alpha <= 0:
            return "key 'lora_alpha': must be > 0"
        if not 0 <= self.lora_dropout < 1:
            return "key 'lora_dropout': must be in [0, 1)"
        if self.lr <= 0:
            return "key 'lr': must be > 0"
        if self.weight_decay < 0:
            return "key 'weight_decay': must be >= 0"
        if self.num_steps < 1:
            return "key 'num_steps': must be >= 1"
        if self.early_stop_loss is not None and self.early_stop_loss <= 0:
            return "key 'early_stop_loss': must be > 0 (or null: always num_steps steps)"
        if self.orth_reg_weight < 0:
            return "key 'orth_reg_weight': must be >= 0"
        if self.variant == "adalora" and not 0 <= self.tinit < self.num_steps - self.tfinal:
            return (f"keys 'tinit'/'tfinal': AdaLoRA needs 0 <= tinit < num_steps - tfinal "
                    f"(got {self.tinit}, {self.tfinal}, num_steps {self.num_steps})")
        if self.delta_t < 1:
            return "key 'delta_t': must be >= 1"
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            return "keys 'beta1'/'beta2': must be in (0, 1)"
        if self.kl_factor != 0:
            return "key 'kl_factor': kedit's LoRA has no KL term; only 0 is accepted"
        if self.norm_constraint is not None:
            return "key 'norm_constraint': kedit's LoRA has no norm bound; only null (EasyEdit: false)"
        return None


# ======================================================================== the wrapper


class LoraWrapper(EditWrapper):
    """``base(x)`` plus a trained low-rank update, as peft's layer computes it in eval mode.

    Config: ``variant`` (``lora`` | ``adalora``), ``rank`` (rows of A), ``scaling`` (LoRA:
    α/r; AdaLoRA: α, divided by ``ranknum + 1e-5`` at use), ``layout`` of the base weight
    (``out_in`` | ``in_out``), ``steps`` (optimiser steps this adapter has had in all).
    Tensors: ``lora_A`` (r, in), ``lora_B`` (out, r); AdaLoRA also ``lora_E`` (r, 1) and
    ``ranknum`` (1,).  The tensors are non-persistent buffers: they follow the model's
    ``.to()`` but never enter its ``state_dict``.
    """

    kind: ClassVar[str] = "adapter"
    mergeable: ClassVar[bool] = True
    TENSORS: ClassVar[dict[str, tuple[str, ...]]] = {"lora": ("lora_A", "lora_B"),
                                                     "adalora": ("lora_A", "lora_B", "lora_E", "ranknum")}

    def __init__(self, base: torch.nn.Module, config: dict[str, Any]):
        super().__init__(base, config)
        self._check_config(self.config_dict)
        for name in self.TENSORS["adalora"]:
            self.register_buffer(name, None, persistent=False)

    @staticmethod
    def _check_config(config: dict[str, Any]) -> None:
        if config.get("variant") not in LoraWrapper.TENSORS or config.get("layout") not in ("out_in", "in_out"):
            raise EditError(f"LoraWrapper config needs variant lora|adalora and layout out_in|in_out, got {config}")

    def set_config(self, config: dict[str, Any]) -> None:
        self._check_config(config)
        super().set_config(config)

    @property
    def variant(self) -> str:
        return self.config_dict["variant"]

    def wrapper_state(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.TENSORS[self.variant]}

    def load_wrapper_state(self, tensors: dict[str, torch.Tensor]) -> None:
        names = self.TENSORS[self.variant]
        if set(tensors) != set(names):
            raise EditError(f"a {self.variant} adapter needs tensors {list(names)}, got {sorted(tensors)}")
        device = next(self.base.parameters()).device
        for n in self.TENSORS["adalora"]:
            setattr(self, n, tensors[n].to(device) if n in tensors else None)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's output for ``x`` (no dropout), in the factors' dtype."""
        x = x.to(self.lora_A.dtype)
        if self.variant == "adalora":
            return (x @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.config_dict["scaling"] / (
                self.ranknum + RANKNUM_EPS)
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.config_dict["scaling"]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base(x, *args, **kwargs)
        if self.variant == "adalora":     # peft's SVDLinear: in place, the result keeps its dtype
            result += self.update(x)
            return result
        dtype = result.dtype              # peft's lora.Linear: out of place, cast back
        return (result + self.update(x)).to(dtype)

    def weight_delta_out_in(self) -> torch.Tensor:
        """ΔW as ``(out, in)``, float32 at least."""
        a, b = self.lora_A, self.lora_B
        if a.dtype in (torch.float16, torch.bfloat16):
            a, b = a.float(), b.float()
        if self.variant == "adalora":
            e = self.lora_E.to(a.dtype)
            return b @ (a * e) * self.config_dict["scaling"] / (self.ranknum.to(a.dtype) + RANKNUM_EPS)
        return (b @ a) * self.config_dict["scaling"]

    def merged_weight_delta(self) -> dict[str, torch.Tensor]:
        d = self.weight_delta_out_in()
        if self.config_dict["layout"] == "in_out":
            d = d.T.contiguous()
        w = self.base.weight
        if tuple(d.shape) != tuple(w.shape):
            raise EditError(f"adapter update of shape {tuple(d.shape)} does not fit weight {tuple(w.shape)}")
        return {"weight": d.to(w.dtype)}


# ======================================================================== the method


def _parent(model: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str]:
    parent, _, attr = path.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


@contextmanager
def _bases_in_place(model: torch.nn.Module, wrappers: dict[str, LoraWrapper]):
    """Inside, each of ``wrappers`` is replaced by its base module; put back after."""
    for path, w in wrappers.items():
        parent, attr = _parent(model, path)
        setattr(parent, attr, w.base)
    try:
        yield
    finally:
        for path, w in wrappers.items():
            parent, attr = _parent(model, path)
            setattr(parent, attr, w)


def _fingerprint(model: torch.nn.Module) -> tuple:
    """What must come back unchanged: the module tree, every tensor's identity, storage and
    version counter (an in-place write bumps it), the training flags and the attributes.  An
    offloaded module's tensors (``meta``: accelerate puts its weights in for each call and
    takes them out again) count only by name."""
    tensors = [(n, "meta") if t.device.type == "meta" else (n, id(t), t.data_ptr(), t._version) for n, t in
               [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]]
    return ([(n, id(m), m.training) for n, m in model.named_modules()], tensors, sorted(model.__dict__))


@contextmanager
def _rng(seed: int, device: torch.device):
    devices = [device] if device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else None):
        torch.manual_seed(seed)
        yield


@register
class LoRA(Method):
    name = "lora"
    kind = "adapter"
    description = "LoRA / AdaLoRA adapter (peft) on the attention's q and v, loss on the target tokens"
    Params = LoraParams
    batch_native = False

    # --- where -------------------------------------------------------------------
    def target_paths(self) -> list[str]:
        """Module paths of the projections the adapter covers, layer by layer."""
        p, adapter, model = self.params, self.adapter, self.loaded.model
        layers = p.layers or tuple(range(adapter.n_layers))
        paths: list[str] = []
        for layer in layers:
            adapter.check_layer(layer)
            if p.target_modules is None:
                attn_path = adapter.module_path("attn", layer)
                children = dict(adapter.attn(layer).named_children())
                group = next((g for g in QV_PROJECTIONS if all(n in children for n in g)), None)
                if group is None:
                    raise EditError(f"cannot find the query/value projections of {attn_path} "
                                    f"(children: {', '.join(children)}); set target_modules")
                paths += [f"{attn_path}.{n}" for n in group]
            else:
                block_path = adapter.block_name(layer)
                found = [rel for rel, _ in adapter.block(layer).named_modules()
                         if rel and any(rel == t or rel.endswith("." + t) for t in p.target_modules)]
                found = [rel for rel in found if not any(rel.startswith(o + ".") for o in found)]
                missing = [t for t in p.target_modules if not any(rel == t or rel.endswith("." + t) for rel in found)]
                if missing:
                    raise EditError(f"block {block_path} has no module named {', '.join(missing)}")
                paths += [f"{block_path}.{rel}" for rel in found]
        for path in paths:
            m = model.get_submodule(path)
            base = m.base if isinstance(m, LoraWrapper) else m
            if not hasattr(base, "weight") or base.weight.dim() != 2:
                raise EditError(f"module '{path}' ({type(base).__name__}) is not a linear projection")
            if base.weight.device.type == "meta":
                raise EditError(f"module '{path}' is offloaded by the device map (its weights are loaded only "
                                "for each call) and cannot carry an adapter: put its layer on a device, or "
                                "name the layers to adapt with 'layers'")
        return paths

    def check(self) -> None:
        """The projections ``layers`` and ``target_modules`` name exist, are linear, and are not
        offloaded by a device map."""
        try:
            self.target_paths()
        except EditError as e:
            raise ConfigError(f"key 'target_modules': {e}") from None

    def prepare(self) -> None:
        self.target_paths()  # module names and layers checked before any case is evaluated

    def peft_config(self, paths: Sequence[str]):
        """The peft config this method trains with (exact module paths as targets)."""
        from peft import AdaLoraConfig, LoraConfig, TaskType

        p = self.params
        common = dict(task_type=TaskType.CAUSAL_LM, inference_mode=False, lora_alpha=p.lora_alpha,
                      lora_dropout=p.lora_dropout, target_modules=list(paths),
                      fan_in_fan_out=self.adapter.spec.weight_layout == "in_out", bias="none")
        if p.variant == "lora":
            return LoraConfig(r=p.rank, **common)
        return AdaLoraConfig(init_r=p.init_rank, target_r=p.rank, tinit=p.tinit, tfinal=p.tfinal,
                             deltaT=p.delta_t, beta1=p.beta1, beta2=p.beta2, orth_reg_weight=p.orth_reg_weight,
                             total_step=p.num_steps, **common)

    def wrapper_config(self, steps: int) -> dict[str, Any]:
        p = self.params
        rank = p.rank if p.variant == "lora" else p.init_rank
        scaling = p.lora_alpha / p.rank if p.variant == "lora" else p.lora_alpha  # peft's `scaling`
        return {"variant": p.variant, "rank": rank, "scaling": float(scaling),
                "layout": self.adapter.spec.weight_layout, "steps": int(steps)}

    def installed(self, paths: Sequence[str]) -> dict[str, LoraWrapper]:
        """This method's wrappers already in the model (a sequential run), checked against the settings."""
        model, out = self.loaded.model, {}
        want = self.wrapper_config(0)
        for path in paths:
            m = model.get_submodule(path)
            if isinstance(m, LoraWrapper):
                have = m.config_dict
                if any(have[k] != want[k] for k in ("variant", "rank", "scaling", "layout")):
                    raise EditError(f"module '{path}' holds a {have['variant']} adapter (rank {have['rank']}, "
                                    f"scaling {have['scaling']}); these settings train a {want['variant']} adapter "
                                    f"(rank {want['rank']}, scaling {want['scaling']})")
                out[path] = m
            elif isinstance(m, EditWrapper):
                raise EditError(f"module '{path}' already holds a {type(m).__name__}; a LoRA adapter cannot go there")
        if out and len(out) != len(paths):
            raise EditError(f"the model holds adapters at {len(out)} of the {len(paths)} modules these settings adapt")
        return out

    # --- the edit ----------------------------------------------------------------
    def compute(self, requests: Sequence[EditRequest]) -> ModuleEdit:
        from peft import get_peft_model

        p, model = self.params, self.loaded.model
        requests = list(requests)
        paths = self.target_paths()
        if not requests:
            return ModuleEdit({}, {"method": self.name, "cases": []})
        t0 = time.perf_counter()
        current = self.installed(paths)
        steps_before = max((int(w.config_dict.get("steps", 0)) for w in current.values()), default=0)
        device = self.loaded.device if isinstance(self.loaded.device, torch.device) else torch.device(self.loaded.device)

        rows = edit_rows(self.loaded.tokenizer, requests)
        ids, mask = batch_tensors(rows, pad_id(self.loaded.tokenizer), device)
        terms, weights = loss_terms(rows, "target_new", ids.device)

        before = _fingerprint(model)
        history: list[float] = []
        with _bases_in_place(model, current):
            inner = _fingerprint(model)
            with _rng(self.ctx.seed * 1_000_003 + steps_before, device), frozen(model):
                flags = {n: m.training for n, m in model.named_modules()}
                model.eval()
                with warnings.catch_warnings():  # transformers' deprecation note on an attribute peft reads
                    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                    peft_model = get_peft_model(model, self.peft_config(paths))
                try:
                    layers = {path: peft_model.base_model.model.get_submodule(path) for path in paths}
                    self._check_layers(layers)
                    if current:
                        self._load_factors(layers, current)
                    for layer in layers.values():
                        layer.lora_dropout[ADAPTER_NAME].train()

                    def row_losses() -> torch.Tensor:
                        logits = peft_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                        return per_row_loss(logits, terms, weights, len(rows))

                    params = [q for q in peft_model.parameters() if q.requires_grad]
                    opt = torch.optim.Adam(params, lr=p.lr, weight_decay=p.weight_decay)
                    first, steps = None, 0
                    for step in range(p.num_steps):
                        opt.zero_grad(set_to_none=True)
                        per_row = row_losses()
                        first = per_row.detach().cpu().tolist() if first is None else first
                        nll = per_row.mean()
                        history.append(nll.item())
                        if p.early_stop_loss is not None and nll.item() < p.early_stop_loss:
                            break
                        loss = nll
                        if p.variant == "adalora" and p.orth_reg_weight > 0:
                            loss = loss + p.orth_reg_weight * self._orth_reg(layers)
                        loss.backward()
                        opt.step()
                        if p.variant == "adalora" and p.rank_allocation:
                            peft_model.base_model.update_and_allocate(step)
                        steps += 1
                    for layer in layers.values():
                        layer.lora_dropout[ADAPTER_NAME].eval()
                    with torch.no_grad():
                        final = row_losses().cpu().tolist()
                    factors = self._read_factors(layers)
                finally:
                    peft_model.base_model.unload()
                    for n, m in model.named_modules():
                        m.training = flags[n]
            if _fingerprint(model) != inner:
                raise RuntimeError("peft did not give the model back unchanged after training the adapter")
        if _fingerprint(model) != before:
            raise RuntimeError("the model's adapters were not put back after training")

        seconds = time.perf_counter() - t0
        self.ctx.add_time("finetune", seconds)
        config = self.wrapper_config(steps_before + steps)
        modules = {path: WrapperSpec(LoraWrapper, dict(config), factors[path]) for path in paths}
        ranks = [int((f["lora_E"] != 0).sum()) if "lora_E" in f else int(f["lora_A"].shape[0])
                 for f in factors.values()]
        mean_rank = sum(ranks) / len(ranks)
        cases = [{"case_id": r.case_id, "steps": steps, "loss_start": first[i], "loss": final[i],
                  "mean_rank": mean_rank} for i, r in enumerate(requests)]
        return ModuleEdit(modules, {"method": self.name, "variant": p.variant, "cases": cases, "modules": len(paths),
                                    "adapter_steps": steps_before + steps, "loss_history": history})

    # --- peft's layers -----------------------------------------------------------
    def _check_layers(self, layers: dict[str, torch.nn.Module]) -> None:
        want = self.adapter.spec.weight_layout == "in_out"
        for path, layer in layers.items():
            if not hasattr(layer, "lora_A") or ADAPTER_NAME not in layer.lora_A:
                raise RuntimeError(f"peft did not put an adapter on '{path}'")
            if bool(layer.fan_in_fan_out) != want:
                raise EditError(f"'{path}': peft sees fan_in_fan_out={layer.fan_in_fan_out}, but kedit.models.arch "
                                f"states the {self.adapter.spec.family} layout as {self.adapter.spec.weight_layout}")

    def _read_factors(self, layers: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for path, layer in layers.items():
            a, b = layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]
            if self.params.variant == "lora":   # nn.Linear modules
                out[path] = {"lora_A": a.weight.detach().clone(), "lora_B": b.weight.detach().clone()}
            else:                               # AdaLoRA: bare parameters
                out[path] = {"lora_A": a.detach().clone(), "lora_B": b.detach().clone(),
                             "lora_E": layer.lora_E[ADAPTER_NAME].detach().clone(),
                             "ranknum": layer.ranknum[ADAPTER_NAME].detach().clone()}
        return out

    def _load_factors(self, layers: dict[str, torch.nn.Module], current: dict[str, LoraWrapper]) -> None:
        """Start peft's adapter from the installed wrappers' factors."""
        with torch.no_grad():
            for path, layer in layers.items():
                state = current[path].wrapper_state()
                if self.params.variant == "lora":
                    targets = {"lora_A": layer.lora_A[ADAPTER_NAME].weight, "lora_B": layer.lora_B[ADAPTER_NAME].weight}
                else:
                    targets = {"lora_A": layer.lora_A[ADAPTER_NAME], "lora_B": layer.lora_B[ADAPTER_NAME],
                               "lora_E": layer.lora_E[ADAPTER_NAME], "ranknum": layer.ranknum[ADAPTER_NAME]}
                for name, t in targets.items():
                    if tuple(t.shape) != tuple(state[name].shape):
                        raise EditError(f"'{path}': installed {name} has shape {tuple(state[name].shape)}, "
                                        f"peft's has {tuple(t.shape)}")
                    t.copy_(state[name])

    @staticmethod
    def _orth_reg(layers: dict[str, torch.nn.Module]) -> torch.Tensor:
        """AdaLoRA's orthogonality term as peft computes it: the mean over all P (lora_B) and
        Q (lora_A) of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F."""
        terms = []
        for layer in layers.values():
            a, b = layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]
            for cov in (a @ a.T, b.T @ b):
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype,
                                                                      device=cov.device)))
        return torch.stack(terms).mean()
