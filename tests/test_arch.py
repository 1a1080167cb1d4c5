"""The architecture table: every family's modules, shapes and weight layout."""

from __future__ import annotations

import pytest
import torch
from tiny import FAMILIES, tiny_model
from transformers.pytorch_utils import Conv1D

from kedit.models.arch import ARCHITECTURES, ModelAdapter, UnsupportedArchitecture, spec_for


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_modules_and_shapes(family):
    loaded = tiny_model(family)
    a, cfg = loaded.adapter, loaded.model.config
    assert a.n_layers == 3
    hidden = cfg.hidden_size if hasattr(cfg, "hidden_size") else cfg.n_embd
    assert a.hidden_size == hidden
    out = a.mlp_out(1)
    params = dict(loaded.model.named_parameters())
    assert params[a.mlp_out_param(1)] is out.weight
    # (out, in) view: out = hidden, in = the MLP width (never equal here, so a wrong layout shows)
    assert a.weight_out_in(1).shape == (hidden, a.key_size) and a.key_size != hidden
    assert isinstance(out, Conv1D) == (family == "gpt2")
    # the (out, in) view really computes the module: W k (+ bias) == module(k)
    k = torch.randn(2, a.key_size)
    bias = out.bias if getattr(out, "bias", None) is not None else 0
    assert torch.allclose(out(k), k @ a.weight_out_in(1).T + bias, atol=1e-6)
    upd = torch.randn(hidden, a.key_size)
    assert a.to_param_layout(upd).shape == out.weight.shape
    for m in a.mlp_in(1):
        assert isinstance(m, (torch.nn.Linear, Conv1D))
    assert a.attn(1) is not None and a.final_norm() is not None
    assert a.lm_head().weight.shape[0] >= len(loaded.tokenizer)
    assert a.block(2) is a.block(-1 % a.n_layers)


def test_tied_head_has_no_parameter_of_its_own():
    loaded = tiny_model("llama")  # tied, like SmolLM2
    names = dict(loaded.model.named_parameters())
    assert "lm_head.weight" not in names
    assert loaded.adapter.lm_head().weight is loaded.adapter.embed().weight


def test_unknown_architecture_error_names_type_and_fix():
    with pytest.raises(UnsupportedArchitecture) as e:
        spec_for("bert")
    assert "bert" in str(e.value) and "kedit/models/arch.py" in str(e.value)
    with pytest.raises(ValueError, match="out of range"):
        tiny_model("llama").adapter.block(3)


def test_one_place_spells_module_paths():
    """Methods never spell a module path: the tables live in arch.py alone."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "kedit"
    paths = {s.mlp_out for s in ARCHITECTURES} | {s.layers for s in ARCHITECTURES}
    offenders = [f"{p.relative_to(root)}: {path}" for p in root.rglob("*.py") if p.name != "arch.py"
                 for path in paths if path in p.read_text()]
    assert offenders == []
    assert ModelAdapter  # the class methods use
