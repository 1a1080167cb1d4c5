"""Architecture knowledge: the ONLY place in kedit that spells a Hugging Face module path.

Every editing method asks a :class:`ModelAdapter` for "the MLP output projection of
layer 5" and gets a module, a parameter name and a statement of how its weight is
laid out.  Adding a model family is one entry in :data:`ARCHITECTURES`.

Weight layout
-------------
kedit's methods always reason about a projection as ``v = W k`` with ``W`` of shape
``(out, in)`` -- the ``nn.Linear`` convention.  GPT-2 stores its MLP projections as
``Conv1D`` whose weight is ``(in, out)``.  The layout is *stated* per family below,
never guessed from a shape (square matrices exist).  :meth:`ModelAdapter.to_param_layout`
converts an ``(out, in)`` update to the parameter's own layout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

Layout = Literal["out_in", "in_out"]


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one model family, relative to the ``*ForCausalLM`` model.

    ``layers`` is the ModuleList of transformer blocks; the ``mlp*``/``attn`` paths are
    relative to one block.  ``mlp_in`` lists the projection(s) feeding the MLP
    nonlinearity (two for gated MLPs).  ``mlp_out`` is the projection whose *input*
    is the key ``k`` and whose *output* is the value ``v`` that ROME/MEMIT edit.
    """

    family: str
    model_types: tuple[str, ...]
    layers: str
    mlp: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    attn: str
    embed: str
    final_norm: str
    weight_layout: Layout
    # Position embeddings added to the token embeddings (GPT-2); rotary models have none.
    pos_embed: str | None = None
    # A norm between the MLP's output projection and the residual stream (Gemma-3's
    # ``post_feedforward_layernorm``): the value ``v`` an edit writes is normalised before it
    # is added, so only its direction reaches the residual.  None: ``v`` is added as it is.
    mlp_out_norm: str | None = None


# LLaMA's paths, shared by the families built like it
_LLAMA = ArchSpec(
    family="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2"),
    layers="model.layers",
    mlp="mlp",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    attn="self_attn",
    embed="model.embed_tokens",
    final_norm="model.norm",
    weight_layout="out_in",
)

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(
        family="gpt2",
        model_types=("gpt2",),
        layers="transformer.h",
        mlp="mlp",
        mlp_in=("mlp.c_fc",),
        mlp_out="mlp.c_proj",
        attn="attn",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        weight_layout="in_out",  # transformers.pytorch_utils.Conv1D
        pos_embed="transformer.wpe",
    ),
    ArchSpec(
        family="gptj",
        model_types=("gptj",),
        layers="transformer.h",
        mlp="mlp",
        mlp_in=("mlp.fc_in",),
        mlp_out="mlp.fc_out",
        attn="attn",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        weight_layout="out_in",
    ),
    ArchSpec(
        family="gpt_neox",
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        mlp="mlp",
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h",
        attn="attention",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        weight_layout="out_in",
    ),
    _LLAMA,
    # Gemma-3 text models (google/gemma-3-270m): the LLaMA paths, plus four RMSNorms per
    # block (before and after attention, before and after the GeGLU MLP), token embeddings
    # multiplied by sqrt(hidden) inside the embedding module (so ``embed()(ids)`` is what
    # block 0 sees), sliding-window and global attention layers (``config.layer_types``),
    # a tokenizer that prepends <bos>, and a head tied to the embeddings.
    replace(_LLAMA, family="gemma3", model_types=("gemma3_text",), mlp_out_norm="post_feedforward_layernorm"),
)


class UnsupportedArchitecture(ValueError):
    """The model's ``config.model_type`` has no entry in :data:`ARCHITECTURES`."""


def spec_for(model_type: str) -> ArchSpec:
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    known = ", ".join(t for s in ARCHITECTURES for t in s.model_types)
    raise UnsupportedArchitecture(
        f"model type '{model_type}' is not supported (known: {known}); add an ArchSpec "
        f"entry for it in kedit/models/arch.py naming its blocks, MLP projections, "
        f"attention, embeddings, final norm and weight layout"
    )


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


class ModelAdapter:
    """A loaded causal LM plus the :class:`ArchSpec` that says where things are."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.spec = spec_for(model.config.model_type)
        self._blocks = _get(model, self.spec.layers)
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap is not None:
            # Methods compute logits from a hidden state as lm_head(final_norm(h)); a capped head
            # (Gemma-2, or a Gemma-3 config that sets it) would give them logits the model never emits.
            raise UnsupportedArchitecture(
                f"model type '{model.config.model_type}' caps its final logits (final_logit_softcapping="
                f"{cap}), which kedit's methods do not apply; load it with the cap set to None")

    # --- structure -------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self._blocks)

    @property
    def hidden_size(self) -> int:
        return self.embed().weight.shape[1]

    @property
    def key_size(self) -> int:
        """Width of the MLP output projection's input (the key dimension)."""
        w = self.mlp_out(0).weight
        return w.shape[0] if self.spec.weight_layout == "in_out" else w.shape[1]

    def check_layer(self, layer: int) -> int:
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} out of range: the model has {self.n_layers} layers (0..{self.n_layers - 1})")
        return layer

    def block(self, layer: int) -> nn.Module:
        return self._blocks[self.check_layer(layer)]

    def block_name(self, layer: int) -> str:
        return f"{self.spec.layers}.{self.check_layer(layer)}"

    def mlp(self, layer: int) -> nn.Module:
        return _get(self.block(layer), self.spec.mlp)

    def mlp_in(self, layer: int) -> tuple[nn.Module, ...]:
        return tuple(_get(self.block(layer), p) for p in self.spec.mlp_in)

    def mlp_out(self, layer: int) -> nn.Module:
        return _get(self.block(layer), self.spec.mlp_out)

    def mlp_out_name(self, layer: int) -> str:
        """Module path of the MLP output projection of ``layer``."""
        return f"{self.block_name(layer)}.{self.spec.mlp_out}"

    def mlp_out_param(self, layer: int) -> str:
        """Parameter name (as in ``named_parameters``) of that projection's weight."""
        return f"{self.mlp_out_name(layer)}.weight"

    def attn(self, layer: int) -> nn.Module:
        return _get(self.block(layer), self.spec.attn)

    def embed(self) -> nn.Module:
        """The input embedding module; its output is what block 0 receives (before position
        embeddings), scaling included (Gemma multiplies by sqrt(hidden) inside it)."""
        return self.model.get_input_embeddings()

    @property
    def embed_scale(self) -> float:
        """The factor the embedding module applies to its weight rows (1.0 unless scaled)."""
        return float(getattr(self.embed(), "scalar_embed_scale", 1.0))

    def mlp_out_norm(self, layer: int) -> nn.Module | None:
        """The norm between the MLP output projection and the residual stream, if any."""
        return _get(self.block(layer), self.spec.mlp_out_norm) if self.spec.mlp_out_norm else None

    def sliding_window(self, layer: int) -> int | None:
        """How many past positions ``layer``'s attention sees, or None when it sees them all."""
        self.check_layer(layer)
        types = getattr(self.model.config, "layer_types", None)
        window = getattr(self.model.config, "sliding_window", None)
        if types is not None:
            return window if types[layer] == "sliding_attention" else None
        return window

    def pos_embed(self) -> nn.Module | None:
        return _get(self.model, self.spec.pos_embed) if self.spec.pos_embed else None

    def final_norm(self) -> nn.Module:
        return _get(self.model, self.spec.final_norm)

    def lm_head(self) -> nn.Module:
        """The output embedding, through the model's API: tied heads have no own parameter."""
        return self.model.get_output_embeddings()

    def module_path(self, kind: str, layer: int | None = None) -> str:
        """Full module path for ``kind`` in {block, mlp, mlp_out, mlp_in, attn, embed, final_norm}."""
        if kind == "embed":
            return self.spec.embed
        if kind == "final_norm":
            return self.spec.final_norm
        if layer is None:
            raise ValueError(f"module kind '{kind}' needs a layer")
        rel = {"block": None, "mlp": self.spec.mlp, "mlp_out": self.spec.mlp_out,
               "mlp_in": self.spec.mlp_in[-1], "attn": self.spec.attn}[kind]
        return self.block_name(layer) if rel is None else f"{self.block_name(layer)}.{rel}"

    # --- weight layout ---------------------------------------------------------
    def weight_out_in(self, layer: int) -> torch.Tensor:
        """The MLP output projection's weight as ``(out, in)`` (a view, not a copy)."""
        w = self.mlp_out(layer).weight
        return w.T if self.spec.weight_layout == "in_out" else w

    def to_param_layout(self, delta_out_in: torch.Tensor) -> torch.Tensor:
        """Convert an ``(out, in)`` update to the parameter's stored layout."""
        return delta_out_in.T.contiguous() if self.spec.weight_layout == "in_out" else delta_out_in

    # --- misc ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embedding's device (a model spread over devices by a
        device map runs each block on its own device and moves activations itself)."""
        return input_device(self.model)

    def offloaded(self, layer: int) -> bool:
        """Whether accelerate keeps the weights of ``layer``'s MLP output projection off every
        device (on ``meta``, loaded from CPU memory or disk for each call): not editable."""
        return any(p.device.type == "meta" for p in self.mlp_out(layer).parameters())

    def layer_device(self, layer: int) -> torch.device:
        """The device that holds (and runs) the MLP output projection of ``layer``: where an
        edit of that layer does its math."""
        return module_device(self.mlp_out(layer))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def module_device(module: torch.nn.Module) -> torch.device:
    """The device a module computes on: its weights' device; for weights offloaded by
    accelerate (kept on the ``meta`` device, loaded at each call) the device its hook
    runs it on."""
    hook = getattr(module, "_hf_hook", None)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
        break
    dev = getattr(hook, "execution_device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


def input_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's input embedding (where token ids must be)."""
    return module_device(model.get_input_embeddings())
