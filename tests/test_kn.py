"""KN on tiny models: the integrated-gradient attribution against a plain computation (full
forwards, one α at a time, no cache), the neurons it keeps against a hand-applied
threshold and sharing rule, the edit (embeddings written into those neurons' output
weights) and the edit contract."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from contract import assert_revert_bit_identical, assert_save_load_same_logits
from tiny import tiny_model

from kedit.config import ConfigError, build_params, load_params
from kedit.methods.base import EditRequest, RunContext
from kedit.methods.core.keys import key_rows
from kedit.methods.locate.kn import KN, KnParams
from kedit.methods.registry import get_method
from kedit.models.hooks import edit_input
from kedit.models.tokens import encode_prompt_target
from kedit.util.paths import configs_dir

REQUEST = EditRequest("a", "The sport played by {}", "Lionel Messi", " of", " the")


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))


def make(loaded, **over) -> KN:
    params = build_params(KnParams, {"steps": 20, "context_template_length_params": [[3, 2]], **over}, "test")
    return get_method("kn")(loaded, params, RunContext(progress=False))


def plain_attribution(loaded, ids, answer: int, layers, steps: int) -> torch.Tensor:
    """Attr(a_l,i) = ā_l,i · (1/m) Σ_k ∂P(answer)/∂a_l,i at a_l = (k/m) ā_l, each α its own full
    forward of the whole prompt (no cache, no batching)."""
    model, adapter = loaded.model, loaded.adapter
    x = torch.tensor([list(ids)])
    out = []
    for layer in layers:
        base = {}

        def grab(t):
            base["a"] = t[0, -1].detach().clone()
            return t
        with torch.no_grad(), edit_input(adapter.mlp_out(layer), grab):
            model(input_ids=x)
        total = torch.zeros_like(base["a"])
        for k in range(1, steps + 1):
            leaf = (k / steps * base["a"]).requires_grad_(True)

            def put(t):
                t = t.clone()
                t[0, -1] = leaf
                return t
            with torch.enable_grad(), edit_input(adapter.mlp_out(layer), put):
                prob = F.softmax(model(input_ids=x).logits[0, -1].float(), -1)[answer]
                (g,) = torch.autograd.grad(prob, [leaf])
            total += g
        out.append(base["a"] * total / steps)
    return torch.stack(out)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "gpt_neox"])
def test_attribution_matches_the_plain_integral(family):
    loaded = tiny_model(family)
    method = make(loaded, batch_rows=7)               # chunks that split layers: rows of a layer in two chunks
    method.prepare()
    ids = key_rows(loaded.tokenizer, [REQUEST], ["{}"], "last")[0].ids
    answer = encode_prompt_target(loaded.tokenizer, REQUEST.prompt, REQUEST.target_true)
    answer = answer.input_ids[answer.target_start]
    got = method.attribution(ids, answer)
    want = plain_attribution(loaded, ids, answer, method.layers, 20)
    assert got.shape == (loaded.adapter.n_layers, loaded.adapter.key_size)
    assert torch.allclose(got, want, atol=1e-6 * float(want.abs().max()), rtol=1e-4)
    assert float(want.abs().max()) > 0


@pytest.mark.parametrize("refine, p", [(True, 0.5), (True, 0.0), (False, 0.5)])
def test_chosen_neurons_are_those_the_hand_computed_attribution_picks(refine, p):
    """Per prompt (bare + prefixed): neurons above 0.2 × that prompt's largest attribution;
    kept: coarse in more than p × prompts (refine), or in any prompt."""
    loaded = tiny_model("llama")
    method = make(loaded, refine=refine, p=p)
    method.prepare()
    answer = encode_prompt_target(loaded.tokenizer, REQUEST.prompt, REQUEST.target_true)
    answer = answer.input_ids[answer.target_start]
    rows = key_rows(loaded.tokenizer, [REQUEST], method.templates, "last")
    assert len(rows) == 3
    counts = Counter()
    for row in rows:
        attr = plain_attribution(loaded, row.ids, answer, range(3), 20)
        counts.update(tuple(n) for n in (attr > 0.2 * attr.max()).nonzero().tolist())
    want = sorted(n for n, c in counts.items() if c > (p * 3 if refine else 0))
    got, details = method.neurons(REQUEST, answer)
    assert got == want and len(got) > 0 and len(details) == 3
    if refine and p == 0.5:
        assert len(got) < len(counts)                 # the sharing rule dropped some


def test_edit_writes_the_embeddings_into_the_chosen_columns_only(tmp_path):
    loaded = tiny_model("gpt2")                       # Conv1D: the column is a row of the stored weight
    method = make(loaded, lambda_target=8.0, lambda_orig=1.0)
    delta = method.compute([REQUEST])
    (info,) = delta.meta["cases"]
    kept = [tuple(n) for n in info["neurons"]]
    assert kept and info["n_neurons"] == len(kept)
    emb = loaded.adapter.embed().weight
    tok = loaded.tokenizer
    assert info["target_token"] == tok(" of")["input_ids"][0] and info["answer_token"] == tok(" the")["input_ids"][0]
    write = 8.0 * emb[info["target_token"]] - emb[info["answer_token"]]
    for layer in {n[0] for n in kept}:
        dW = delta.tensors[loaded.adapter.mlp_out_param(layer)].T          # (out, in)
        cols = [i for (l, i) in kept if l == layer]
        assert torch.allclose(dW[:, cols], write[:, None].expand(-1, len(cols)), atol=1e-6)
        rest = torch.ones(dW.shape[1], dtype=torch.bool)
        rest[cols] = False
        assert torch.equal(dW[:, rest], torch.zeros_like(dW[:, rest]))
    assert sorted(delta.tensors) == sorted(loaded.adapter.mlp_out_param(layer) for layer in {n[0] for n in kept})
    assert_revert_bit_identical(loaded, delta, [REQUEST.prompt, "The river flows"])
    assert_save_load_same_logits(loaded, delta, tmp_path, [REQUEST.prompt, "The river flows"])


def test_without_ground_truth_the_original_answer_is_the_argmax():
    loaded = tiny_model("llama")
    r = EditRequest("a", REQUEST.template, REQUEST.subject, REQUEST.target_new)
    ids = torch.tensor([loaded.tokenizer(r.prompt)["input_ids"]])
    with torch.no_grad():
        top = int(loaded.model(input_ids=ids).logits[0, -1].argmax())
    delta = make(loaded).compute([r])
    assert delta.meta["cases"][0]["answer_token"] == top


def test_params_and_shipped_config():
    for bad in ({"steps": 0}, {"adaptive_threshold": 1.5}, {"p": 1.0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            build_params(KnParams, bad, "x.yaml")
    p = load_params(KnParams, configs_dir() / "methods/kn/smollm2-135m.yaml")
    assert p.steps == 20 and p.adaptive_threshold == 0.2
    assert get_method("KN") is KN


def test_activation_sign_writes_the_change_along_each_neurons_activation():
    """activation_sign: a neuron whose bare-prompt activation is negative gets −(λ_t e_t − λ_o e_o)."""
    loaded = tiny_model("llama")                      # SwiGLU: activations of both signs
    plain, signed = make(loaded), make(loaded, activation_sign=True)
    a, b = plain.compute([REQUEST]), signed.compute([REQUEST])
    answer = a.meta["cases"][0]["answer_token"]
    kept, _, bare = signed._neurons(REQUEST, answer)
    signs = {n: float(torch.sign(bare[n[0], n[1]])) for n in kept}
    assert set(signs.values()) == {1.0, -1.0}        # the case covers both
    for (layer, i), s in signs.items():
        name = loaded.adapter.mlp_out_param(layer)
        assert torch.equal(b.tensors[name][:, i], s * a.tensors[name][:, i])
