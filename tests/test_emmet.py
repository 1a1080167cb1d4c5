"""EMMET: the equality-constrained solve checked by hand, the constraint holding in a
tiny model's first edited layer, batch edits on tiny random models of every family."""

from __future__ import annotations

import pytest
import torch

import kedit.methods.locate.emmet as emmet_mod
from kedit.config import ConfigError, build_params, load_params
from kedit.models.hooks import record
from kedit.methods.base import EditRequest, RunContext
from kedit.methods.core.solve import equality_constrained_update, least_squares_update, rank_one_update
from kedit.methods.locate.emmet import EmmetParams
from kedit.methods.registry import get_method
from kedit.util.paths import configs_dir
from kedit.models.tokens import subject_token_index
from test_alphaedit import FACTS, cases_for, hits
from tiny import FAMILIES, tiny_model

LAYERS = [1, 2]


def emmet(loaded, tmp_path, **over):
    params = build_params(EmmetParams,
                          {"layers": LAYERS, "mom2_adjustment": False, "mom2_update_weight": 1.0, "emmet_lambda": 1e-6,
                           "v_num_grad_steps": 40, "v_lr": 0.5, "clamp_norm_factor": 1000.0, "kl_factor": 0.0,
                           "v_weight_decay": 0.0, "context_template_length_params": [[3, 2]],
                           "early_stop_loss": 0.01, **over}, "test")
    return get_method("emmet")(loaded, params, RunContext(stats_dir=str(tmp_path / "stats"), progress=False))


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))



# --------------------------------------------------------------------------- the math by hand


def test_orthonormal_keys_and_identity_covariance_give_r_kt():
    """C = I, λ = 1 and orthonormal keys: D = KᵀK = I, so ΔW = R Kᵀ (each key writes its own
    residual; nothing else moves)."""
    K = torch.eye(5, dtype=torch.float64)[:, [0, 3]]
    R = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    dW = equality_constrained_update(R, K, torch.eye(5, dtype=torch.float64), 1.0)
    assert torch.allclose(dW, R @ K.T, atol=1e-12)


def test_constraints_hold_exactly_and_one_edit_is_rome():
    g = torch.Generator().manual_seed(0)
    d_key, d_out, n = 10, 4, 3
    A = torch.randn(d_key, 40, generator=g, dtype=torch.float64)
    C = A @ A.T / 40
    K = torch.randn(d_key, n, generator=g, dtype=torch.float64)
    R = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    dW = equality_constrained_update(R, K, C, 15000.0)
    assert torch.allclose(dW @ K, R, atol=1e-9)                       # (W + ΔW) K = W K + R
    # the closed form, with explicit inverses: R (Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹ (λ cancels)
    Ci = torch.linalg.inv(C)
    assert torch.allclose(dW, R @ torch.linalg.inv(K.T @ Ci @ K) @ K.T @ Ci, atol=1e-9)
    # minimal change on the preserved keys: any other ΔW' meeting the constraints costs more
    other = dW + torch.randn(d_out, d_key, generator=g, dtype=torch.float64) @ (
        torch.eye(d_key, dtype=torch.float64) - K @ torch.linalg.pinv(K))
    assert torch.allclose(other @ K, R, atol=1e-9)
    assert torch.trace(dW @ C @ dW.T) < torch.trace(other @ C @ other.T)
    # one edit: ROME's rank-one update (and the ridge is not applied to a single edit)
    assert torch.allclose(equality_constrained_update(R[:, :1], K[:, :1], C, 1.0, ridge=0.5),
                          rank_one_update(R[:, 0], K[:, 0], C), atol=1e-10)
    # the ridge: λ matters only through λ·ridge, and it relaxes the constraints
    a = equality_constrained_update(R, K, C, 10.0, ridge=0.1)
    b = equality_constrained_update(R, K, C, 1.0, ridge=1.0)
    assert torch.allclose(a, b, atol=1e-9) and not torch.allclose(a @ K, R, atol=1e-6)
    # MEMIT is EMMET with the ridge as large as MEMIT's λ (push-through identity:
    # Kᵀ(λC + KKᵀ)⁻¹ = (KᵀC⁻¹K + λI)⁻¹KᵀC⁻¹)
    assert torch.allclose(equality_constrained_update(R, K, C, 1.0, ridge=1500.0),
                          least_squares_update(R, K, C, 1500.0), atol=1e-9)
    # update_norm_lambda adds μ·I to λ·C
    c = equality_constrained_update(R, K, C, 2.0, norm_lambda=0.5)
    Ai = torch.linalg.inv(2.0 * C + 0.5 * torch.eye(d_key, dtype=torch.float64))
    assert torch.allclose(c, R @ torch.linalg.inv(K.T @ Ai @ K) @ K.T @ Ai, atol=1e-9)


# --------------------------------------------------------------------------- on tiny models


def _mlp_out_at_fact(loaded, request: EditRequest, layer: int) -> torch.Tensor:
    text, idx = subject_token_index(loaded.tokenizer, request.template, request.subject)
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad(), record({"o": loaded.adapter.mlp_out(layer)}, inputs=False) as seen:
        loaded.model(input_ids=ids)
    return seen["o"][0, idx].double()


def test_first_layer_writes_its_residual_exactly(tmp_path, monkeypatch):
    """No context prefixes (the key is the bare prompt's), no ridge: with only the first
    layer's update in the model, the projection's output at each fact token moves by
    exactly that layer's residual column, (W + ΔW) k_i = W k_i + r_i."""
    loaded = tiny_model("gptj")
    cases = cases_for(loaded, FACTS[:4])
    requests = [EditRequest.from_case(c) for c in cases]
    solves = []
    real = emmet_mod.equality_constrained_update
    monkeypatch.setattr(emmet_mod, "equality_constrained_update",
                        lambda R, K, *a, **kw: solves.append((R.clone(), K.clone())) or real(R, K, *a, **kw))
    method = emmet(loaded, tmp_path, emmet_lambda=0.0, context_template_length_params=[])
    delta = method.compute(requests)
    assert method.templates == ["{}"] and len(solves) == len(LAYERS)
    R1, _ = solves[0]
    before = torch.stack([_mlp_out_at_fact(loaded, r, LAYERS[0]) for r in requests], 1)
    name = loaded.adapter.mlp_out_param(LAYERS[0])
    first = type(delta)({name: delta.tensors[name]}).apply(loaded.model)
    after = torch.stack([_mlp_out_at_fact(loaded, r, LAYERS[0]) for r in requests], 1)
    first.revert(loaded.model)
    assert torch.allclose(after - before, R1.double(), atol=1e-4 * float(R1.abs().max()))


@pytest.mark.parametrize("family", FAMILIES)
def test_emmet_batch_of_8_makes_every_target_the_argmax(family, tmp_path):
    loaded = tiny_model(family)
    cases = cases_for(loaded)
    method = emmet(loaded, tmp_path)
    delta = method.compute([EditRequest.from_case(c) for c in cases])
    assert sorted(delta.tensors) == sorted(loaded.adapter.mlp_out_param(layer) for layer in LAYERS)
    assert delta.meta["method"] == "emmet"
    delta.apply(loaded.model)
    assert hits(loaded, cases) == [1.0] * len(cases)
    delta.revert(loaded.model)


def test_emmet_with_covariance_on_one_layer(tmp_path):
    """The authors' setting: one layer, covariance from a corpus (30 shipped texts)."""
    loaded = tiny_model("mistral")
    cases = cases_for(loaded)
    method = emmet(loaded, tmp_path, layers=[2], mom2_adjustment=True, mom2_samples=30, mom2_update_weight=1000.0,
                   emmet_lambda=1e-6)
    delta = method.compute([EditRequest.from_case(c) for c in cases])
    assert list(delta.tensors) == [loaded.adapter.mlp_out_param(2)] and sorted(method.C) == [2]
    delta.apply(loaded.model)
    assert hits(loaded, cases) == [1.0] * len(cases)


def test_params_configs_and_easyedit_yaml(tmp_path):
    with pytest.raises(ConfigError, match="emmet_lambda"):
        build_params(EmmetParams, {"emmet_lambda": -1.0}, "x.yaml")
    files = sorted((configs_dir() / "methods" / "emmet").glob("*.yaml"))
    assert {f.stem for f in files} >= {"smollm2-135m", "gpt2-xl", "gpt-j-6b", "llama"}
    for f in files:
        load_params(EmmetParams, f)
    p = load_params(EmmetParams, configs_dir() / "methods/emmet/gpt2-xl.yaml")
    assert (p.layers, p.mom2_update_weight, p.emmet_lambda) == ((17,), 1000, 0.1)
    loaded = tiny_model("gpt2")
    f = tmp_path / "emmet.yaml"
    f.write_text('alg_name: "EMMET"\nlayers: [1, 2]\nclamp_norm_factor: 0.75\nlayer_selection: "all"\n'
                 'v_lr: 5e-1\nv_loss_layer: 2\nmom2_adjustment: true\nmom2_update_weight: 1\n'
                 'rewrite_module_tmp: "transformer.h.{}.mlp.c_proj"\nmom2_dataset: "wikipedia"\n'
                 'update_norm_lambda: 0\nemmet_lambda: 0.1\n')
    p = load_params(get_method("emmet").Params, f, loaded.adapter)
    assert (p.layers, p.emmet_lambda, p.update_norm_lambda, p.mom2_update_weight) == ((1, 2), 0.1, 0, 1)
    assert get_method("emmet").description
