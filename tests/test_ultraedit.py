"""UltraEdit on tiny models: keys and output gradients (checked against the weight gradient),
the lifelong normalisation (exact running statistics), the closed-form shift computed by
hand, an edit that makes its target the argmax, and a sequential run whose normalisation
state resumes bit-identically."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from contract import assert_revert_bit_identical, assert_save_load_same_logits, check_sequential_resume
from safetensors.torch import load_file, save_file
from tiny import tiny_model

from kedit.config import ConfigError, build_params, load_params
from kedit.data.cases import EditCase
from kedit.evaluation import evaluate_cases
from kedit.methods.base import EditRequest, RunContext
from kedit.methods.locate.ultraedit import EPS, RunningStats, UltraEdit, UltraEditParams
from kedit.methods.registry import get_method
from kedit.models.tokens import encode_prompt_target
from kedit.util.paths import configs_dir

REQUESTS = [EditRequest("a", "The sport played by {}", "Lionel Messi", " of"),
            EditRequest("b", "A fact about {} is", "France", " the city"),
            EditRequest("c", "The river {} flows", "Thames", " in"),
            EditRequest("d", "{} is known for", "Tokyo", " a")]


def make(loaded, **over) -> UltraEdit:
    params = build_params(UltraEditParams, {"layers": [1, 2], "lr": 1e-2, "token": "mask", **over}, "test")
    return get_method("ultraedit")(loaded, params, RunContext(progress=False))


def weight_grad(loaded, requests, param: str) -> torch.Tensor:
    """∂L/∂W in (out, in) layout by plain autograd, L = Σ_requests mean-token target NLL."""
    w = loaded.model.get_parameter(param)
    w.requires_grad_(True)
    try:
        loss = 0.0
        for r in requests:
            pt = encode_prompt_target(loaded.tokenizer, r.prompt, r.target_new)
            ids = torch.tensor([pt.input_ids])
            logp = F.log_softmax(loaded.model(input_ids=ids).logits[0].float(), -1)
            tgt = ids[0, pt.target_start: pt.target_end]
            loss = loss - logp[torch.arange(pt.target_start - 1, pt.target_end - 1), tgt].mean()
        (g,) = torch.autograd.grad(loss, [w])
    finally:
        w.requires_grad_(False)
    return g.T if loaded.adapter.spec.weight_layout == "in_out" else g


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("modules", [["mlp_out"], ["mlp_in"]])
def test_keys_and_gradients_are_the_weight_gradients_factors(family, modules):
    """With every position read (token: mask), Σ_t g_t k_tᵀ is the loss's gradient w.r.t. W."""
    loaded = tiny_model(family)
    method = make(loaded, modules=modules)
    method.prepare()
    kg = method.keys_and_grads(REQUESTS[:2])
    assert len(kg) == len(method.sites) == 2 * len(loaded.adapter.mlp_in(0) if modules == ["mlp_in"] else [0])
    for param, (K, G) in kg.items():
        want = weight_grad(loaded, REQUESTS[:2], param)
        assert torch.allclose(G.T @ K, want.double(), atol=1e-5, rtol=1e-4), param


def test_ans_reads_the_positions_that_predict_the_target():
    loaded = tiny_model("llama")
    m_mask, m_ans = make(loaded), make(loaded, token="ans")
    m_mask.prepare(), m_ans.prepare()
    r = REQUESTS[1]
    pt = encode_prompt_target(loaded.tokenizer, r.prompt, r.target_new)
    K_all, G_all = next(iter(m_mask.keys_and_grads([r]).values()))
    K_ans, G_ans = next(iter(m_ans.keys_and_grads([r]).values()))
    pos = list(range(pt.target_start - 1, pt.target_end - 1))
    assert K_all.shape[0] == len(pt.input_ids) and K_ans.shape[0] == len(pos) == 2
    assert torch.equal(K_ans, K_all[pos]) and torch.equal(G_ans, G_all[pos])
    assert torch.equal(G_all[-1], torch.zeros_like(G_all[-1]))   # the last token predicts nothing in the loss


def test_running_statistics_merge_exactly():
    torch.manual_seed(0)
    x = torch.randn(13, 5, dtype=torch.float64) * 3 + 1
    s = RunningStats.empty(5, "cpu")
    assert torch.equal(s.std(), torch.zeros(5))
    one = s.merged(x[:1])
    assert torch.equal(one.std(), torch.zeros(5))                 # a single row: no spread yet (no NaN)
    both = s.merged(x[:4]).merged(x[4:9]).merged(x[9:])
    assert float(both.n) == 13
    assert torch.allclose(both.mean, x.mean(0), atol=1e-12)
    assert torch.allclose(both.std(), x.std(0), atol=1e-12)      # unbiased, as the reference's n − 1
    assert torch.allclose(both.normalise(x), (x - x.mean(0)) / (x.std(0) + EPS), atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shift_is_the_closed_form_on_normalised_features(family):
    """First turn from an empty state, by hand: ẑ standardises [k; g] over the turn's rows,
    v = −η‖k̂‖²ĝ, ΔW = Vᵀ K (KᵀK + I)⁻¹; a second turn normalises with both turns' rows."""
    loaded = tiny_model(family)
    method = make(loaded, lr=0.3)
    method.prepare()
    kg = method.keys_and_grads(REQUESTS[:2])
    delta = method.compute(REQUESTS[:2])
    for param, (K, G) in kg.items():
        Z = torch.cat([K, G], 1)
        Zh = (Z - Z.mean(0)) / (Z.std(0) + EPS)
        kh, gh = Zh[:, : K.shape[1]], Zh[:, K.shape[1]:]
        V = -0.3 * (kh ** 2).sum(1, keepdim=True) * gh
        dW = V.T @ K @ torch.linalg.inv(K.T @ K + torch.eye(K.shape[1], dtype=torch.float64))
        got = delta.tensors[param].T if loaded.adapter.spec.weight_layout == "in_out" else delta.tensors[param]
        assert torch.allclose(got.double(), dW, atol=1e-6 * float(dW.abs().max()) + 1e-9), param
    # independent (not committed): the next compute starts from the same empty statistics
    again = method.compute(REQUESTS[:2])
    assert all(torch.equal(again.tensors[k], delta.tensors[k]) for k in delta.tensors)
    method.commit(again)
    kg2 = method.keys_and_grads(REQUESTS[2:])
    second = method.compute(REQUESTS[2:])
    for param, (K2, G2) in kg2.items():
        K1, G1 = kg[param]
        Z = torch.cat([torch.cat([K1, G1], 1), torch.cat([K2, G2], 1)])
        Zh = ((torch.cat([K2, G2], 1) - Z.mean(0)) / (Z.std(0) + EPS))
        kh, gh = Zh[:, : K2.shape[1]], Zh[:, K2.shape[1]:]
        V = -0.3 * (kh ** 2).sum(1, keepdim=True) * gh
        dW = V.T @ K2 @ torch.linalg.inv(K2.T @ K2 + torch.eye(K2.shape[1], dtype=torch.float64))
        got = second.tensors[param].T if loaded.adapter.spec.weight_layout == "in_out" else second.tensors[param]
        assert torch.allclose(got.double(), dW, atol=1e-6 * float(dW.abs().max()) + 1e-9), param


def test_edit_makes_the_target_the_argmax_and_reverts_bit_identically(tmp_path):
    loaded = tiny_model("llama")
    case = EditCase(case_id="a", template="The sport played by {}", subject="Lionel Messi", target_new=" of")
    (pre,), _ = evaluate_cases(loaded.model, loaded.tokenizer, [case])
    assert pre["rewrite_acc"] == 0.0
    method = make(loaded, lr=0.5, layers=[1, 2])
    delta = method.compute([EditRequest.from_case(case)])
    assert sorted(delta.tensors) == sorted(loaded.adapter.mlp_out_param(layer) for layer in (1, 2))
    delta.apply(loaded.model)
    (post,), _ = evaluate_cases(loaded.model, loaded.tokenizer, [case])
    delta.revert(loaded.model)
    assert post["rewrite_acc"] == 1.0
    assert_revert_bit_identical(loaded, delta)
    assert_save_load_same_logits(loaded, delta, tmp_path)


def test_normalisation_state_resumes_bit_identically(tmp_path):
    """Four committed turns in one go, against two turns, the state saved (safetensors) and
    loaded into a fresh method, then two more: the same shifts and the same state, bit for bit."""
    loaded = tiny_model("llama")
    model = loaded.model

    def turns(method, requests):
        out = []
        for r in requests:
            d = method.compute([r])
            d.apply(model)
            method.commit(d)
            out.append(d)
        return out

    a = make(loaded)
    whole = turns(a, REQUESTS)
    want = a.state()
    for d in reversed(whole):
        d.revert(model)
    b = make(loaded)
    first = turns(b, REQUESTS[:2])
    save_file(b.state(), str(tmp_path / "state.safetensors"))
    c = make(loaded)
    c.load_state(load_file(str(tmp_path / "state.safetensors")))
    rest = turns(c, REQUESTS[2:])
    for got, ref in zip(first + rest, whole):
        assert got.tensors.keys() == ref.tensors.keys()
        assert all(torch.equal(got.tensors[k], ref.tensors[k]) for k in ref.tensors)
    now = c.state()
    assert now.keys() == want.keys() and all(torch.equal(now[k], want[k]) for k in want)
    assert int(now["turns"]) == 4 and float(now[f"norm.{c.sites[0][0]}.n"]) > 4
    with pytest.raises(ValueError, match="ultraedit state"):
        make(loaded, layers=[2]).load_state(want)


def test_sequential_bench_resumes_like_an_uninterrupted_run(tmp_path, monkeypatch):
    metrics = check_sequential_resume(tmp_path, monkeypatch, "ultraedit",
                                      {"layers": [1, 2], "lr": 0.5, "token": "mask"}, UltraEdit)
    assert metrics["n"] == 5 and metrics["post"]["rewrite_acc"] > metrics["pre"]["rewrite_acc"]


def test_params_and_shipped_config():
    with pytest.raises(ConfigError, match="lr"):
        build_params(UltraEditParams, {"lr": 0}, "x.yaml")
    with pytest.raises(ConfigError, match="modules"):
        build_params(UltraEditParams, {"modules": ["mlp_out", "mlp_out"]}, "x.yaml")
    with pytest.raises(ConfigError, match="modules"):
        build_params(UltraEditParams, {"modules": ["attn"]}, "x.yaml")
    p = load_params(UltraEditParams, configs_dir() / "methods/ultraedit/smollm2-135m.yaml")
    assert max(p.layers) < 30 and p.lr > 0
    assert get_method("UltraEdit") is UltraEdit
