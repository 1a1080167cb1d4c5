"""What an edit is: one contract for every kind of edit.

An :class:`Edit` changes a model in place at named *sites* and can be taken out again:

* ``apply(model)`` captures the state of every site it touches, then installs itself;
* ``revert(model)`` restores those captured states -- copies put back, modules put back
  (the same objects), never arithmetic -- so the model is bit-identical afterwards;
* ``save(path)`` / ``Edit.load(path)``: one safetensors file, tensors plus JSON metadata
  (never pickle);
* sequential runs compose edits by applying them in order; a site's state can be
  captured and restored on its own (:meth:`Edit.capture` / :meth:`Edit.restore`), which
  is what a resumable run checkpoints and what the runner uses to give the model back.

The kinds (``Edit.kind``), each a class here:

========== =================== ============================================================
kind       class               what it changes
========== =================== ============================================================
weights    :class:`Delta`      parameters, additively (ROME, MEMIT, FT ...); mergeable
adapter    :class:`ModuleEdit` a module wrapped by trained low-rank factors (LoRA); mergeable
memory     :class:`ModuleEdit` a module wrapped by its own tensors and a router (GRACE, WISE)
context    :class:`ContextEdit` tokens put before every input (IKE); no weights change
========== =================== ============================================================

Sites are strings: ``weight:<parameter name>``, ``module:<module path>``, ``context``.
An edit is active wherever the model is called -- teacher-forced scoring, ``generate()``,
padded batches -- because it lives in the model (weights, submodules, the forward).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from kedit.models.cache import cache_arg, cache_of, drop_cache, is_fresh, new_cache, takes_cache


class EditError(ValueError):
    """An edit that cannot be applied, read or merged as asked (one-line message)."""


@dataclass
class SiteState:
    """The state of one site: tensors plus JSON-able facts (``{"absent": True}`` = nothing
    of kedit's is installed there)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def import_class(path: str) -> type:
    """The edit or wrapper class a saved file names.  kedit's own modules are imported; any
    other module must already be imported (a file never makes kedit import code), and the
    class must be an :class:`Edit` or :class:`EditWrapper`."""
    import sys

    module, _, name = path.partition(":")
    if not module or not name:
        raise EditError(f"'{path}' is not a class path (module:Class)")
    own = module == "kedit" or module.startswith("kedit.")
    if not own and module not in sys.modules:
        raise EditError(f"refusing to import '{module}' for class '{path}' (only kedit's own classes are imported)")
    try:
        obj: Any = importlib.import_module(module) if own else sys.modules[module]
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise EditError(f"unknown edit class '{path}'") from None
    if not (isinstance(obj, type) and issubclass(obj, (Edit, EditWrapper))):
        raise EditError(f"'{path}' is not an edit or wrapper class")
    return obj


def _clone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


class Edit:
    """Base class of every kind of edit (see the module docstring)."""

    kind: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False
    #: True when the edit holds the whole state of its sites (not an increment): of a
    #: sequence of such edits on the same sites, the last one alone gives the final model.
    cumulative: ClassVar[bool] = False

    def __init__(self, meta: dict[str, Any] | None = None):
        self.meta: dict[str, Any] = dict(meta or {})
        self._before: dict[str, SiteState] | None = None

    # --- what a kind defines ------------------------------------------------------
    def sites(self) -> list[str]:
        raise NotImplementedError

    @classmethod
    def capture(cls, model: torch.nn.Module, site: str) -> SiteState:
        """The current state of ``site`` in ``model`` (copies, safe to keep)."""
        raise NotImplementedError

    @classmethod
    def restore(cls, model: torch.nn.Module, site: str, state: SiteState) -> None:
        """Put ``site`` back to ``state`` (exactly)."""
        raise NotImplementedError

    def install(self, model: torch.nn.Module) -> None:
        """Change the model (after :meth:`apply` captured every site)."""
        raise NotImplementedError

    def check(self, model: torch.nn.Module) -> None:
        """Raise :class:`EditError` if the edit cannot go into ``model`` (nothing changed yet)."""

    def to_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], data: dict[str, Any], meta: dict[str, Any]) -> Edit:
        raise NotImplementedError

    def merged(self, model: torch.nn.Module) -> Delta:
        """The edit as a weight delta (mergeable kinds only), for export."""
        raise EditError(f"a {self.kind} edit cannot be merged into the weights")

    def is_empty(self) -> bool:
        return not self.sites()

    # --- the contract, shared -------------------------------------------------------
    @property
    def applied(self) -> bool:
        return self._before is not None

    def apply(self, model: torch.nn.Module) -> Edit:
        """Install the edit in ``model``, keeping what it replaces."""
        if self._before is not None:
            raise RuntimeError("edit is already applied; revert it first")
        self.check(model)
        before: dict[str, SiteState] = {}
        try:
            for site in self.sites():
                before[site] = self.capture(model, site)
            self.install(model)
        except BaseException:
            for site in reversed(list(before)):
                self.restore(model, site, before[site])
            raise
        self._before = before
        return self

    def revert(self, model: torch.nn.Module) -> None:
        """Restore every site as it was before :meth:`apply` (bit-identical)."""
        if self._before is None:
            raise RuntimeError("edit is not applied")
        for site in reversed(list(self._before)):
            self.restore(model, site, self._before[site])
        self._before = None

    @property
    def originals(self) -> dict[str, SiteState]:
        """Each site's state before :meth:`apply` (empty when not applied)."""
        return dict(self._before or {})

    def forget_originals(self) -> None:
        """Keep the edit for good (sequential editing): drop the saved states."""
        self._before = None

    def detached(self) -> Edit:
        """A fresh, unapplied edit sharing this one's content (to apply the same edit twice)."""
        return type(self).from_saved(self.to_tensors(), self.to_json(), self.meta)

    # --- files ----------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        from kedit.util.atomic import atomic_path

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.to_tensors().items()}
        header = {"kedit_edit": json.dumps({"class": class_path(type(self)), "data": self.to_json()}),
                  "kedit": json.dumps(self.meta, default=str)}
        with atomic_path(Path(path)) as tmp:
            save_file(tensors, str(tmp), metadata=header)

    @staticmethod
    def load(path: str | Path) -> Edit:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(header.get("kedit", "{}"))
        if "kedit_edit" not in header:       # a bare weight delta (files written before edit kinds)
            return Delta(tensors, meta)
        spec = json.loads(header["kedit_edit"])
        cls = import_class(spec["class"])
        return cls.from_saved(tensors, spec.get("data", {}), meta)


def restore_sites(model: torch.nn.Module, states: dict[str, tuple[type[Edit], SiteState]]) -> None:
    """Restore many sites (reverse order of capture), e.g. a sequential run's first-touch states."""
    for site in reversed(list(states)):
        cls, state = states[site]
        cls.restore(model, site, state)


# ======================================================================== weights


class Delta(Edit):
    """An additive weight change, keyed by parameter name, in each parameter's own layout."""

    kind = "weights"
    mergeable = True

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None, meta: dict[str, Any] | None = None):
        super().__init__(meta)
        self.tensors: dict[str, torch.Tensor] = dict(tensors or {})

    def __add__(self, other: Delta) -> Delta:
        out = {k: v.clone() for k, v in self.tensors.items()}
        for k, v in other.tensors.items():
            out[k] = out[k] + v.to(out[k]) if k in out else v.clone()
        return Delta(out, {**self.meta, **other.meta})

    def norms(self) -> dict[str, float]:
        return {k: float(v.float().norm()) for k, v in self.tensors.items()}

    def sites(self) -> list[str]:
        return [f"weight:{k}" for k in self.tensors]

    def check(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, t in self.tensors.items():
            if name not in params:
                raise EditError(f"the edit changes '{name}', which this model does not have")
            if params[name].device.type == "meta":
                raise EditError(f"the edit changes '{name}', which the device map offloads (its weights are "
                                f"loaded only for each call): put that layer on a device in --device-map")
            if tuple(params[name].shape) != tuple(t.shape):
                raise EditError(f"the edit changes '{name}' with shape {tuple(t.shape)}; this model's is "
                                f"{tuple(params[name].shape)}")

    @staticmethod
    def _param(model: torch.nn.Module, site: str) -> torch.nn.Parameter:
        return model.get_parameter(site.removeprefix("weight:"))

    @classmethod
    def capture(cls, model: torch.nn.Module, site: str) -> SiteState:
        return SiteState({"value": cls._param(model, site).detach().clone()})

    @classmethod
    def restore(cls, model: torch.nn.Module, site: str, state: SiteState) -> None:
        with torch.no_grad():
            cls._param(model, site).copy_(state.tensors["value"])

    def install(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for name, d in self.tensors.items():
                p = model.get_parameter(name)
                p.add_(d.to(device=p.device, dtype=p.dtype))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    @classmethod
    def from_saved(cls, tensors, data, meta) -> Delta:
        return cls(tensors, meta)

    def merged(self, model: torch.nn.Module) -> Delta:
        return self

    @property
    def weight_originals(self) -> dict[str, torch.Tensor]:
        """Parameter name -> its value before :meth:`apply`."""
        return {s.removeprefix("weight:"): st.tensors["value"] for s, st in self.originals.items()}


# ======================================================================== modules


class EditWrapper(torch.nn.Module):
    """A module put in place of ``base`` (which it keeps, untouched, as ``self.base``).

    Subclasses (a GRACE codebook, a WISE side memory, a LoRA adapter) define ``forward``,
    their tensors (:meth:`wrapper_state` / :meth:`load_wrapper_state`, which may change
    shapes: a codebook grows) and a JSON config (:meth:`wrapper_config`).  ``kind`` is
    ``memory`` or ``adapter``.  A wrapper that routes per row and needs the attention mask
    sets ``wants_attention_mask``: while it is installed, the model's forward hands it the
    mask of the current call in ``self.attention_mask`` (``(batch, all positions so far)``;
    the last ``x.shape[1]`` columns are the current positions).
    """

    kind: ClassVar[str] = "memory"
    mergeable: ClassVar[bool] = False
    wants_attention_mask: ClassVar[bool] = False

    def __init__(self, base: torch.nn.Module, config: dict[str, Any]):
        super().__init__()
        self.base = base
        self.config_dict = dict(config)
        self.attention_mask: torch.Tensor | None = None

    def wrapper_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_wrapper_state(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def wrapper_config(self) -> dict[str, Any]:
        return dict(self.config_dict)

    def set_config(self, config: dict[str, Any]) -> None:
        self.config_dict = dict(config)

    def merged_weight_delta(self) -> dict[str, torch.Tensor]:
        """Mergeable wrappers: base parameter name (relative to ``base``) -> additive change."""
        raise EditError(f"{type(self).__name__} cannot be merged into the weights")

    def keep_rows(self, index: torch.Tensor) -> None:
        """A cached generation dropped the rows that ended: of the batch of the last call,
        the rows ``index`` (in order) go on.  A wrapper that keeps per-row state from one
        call of a sequence to the next selects those rows; the default keeps none."""


def _parent(model: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


def _mask_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]
    for w in module._kedit_mask_wrappers:
        w.attention_mask = mask


def _attach_mask(model: torch.nn.Module, wrapper: EditWrapper) -> None:
    if not wrapper.wants_attention_mask:
        return
    if not hasattr(model, "_kedit_mask_wrappers"):
        model._kedit_mask_wrappers = []
        model._kedit_mask_handle = model.register_forward_pre_hook(_mask_hook, with_kwargs=True)
    model._kedit_mask_wrappers.append(wrapper)


def _detach_mask(model: torch.nn.Module, wrapper: EditWrapper) -> None:
    users = getattr(model, "_kedit_mask_wrappers", None)
    if users is None or wrapper not in users:
        return
    users.remove(wrapper)
    wrapper.attention_mask = None
    if not users:
        model._kedit_mask_handle.remove()
        del model._kedit_mask_wrappers, model._kedit_mask_handle


@dataclass
class WrapperSpec:
    """What a :class:`ModuleEdit` puts at one module path: the wrapper class, its config and tensors."""

    cls: type[EditWrapper]
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]


class ModuleEdit(Edit):
    """Module paths -> the wrapper each gets (adapters, memories).

    The edit holds each wrapper's *whole* state after the edit (``cumulative``): applying
    it to a model where the wrapper is already installed replaces that wrapper's state
    (the previous state is kept for revert); where it is not, the wrapper is installed
    around the module.  Revert puts the original module object back, so the base model
    is untouched -- bit-identical by construction.
    """

    cumulative = True

    def __init__(self, modules: dict[str, WrapperSpec], meta: dict[str, Any] | None = None):
        super().__init__(meta)
        self.modules = dict(modules)
        kinds = {s.cls.kind for s in self.modules.values()}
        if len(kinds) > 1:
            raise EditError(f"one ModuleEdit mixes wrapper kinds {sorted(kinds)}")

    @property
    def kind(self) -> str:  # type: ignore[override]
        return next(iter(self.modules.values())).cls.kind if self.modules else "memory"

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        return all(s.cls.mergeable for s in self.modules.values())

    def sites(self) -> list[str]:
        return [f"module:{p}" for p in self.modules]

    def check(self, model: torch.nn.Module) -> None:
        for path in self.modules:
            try:
                model.get_submodule(path)
            except AttributeError:
                raise EditError(f"the edit wraps module '{path}', which this model does not have") from None

    @classmethod
    def capture(cls, model: torch.nn.Module, site: str) -> SiteState:
        m = model.get_submodule(site.removeprefix("module:"))
        if not isinstance(m, EditWrapper):
            return SiteState({}, {"absent": True})
        return SiteState(_clone(m.wrapper_state()), {"wrapper": class_path(type(m)), "config": m.wrapper_config()})

    @classmethod
    def restore(cls, model: torch.nn.Module, site: str, state: SiteState) -> None:
        path = site.removeprefix("module:")
        if state.info.get("absent"):
            m = model.get_submodule(path)
            if isinstance(m, EditWrapper):
                _detach_mask(model, m)
                parent, attr = _parent(model, path)
                setattr(parent, attr, m.base)
            return
        spec = WrapperSpec(import_class(state.info["wrapper"]), state.info.get("config", {}), state.tensors)
        cls._put(model, path, spec)

    @staticmethod
    def _put(model: torch.nn.Module, path: str, spec: WrapperSpec) -> None:
        m = model.get_submodule(path)
        if isinstance(m, EditWrapper) and type(m) is not spec.cls:
            raise EditError(f"module '{path}' already holds a {type(m).__name__}, not a {spec.cls.__name__}")
        if not isinstance(m, EditWrapper):
            m = spec.cls(m, spec.config)
            parent, attr = _parent(model, path)
            setattr(parent, attr, m)
            _attach_mask(model, m)
        else:
            m.set_config(spec.config)
        m.load_wrapper_state(_clone(spec.tensors))

    def install(self, model: torch.nn.Module) -> None:
        for path, spec in self.modules.items():
            self._put(model, path, spec)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{path}/{k}": v for path, s in self.modules.items() for k, v in s.tensors.items()}

    def to_json(self) -> dict[str, Any]:
        return {"modules": {p: {"wrapper": class_path(s.cls), "config": s.config} for p, s in self.modules.items()}}

    @classmethod
    def from_saved(cls, tensors, data, meta) -> ModuleEdit:
        modules = {}
        for path, spec in data["modules"].items():
            own = {k[len(path) + 1:]: v for k, v in tensors.items() if k.startswith(path + "/")}
            modules[path] = WrapperSpec(import_class(spec["wrapper"]), spec.get("config", {}), own)
        return cls(modules, meta)

    def merged(self, model: torch.nn.Module) -> Delta:
        """Each mergeable wrapper's change of its base weights, as one :class:`Delta`."""
        if not self.mergeable:
            raise EditError(f"a {self.kind} edit cannot be merged into the weights")
        out: dict[str, torch.Tensor] = {}
        for path, spec in self.modules.items():
            base = model.get_submodule(path)
            base = base.base if isinstance(base, EditWrapper) else base
            w = spec.cls(base, spec.config)
            w.load_wrapper_state(_clone(spec.tensors))
            for name, d in w.merged_weight_delta().items():
                out[f"{path}.{name}"] = d
        return Delta(out, dict(self.meta))


# ======================================================================== context


def _forward_with_context(model: torch.nn.Module, original, *args, **kwargs):
    """The model's forward with the context tokens before every input.

    First call of a sequence (no cache yet): the input is run as if the context ids were
    written before it (attention mask: ones over the context; positions: the context takes
    0..C-1 and the input follows), and the outputs (logits, hidden states) cover the
    positions the caller gave, never the context's.  Later calls with a key/value cache
    (``generate``) extend the mask by C ones and shift positions by C.

    How the first call runs: every row of a batch shares the one context, so the context
    is run once, with batch 1, into a key/value cache (the caller's, when ``generate``
    passed an empty one), which is repeated over the rows; the inputs then run on that
    cache (:func:`_prefixed_call`).  A batch of B inputs of L tokens costs C + B·L
    positions instead of B·(C + L), and no logits are computed over the context (with
    Gemma's 262k vocabulary these were most of the cost, and with a context of a hundred
    facts and 32 rows more memory than the machine has).  Where a module wrapper of
    another edit is installed (it may route by what a call sees: WISE, GRACE), or the
    forward takes no cache, the ids are concatenated instead (:func:`_concatenated_call`)
    and only the input's logits are computed; both give the same numbers within float
    rounding (``tests/test_edit_kinds.py``).
    """
    if args:
        kwargs["input_ids"], args = args[0], args[1:]
    ctx = model._kedit_context
    ids = kwargs.get("input_ids")
    if kwargs.get("inputs_embeds") is not None:
        raise EditError("a context edit needs input_ids (inputs_embeds given)")
    c = ctx.shape[0]
    b = ids.shape[0]
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = torch.cat([torch.ones(b, c, dtype=mask.dtype, device=mask.device), mask], 1)
    if not is_fresh(cache_of(kwargs)):
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + c
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = kwargs["cache_position"] + c
        return original(*args, **kwargs)
    pos = kwargs.get("position_ids")
    if pos is None and mask is not None:
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)   # as kedit's scoring and generate derive them
    if pos is None:
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand(b, -1)
    keeps_logits = "logits_to_keep" in inspect.signature(original).parameters
    if _can_prefix(model, original):
        return _prefixed_call(model, original, ctx.to(ids.device), pos, keeps_logits, args, kwargs)
    return _concatenated_call(original, ctx.to(ids.device), pos, keeps_logits, args, kwargs)


def _can_prefix(model: torch.nn.Module, original) -> bool:
    return takes_cache(original) and not any(isinstance(m, EditWrapper) for m in model.modules())


def _prefixed_call(model, original, ctx: torch.Tensor, pos: torch.Tensor, keeps_logits: bool, args, kwargs):
    """The context into a cache once (batch 1), repeated over the rows, then the inputs on it."""
    name = cache_arg(original)
    ids = kwargs["input_ids"]
    b, c = ids.shape[0], ctx.shape[0]
    given = cache_of(kwargs)
    cache = given if given is not None else new_cache(model)
    drop_cache(kwargs)
    head = {"input_ids": ctx.unsqueeze(0), "attention_mask": torch.ones(1, c, dtype=torch.long, device=ctx.device),
            "position_ids": torch.arange(c, device=ctx.device).unsqueeze(0), name: cache, "use_cache": True}
    if keeps_logits:
        head["logits_to_keep"] = 1
    original(**head)
    if b > 1:
        cache.batch_repeat_interleave(b)
    if "attention_mask" not in kwargs or kwargs["attention_mask"] is None:
        kwargs["attention_mask"] = torch.ones(b, c + ids.shape[1], dtype=torch.long, device=ids.device)
    kwargs["position_ids"] = pos + c
    if kwargs.get("cache_position") is not None:
        kwargs["cache_position"] = kwargs["cache_position"] + c
    wanted = kwargs.get("use_cache") is not False or given is not None
    kwargs[name] = cache
    kwargs["use_cache"] = True
    out = original(*args, **kwargs)
    if not wanted and hasattr(out, "past_key_values"):
        out.past_key_values = None                # the caller asked for no cache: free it now
    return out


def _concatenated_call(original, ctx: torch.Tensor, pos: torch.Tensor, keeps_logits: bool, args, kwargs):
    """The context ids written before every row; the context's logits are not computed."""
    ids = kwargs["input_ids"]
    b, c, n = ids.shape[0], ctx.shape[0], ids.shape[1]
    kwargs["input_ids"] = torch.cat([ctx.unsqueeze(0).expand(b, c), ids], 1)
    ar = torch.arange(c, device=ids.device)
    kwargs["position_ids"] = torch.cat([ar.unsqueeze(0).expand(b, c).to(pos.dtype), pos + c], 1)
    if kwargs.get("cache_position") is not None:
        kwargs["cache_position"] = torch.cat([ar.to(kwargs["cache_position"].dtype), kwargs["cache_position"] + c])
    keep = kwargs.get("logits_to_keep")
    cut = not (isinstance(keep, int) and keep > 0)
    if cut and keeps_logits:
        kwargs["logits_to_keep"], cut = n, False  # the last n positions are the input's
    out = original(*args, **kwargs)
    if cut:
        out.logits = out.logits[:, c:]
    if getattr(out, "hidden_states", None) is not None:
        out.hidden_states = tuple(h[:, c:] for h in out.hidden_states)
    return out


class ContextEdit(Edit):
    """Token ids put before every input of the model (IKE's demonstrations and new fact).

    No weight changes: ``apply`` replaces the model's ``forward`` by one that prepends the
    ids (see :func:`_forward_with_context`), ``revert`` removes it.  ``text`` is the context
    as written (for reading and for export); ``ids`` is what the model sees.
    """

    kind = "context"
    cumulative = True

    def __init__(self, ids: torch.Tensor, text: str = "", meta: dict[str, Any] | None = None):
        super().__init__(meta)
        self.ids = ids.detach().to(torch.long).reshape(-1).cpu()
        self.text = text

    def sites(self) -> list[str]:
        return ["context"]

    @classmethod
    def capture(cls, model: torch.nn.Module, site: str) -> SiteState:
        ctx = getattr(model, "_kedit_context", None)
        if ctx is None:
            return SiteState({}, {"absent": True})
        return SiteState({"ids": ctx.clone()}, {"text": getattr(model, "_kedit_context_text", "")})

    @classmethod
    def restore(cls, model: torch.nn.Module, site: str, state: SiteState) -> None:
        if state.info.get("absent"):
            if "_kedit_forward_before" in model.__dict__:
                before = model.__dict__.pop("_kedit_forward_before")
                model.__dict__.pop("forward", None)
                if before is not None:             # a forward someone else put there (accelerate's hooks)
                    model.forward = before
            for attr in ("_kedit_context", "_kedit_context_text"):
                model.__dict__.pop(attr, None)
            return
        cls._put(model, state.tensors["ids"], state.info.get("text", ""))

    @staticmethod
    def _put(model: torch.nn.Module, ids: torch.Tensor, text: str) -> None:
        if "_kedit_forward_before" not in model.__dict__:
            # wrap the forward the model has now: its class's, or one an instance attribute put
            # there (accelerate's device-map hooks), which revert puts back
            before = model.__dict__.get("forward")
            original = before if before is not None else type(model).forward.__get__(model)
            wrapped = functools.wraps(original)(functools.partial(_forward_with_context, model, original))
            model._kedit_forward_before = before
            model.forward = wrapped
        model._kedit_context = ids.clone()
        model._kedit_context_text = text

    def install(self, model: torch.nn.Module) -> None:
        self._put(model, self.ids, self.text)

    def is_empty(self) -> bool:
        return self.ids.numel() == 0

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"ids": self.ids}

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text}

    @classmethod
    def from_saved(cls, tensors, data, meta) -> ContextEdit:
        return cls(tensors["ids"], data.get("text", ""), meta)


# ======================================================================== site states on disk


def pack_sites(states: dict[str, tuple[type[Edit], SiteState]]) -> tuple[dict[str, torch.Tensor], str]:
    """Site states -> (tensors ``site<i>/<name>``, JSON listing each site, its edit class and facts)."""
    tensors: dict[str, torch.Tensor] = {}
    listing = []
    for i, (site, (cls, state)) in enumerate(states.items()):
        listing.append({"site": site, "class": class_path(cls), "info": state.info})
        for k, v in state.tensors.items():
            tensors[f"site{i}/{k}"] = v.detach().cpu().contiguous()
    return tensors, json.dumps(listing)


def unpack_sites(tensors: dict[str, torch.Tensor], listing: str) -> dict[str, tuple[type[Edit], SiteState]]:
    """The inverse of :func:`pack_sites`."""
    out: dict[str, tuple[type[Edit], SiteState]] = {}
    for i, entry in enumerate(json.loads(listing)):
        prefix = f"site{i}/"
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        out[entry["site"]] = (import_class(entry["class"]), SiteState(own, entry.get("info", {})))
    return out
