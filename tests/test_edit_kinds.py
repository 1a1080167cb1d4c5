"""The edit interface, one kind at a time, on tiny models: a module wrapper (memory /
adapter kinds) and a context (prompt kind) are active in scoring, in padded batches and
in generate(); revert is bit-identical; save -> load gives the same logits; sequential
checkpoints of site states restore exactly; export writes base + edit for edits that do
not merge, and kedit.load_edited reads them back."""

from __future__ import annotations

import json

import pytest
import torch
from contract import assert_revert_bit_identical, assert_save_load_same_logits, cached_step_logits, logits
from tiny import FAMILIES, tiny_model

from kedit.data.cases import EditCase, PromptSet
from kedit.evaluation import evaluate_cases
from kedit.evaluation.generation import generate
from kedit.methods.edit import (ContextEdit, Delta, Edit, EditError, EditWrapper, ModuleEdit, SiteState,
                                WrapperSpec, pack_sites, unpack_sites)
from kedit.runs.result import PatchError, select_edits


class ShiftWrapper(EditWrapper):
    """A test wrapper: adds a fixed vector to the wrapped module's output."""

    kind = "memory"

    def __init__(self, base, config):
        super().__init__(base, config)
        self.shift = torch.zeros(0)

    def forward(self, x):
        return self.base(x) + self.shift.to(x)

    def wrapper_state(self):
        return {"shift": self.shift}

    def load_wrapper_state(self, tensors):
        self.shift = tensors["shift"]


class MaskWrapper(ShiftWrapper):
    """Adds the shift only on rows whose mask says they are longer than two tokens."""

    wants_attention_mask = True

    def forward(self, x):
        out = self.base(x)
        mask = self.attention_mask
        assert mask is not None and mask.shape[0] == x.shape[0]
        long_rows = (mask.sum(-1) > 2).to(x.dtype).view(-1, 1, 1)
        return out + long_rows * self.shift.to(x)


def shift_edit(loaded, scale=1.0, cls=ShiftWrapper, layer=0) -> ModuleEdit:
    path = loaded.adapter.mlp_out_name(layer)
    d = loaded.adapter.hidden_size
    g = torch.Generator().manual_seed(0)
    return ModuleEdit({path: WrapperSpec(cls, {"scale": scale}, {"shift": scale * torch.randn(d, generator=g)})})


CASE = EditCase(case_id="c1", template="Paris is the capital city of {}", subject="France",
                target_new=" of", ground_truth=" and", rephrase_prompts=["The capital of France is"],
                locality=(PromptSet("neighborhood", ("The river flows",), (" the",)),))


@pytest.mark.parametrize("family", FAMILIES)
def test_module_edit_reverts_bit_identically_and_saves(family, tmp_path):
    loaded = tiny_model(family)
    edit = shift_edit(loaded)
    assert edit.kind == "memory" and not edit.mergeable and edit.cumulative
    assert_revert_bit_identical(loaded, edit)
    back = assert_save_load_same_logits(loaded, edit, tmp_path)
    assert isinstance(back, ModuleEdit)


def test_module_edit_replaces_an_installed_wrappers_state_and_revert_restores_it():
    loaded = tiny_model("llama")
    base = logits(loaded)
    first, second = shift_edit(loaded, 1.0), shift_edit(loaded, 3.0)
    first.apply(loaded.model)
    after_first = logits(loaded)
    wrapper = loaded.model.get_submodule(next(iter(first.modules)))
    second.apply(loaded.model)
    assert loaded.model.get_submodule(next(iter(first.modules))) is wrapper   # one wrapper, new state
    assert not torch.equal(logits(loaded), after_first)
    second.revert(loaded.model)
    assert torch.equal(logits(loaded), after_first)
    first.revert(loaded.model)
    assert torch.equal(logits(loaded), base)


def test_wrapper_gets_the_attention_mask_per_call_and_routes_per_row():
    loaded = tiny_model("llama")
    tok = loaded.tokenizer
    edit = shift_edit(loaded, 2.0, cls=MaskWrapper)
    short, long = "The", "The river flows through the old town"
    alone = {p: logits(loaded, [p]) for p in (short, long)}
    edit.apply(loaded.model)
    both = logits(loaded, [short, long])
    n_short = len(tok(short)["input_ids"])
    assert n_short <= 2
    torch.testing.assert_close(both[0, :n_short], alone[short][0], rtol=0, atol=1e-5)   # short row: base model
    assert not torch.allclose(both[1], alone[long][0])                                   # long row: shifted
    edit.revert(loaded.model)
    assert not hasattr(loaded.model, "_kedit_mask_wrappers")
    assert not loaded.model._forward_pre_hooks


def test_delta_is_a_mergeable_weights_edit_that_loads_from_a_bare_file(tmp_path):
    loaded = tiny_model("gpt2")
    name, p = next((n, p) for n, p in loaded.model.named_parameters() if p.dim() == 2 and "h.0" in n)
    delta = Delta({name: 0.1 * torch.ones_like(p)}, {"label": "x"})
    assert delta.kind == "weights" and delta.mergeable and delta.merged(loaded.model) is delta
    assert_revert_bit_identical(loaded, delta)
    assert_save_load_same_logits(loaded, delta, tmp_path)
    from safetensors.torch import save_file  # a file of an older run: tensors only

    save_file({name: delta.tensors[name]}, str(tmp_path / "bare.safetensors"))
    assert isinstance(Edit.load(tmp_path / "bare.safetensors"), Delta)
    with pytest.raises(EditError, match="shape"):
        Delta({name: torch.ones(3)}).apply(loaded.model)


def test_site_states_pack_and_unpack_exactly():
    loaded = tiny_model("llama")
    edit = shift_edit(loaded)
    edit.apply(loaded.model)
    site = edit.sites()[0]
    name = next(n for n, _ in loaded.model.named_parameters())
    states = {site: (ModuleEdit, ModuleEdit.capture(loaded.model, site)),
              f"weight:{name}": (Delta, Delta.capture(loaded.model, f"weight:{name}"))}
    tensors, listing = pack_sites(states)
    back = unpack_sites(tensors, listing)
    assert list(back) == list(states)
    for s, (cls, st) in states.items():
        assert back[s][0] is cls and back[s][1].info == st.info
        assert all(torch.equal(back[s][1].tensors[k], v) for k, v in st.tensors.items())
    edit.revert(loaded.model)
    assert ModuleEdit.capture(loaded.model, site).info == {"absent": True}


# ----------------------------------------------------------------------------- context


def context_edit(loaded, text="New Fact: Paris is in Italy.\n") -> ContextEdit:
    ids = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return ContextEdit(ids, text)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_context_is_seen_by_scoring_exactly_as_if_written_before_the_prompt(family):
    loaded = tiny_model(family)
    tok = loaded.tokenizer
    edit = context_edit(loaded)
    prompts = ["Paris is the capital of", "The river flows through the old town of"]
    edit.apply(loaded.model)
    batched = logits(loaded, prompts)               # right padded, as kedit scores
    edit.revert(loaded.model)
    for i, p in enumerate(prompts):
        ids = tok(edit.text + p, return_tensors="pt")["input_ids"]
        n_ctx = edit.ids.numel()
        assert torch.equal(ids[0, :n_ctx], edit.ids)   # this text splits at the boundary
        with torch.no_grad():
            whole = loaded.model(ids).logits[0, n_ctx:]
        n = whole.shape[0]
        torch.testing.assert_close(batched[i, :n], whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_context_is_seen_by_generate_with_left_padding_and_a_cache(family):
    loaded = tiny_model(family)
    edit = context_edit(loaded)
    prompts = ["Paris is", "The river flows through the old town of"]
    want = generate(loaded, [edit.text + p for p in prompts], 8)
    edit.apply(loaded.model)
    got = generate(loaded, prompts, 8)
    edit.revert(loaded.model)
    assert got == want
    assert generate(loaded, prompts, 8) == generate(loaded, prompts, 8)


def test_context_edit_reverts_saves_and_never_touches_weights(tmp_path):
    loaded = tiny_model("qwen2")
    edit = context_edit(loaded)
    assert edit.kind == "context" and not edit.mergeable
    assert_revert_bit_identical(loaded, edit)
    assert_save_load_same_logits(loaded, edit, tmp_path)
    res_before, ref = evaluate_cases(loaded.model, loaded.tokenizer, [CASE])
    edit.apply(loaded.model)
    res_after, _ = evaluate_cases(loaded.model, loaded.tokenizer, [CASE], ref)
    edit.revert(loaded.model)
    assert res_after[0] != res_before[0]
    with pytest.raises(EditError):
        edit.merged(loaded.model)


LONG_CONTEXT = "New Fact: Paris is in Italy.\nNew Fact: The Danube flows through Spain.\n"


@pytest.mark.parametrize("family", ["gemma3", "llama", "gpt2", "gpt_neox"])
def test_the_shared_context_cache_gives_the_concatenated_numbers(family):
    # a batch runs its one context once into a cache repeated over the rows; where a module
    # wrapper is installed (it may route by what a call sees) the ids are written before every
    # row instead.  The two agree, in scoring and in cached generation, also on Gemma's
    # 4-position sliding window with a context longer than it
    loaded = tiny_model(family)
    edit = context_edit(loaded, LONG_CONTEXT)
    assert edit.ids.numel() > 8
    prompts = ["Paris is the capital of", "The river flows through the old town of", "Rome"]
    edit.apply(loaded.model)
    cached, cached_gen = logits(loaded, prompts), generate(loaded, prompts, 6)
    noop = shift_edit(loaded, 0.0)
    noop.apply(loaded.model)
    concatenated, concatenated_gen = logits(loaded, prompts), generate(loaded, prompts, 6)
    noop.revert(loaded.model)
    edit.revert(loaded.model)
    assert cached.shape == concatenated.shape
    torch.testing.assert_close(cached, concatenated, rtol=0, atol=1e-5)
    assert cached_gen == concatenated_gen
    assert (logits(loaded, prompts) - cached).abs().max() > 1e-3   # the context does change the numbers


def test_a_batch_runs_its_shared_context_once():
    loaded = tiny_model("llama")
    edit = context_edit(loaded, LONG_CONTEXT)
    prompts = ["Paris is the capital of", "The river flows through the old town of", "Rome"]
    seen = []
    hook = loaded.model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
    edit.apply(loaded.model)
    logits(loaded, prompts)
    edit.revert(loaded.model)
    hook.remove()
    width = loaded.tokenizer(prompts, padding=True, return_tensors="pt")["input_ids"].shape[1]
    assert seen == [edit.ids.numel(), len(prompts) * width]


# ----------------------------------------------------------------------------- choices and export


def test_all_refuses_independent_edits_that_do_not_add_up():
    loaded = tiny_model("llama")
    a, b = shift_edit(loaded, 1.0), shift_edit(loaded, 2.0)
    assert select_edits({"x": a, "y": b}, False, "y") == [b]
    with pytest.raises(PatchError, match="--case"):
        select_edits({"x": a, "y": b}, False, all_=True)


def test_a_memory_edit_exports_as_base_plus_edit_and_loads_edited(tmp_path, monkeypatch):
    import kedit
    from kedit.runs.export import EDITED_FILE, export_model

    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    loaded = tiny_model("llama")
    loaded.name = "tiny-llama"
    edit = shift_edit(loaded)
    edit.apply(loaded.model)
    want = logits(loaded)
    edit.revert(loaded.model)
    base = logits(loaded)
    out = export_model(loaded, [edit], tmp_path / "exported")
    info = json.loads((out / "kedit-patch.json").read_text())
    assert (out / EDITED_FILE).exists() and not info["merged"] and info["kinds"] == ["memory"]
    edited = kedit.load_edited(out, device="cpu")
    torch.testing.assert_close(logits(edited), want, rtol=0, atol=1e-6)
    plain = kedit.load_model(str(out), device="cpu")      # from_pretrained: the base model
    torch.testing.assert_close(logits(plain), base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_cached_step_sees_the_context_once(family):
    # the cache arrives as ``cache`` (transformers >= 5.2x) or ``past_key_values``: either way the
    # context goes in front of the first call only, so a cached step equals the whole forward
    loaded = tiny_model(family)
    edit = context_edit(loaded)
    ids = loaded.tokenizer("The river flows through the old town of")["input_ids"]
    edit.apply(loaded.model)
    with torch.no_grad():
        whole = loaded.model(input_ids=torch.tensor([ids])).logits[0, -1]
    step = cached_step_logits(loaded.model, ids)
    edit.revert(loaded.model)
    torch.testing.assert_close(step, whole, rtol=0, atol=1e-5)
