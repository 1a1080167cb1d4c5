"""ROME on tiny random models of every family, the closed-form update, revert and determinism."""

from __future__ import annotations

import pytest
import torch

from kedit.data.cases import EditCase, PromptSet
from kedit.config import build_params
from kedit.evaluation import evaluate_cases
from kedit.methods.base import Delta, EditRequest, RunContext
from kedit.methods.core.keys import compute_keys
from kedit.methods.core.solve import least_squares_update, rank_one_update
from kedit.methods.registry import get_method
from kedit.runs.runner import run_edits
from tiny import FAMILIES, tiny_model

# Random tiny models pass little through attention (weights ~ N(0, 0.02)), so the edited
# fact's subject ends the prompt: the fact token is the one that predicts the target.
CASE = EditCase(case_id="c1", template="Paris is the capital city of {}", subject="the Kingdom of France",
                target_new=" of", ground_truth=" and",
                rephrase_prompts=("Everyone knows the Kingdom of France has its capital in",),
                locality=(PromptSet("neighborhood", ("The river Thames flows through",), (" London",)),))


def rome(loaded, tmp_path, **over):
    params = build_params(get_method("rome").Params,
                          {"layer": 1, "mom2_adjustment": False, "v_num_grad_steps": 40, "v_lr": 0.5,
                           "clamp_norm_factor": 1000.0, "kl_factor": 0.0, "v_weight_decay": 0.0,
                           "context_template_length_params": [[3, 2]], "early_stop_loss": 0.01, **over}, "test")
    return get_method("rome")(loaded, params, RunContext(stats_dir=str(tmp_path / "stats"), progress=False))


def argmax_next(loaded, prompt: str, target: str) -> bool:
    """Teacher-forced: is every target token the argmax?"""
    res, _ = evaluate_cases(loaded.model, loaded.tokenizer,
                            [EditCase(case_id="x", template="{}", subject=prompt, target_new=target)])
    return res[0]["rewrite_acc"] == 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_rome_makes_target_the_argmax(family, tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    loaded = tiny_model(family)
    assert not argmax_next(loaded, CASE.prompt, CASE.target_new)
    method = rome(loaded, tmp_path)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    delta = method.compute([EditRequest.from_case(CASE)])
    # compute() leaves the model unchanged and touches only the MLP output projection
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    assert list(delta.tensors) == [loaded.adapter.mlp_out_param(1)]
    delta.apply(loaded.model)
    assert argmax_next(loaded, CASE.prompt, CASE.target_new)
    delta.revert(loaded.model)
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())


def test_rome_with_covariance_on_gpt2_conv1d(tmp_path, monkeypatch):
    """Covariance from the shipped corpus, GPT-2's (in, out) Conv1D layout."""
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    loaded = tiny_model("gpt2")
    method = rome(loaded, tmp_path, mom2_adjustment=True, mom2_samples=30)
    delta = method.compute([EditRequest.from_case(CASE)])
    w = loaded.adapter.mlp_out(1).weight
    assert delta.tensors[loaded.adapter.mlp_out_param(1)].shape == w.shape == (128, 32)
    delta.apply(loaded.model)
    assert argmax_next(loaded, CASE.prompt, CASE.target_new)


def test_rank_one_update_hits_the_value_and_spares_orthogonal_keys():
    torch.manual_seed(0)
    d_key, d_out = 6, 4
    A = torch.randn(d_key, d_key, dtype=torch.float64)
    C = A @ A.T + torch.eye(d_key, dtype=torch.float64)
    k, delta = torch.randn(d_key, dtype=torch.float64), torch.randn(d_out, dtype=torch.float64)
    dW = rank_one_update(delta, k, C)
    assert torch.allclose(dW @ k, delta)
    # keys with C^-1-orthogonality to k are unaffected: x with x^T C^-1 k = 0
    u = torch.linalg.solve(C, k)
    x = torch.randn(d_key, dtype=torch.float64)
    x = x - (x @ u) / (u @ u) * u
    assert torch.allclose(dW @ x, torch.zeros(d_out, dtype=torch.float64), atol=1e-12)
    # hand-computed 2-D case: C = I, k = (1, 1), delta = (2,) -> dW = [[1, 1]]
    dW2 = rank_one_update(torch.tensor([2.0]), torch.tensor([1.0, 1.0]), None)
    assert torch.allclose(dW2, torch.tensor([[1.0, 1.0]], dtype=torch.float64))


def test_least_squares_update_matches_the_normal_equations():
    torch.manual_seed(1)
    d_key, d_out, n = 5, 3, 4
    K, R = torch.randn(d_key, n, dtype=torch.float64), torch.randn(d_out, n, dtype=torch.float64)
    A = torch.randn(d_key, d_key, dtype=torch.float64)
    C = A @ A.T + torch.eye(d_key, dtype=torch.float64)
    dW = least_squares_update(R, K, C, lam=2.0)
    # minimiser of ||dW K - R||^2 + lam * tr(dW C dW^T): gradient is zero
    grad = (dW @ K - R) @ K.T + 2.0 * dW @ C
    assert torch.allclose(grad, torch.zeros_like(grad), atol=1e-10)
    # with lam -> 0 and n = d_key the update solves dW K = R exactly
    K2 = torch.randn(d_key, d_key, dtype=torch.float64)
    R2 = torch.randn(d_out, d_key, dtype=torch.float64)
    assert torch.allclose(least_squares_update(R2, K2, C, lam=0.0) @ K2, R2, atol=1e-8)


def test_keys_are_the_projection_inputs_at_the_subject_token(tmp_path):
    loaded = tiny_model("llama")
    req = EditRequest.from_case(CASE)
    keys = compute_keys(loaded, [req], [0, 2], ["{}", "Hello world. {}"])
    # direct: run the bare prompt, grab the mlp_out input at the subject's last token
    from kedit.models.hooks import record
    from kedit.models.tokens import subject_token_index

    text, idx = subject_token_index(loaded.tokenizer, CASE.template, CASE.subject)
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    with record({"k": loaded.adapter.mlp_out(2)}) as seen:
        loaded.model(input_ids=ids)
    assert keys[2].shape == (1, 2, loaded.adapter.key_size)
    assert torch.allclose(keys[2][0, 0], seen["k"][0, idx], atol=1e-5)


def test_runner_restores_weights_bit_identically_and_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    loaded = tiny_model("llama")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    second = EditCase(case_id="c2", template="The sport played by {}", subject="Lionel Messi",
                      target_new=" in", ground_truth=" the")
    runs = []
    for sequential in (False, False, True):
        res = run_edits(rome(loaded, tmp_path), [CASE, second], sequential=sequential)
        assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
        runs.append(res)
    assert runs[0].metrics == runs[1].metrics           # same seed, same inputs
    assert runs[0].metrics["post"]["rewrite_acc"] == 1.0
    assert runs[0].metrics["pre"]["rewrite_acc"] < 1.0
    assert "post_immediate" in runs[2].records[0]


def test_delta_save_load_roundtrip(tmp_path):
    d = Delta({"a.weight": torch.randn(3, 2)}, {"method": "x"})
    d.save(tmp_path / "d.safetensors")
    e = Delta.load(tmp_path / "d.safetensors")
    assert torch.equal(d.tensors["a.weight"], e.tensors["a.weight"]) and e.meta == {"method": "x"}
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]


def test_rome_in_bfloat16_keeps_the_weight_dtype_and_solves_in_float64(tmp_path, monkeypatch):
    """The CUDA path's dtypes, checked on CPU: a bf16 model gets a bf16 delta from a float64 solve."""
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    import kedit.methods.locate.rome as rome_mod

    loaded = tiny_model("qwen2")
    loaded.model.to(torch.bfloat16)
    loaded.dtype = torch.bfloat16
    seen = {}
    real = rome_mod.rank_one_direction

    def spy(k, C):
        u = real(k, C)
        seen["u"] = u.dtype
        return u
    monkeypatch.setattr(rome_mod, "rank_one_direction", spy)
    delta = rome(loaded, tmp_path, mom2_adjustment=True, mom2_samples=20).compute([EditRequest.from_case(CASE)])
    (t,) = delta.tensors.values()
    assert seen["u"] == torch.float64 and t.dtype == torch.bfloat16 and torch.isfinite(t.float()).all()
    delta.apply(loaded.model)
    assert argmax_next(loaded, CASE.prompt, CASE.target_new)
