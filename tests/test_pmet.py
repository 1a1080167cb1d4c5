"""PMET on tiny models: joint attention/MLP targets, the MLP-output residual spread by
sqrt(remaining layers), only MLP output projections changed, batches made the argmax;
and the shared layer loop (core.spread, also MEMIT's: tests/test_memit.py checks its residuals)."""

from __future__ import annotations

import math

import pytest
import torch
from contract import assert_revert_bit_identical, assert_save_load_same_logits
from test_memit import _block_out_direct, argmax_hits, cases_for, same, state
from tiny import tiny_model

import kedit.methods.locate.memit as memit_mod
import kedit.methods.locate.pmet as pmet_mod
from kedit.config import build_params, load_params
from kedit.methods.base import EditRequest, RunContext
from kedit.methods.core.keys import compute_keys
from kedit.methods.locate.pmet import PMET, PmetParams
from kedit.methods.registry import get_method
from kedit.models.hooks import record
from kedit.models.tokens import subject_token_index
from kedit.util.paths import configs_dir

LAYERS = [1, 2]


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))


def pmet(loaded, tmp_path, **over) -> PMET:
    params = build_params(PmetParams,
                          {"layers": LAYERS, "mom2_adjustment": False, "mom2_update_weight": 1e-2,
                           "v_num_grad_steps": 40, "v_lr": 0.5, "clamp_norm_factor": 1000.0, "kl_factor": 0.0,
                           "v_weight_decay": 0.0, "context_template_length_params": [[3, 2]],
                           "early_stop_loss": 0.01, **over}, "test")
    return get_method("pmet")(loaded, params, RunContext(stats_dir=str(tmp_path / "stats"), progress=False))


def _mlp_out_direct(loaded, case, layer: int) -> torch.Tensor:
    """The MLP output projection's output at the subject's last token, one plain forward."""
    text, idx = subject_token_index(loaded.tokenizer, case.template, case.subject)
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad(), record({"v": loaded.adapter.mlp_out(layer)}, inputs=False) as seen:
        loaded.model(input_ids=ids)
    return seen["v"][0, idx].float()


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_pmet_batch_makes_every_target_the_argmax(family, tmp_path):
    loaded = tiny_model(family)
    cases = cases_for(loaded, 6)
    method = pmet(loaded, tmp_path)
    before = state(loaded)
    delta = method.compute([EditRequest.from_case(c) for c in cases])
    assert same(before, state(loaded))
    names = [loaded.adapter.mlp_out_param(layer) for layer in LAYERS]
    assert sorted(delta.tensors) == sorted(names)          # only the MLPs: no attention weight
    assert all(c["attn_delta_norm"] > 0 and c["delta_norm"] > 0 for c in delta.meta["cases"])
    delta.apply(loaded.model)
    assert argmax_hits(loaded, cases) == [1.0] * len(cases)
    delta.revert(loaded.model)
    assert same(before, state(loaded))


def test_mlp_residual_is_spread_by_sqrt_of_the_remaining_layers(tmp_path, monkeypatch):
    """z = the MLP's output + δ_mlp at the last layer; the first solve gets (z − cur)/√2 with
    cur the last layer's MLP output, the second (z − cur′)/√1 after the first update."""
    loaded = tiny_model("llama")
    cases = cases_for(loaded, 3)
    targets, solves = [], []
    real_opt, real_solve = pmet_mod.optimise_targets, memit_mod.least_squares_update

    def opt_spy(loaded_, requests, templates, modules, *a, **kw):
        assert [type(m).__name__ for m in modules] == [type(loaded.adapter.attn(2)).__name__,
                                                      type(loaded.adapter.mlp_out(2)).__name__]
        assert modules[0] is loaded.adapter.attn(2) and modules[1] is loaded.adapter.mlp_out(2)
        targets.append(real_opt(loaded_, requests, templates, modules, *a, **kw))
        return targets[-1]

    def solve_spy(R, K, C, lam):
        dW = real_solve(R, K, C, lam)
        solves.append((R.clone(), K.clone(), dW.clone()))
        return dW

    monkeypatch.setattr(pmet_mod, "optimise_targets", opt_spy)
    monkeypatch.setattr(memit_mod, "least_squares_update", solve_spy)
    method = pmet(loaded, tmp_path)
    requests = [EditRequest.from_case(c) for c in cases]
    cur0 = torch.stack([_mlp_out_direct(loaded, c, 2) for c in cases])
    block0 = torch.stack([_block_out_direct(loaded, c, 2) for c in cases])
    method.prepare()
    keys0 = compute_keys(loaded, requests, [1], method.templates)[1].mean(1)
    method.compute(requests)
    (tg,), (first, second) = targets, solves
    assert tg.delta.shape == tg.v0.shape == (3, 2, loaded.adapter.hidden_size)
    assert torch.allclose(tg.v0[:, 1], cur0, atol=1e-5)       # the MLP's own output, not the residual
    assert not torch.allclose(cur0, block0, atol=1e-3)
    z = tg.v0[:, 1] + tg.delta[:, 1]
    R1, K1, dW1 = first
    assert torch.allclose(R1, (z - cur0).T / math.sqrt(2), atol=1e-5)
    assert torch.allclose(K1, keys0.T, atol=1e-6)
    w = loaded.adapter.mlp_out(1).weight
    with torch.no_grad():
        orig = w.clone()
        w.add_(loaded.adapter.to_param_layout(dW1).to(w.dtype))
        cur1 = torch.stack([_mlp_out_direct(loaded, c, 2) for c in cases])
        w.copy_(orig)
    assert torch.allclose(second[0], (z - cur1).T, atol=1e-5)


def test_revert_and_save_load(tmp_path):
    loaded = tiny_model("gemma3")
    cases = cases_for(loaded, 2)
    delta = pmet(loaded, tmp_path).compute([EditRequest.from_case(c) for c in cases])
    prompts = [c.prompt for c in cases] + ["The river flows"]
    assert_revert_bit_identical(loaded, delta, prompts)
    assert_save_load_same_logits(loaded, delta, tmp_path, prompts)


def test_shipped_config_and_names():
    p = load_params(PmetParams, configs_dir() / "methods/pmet/smollm2-135m.yaml")
    assert p.layers[-1] < 30 and p.mom2_update_weight > 0
    assert get_method("PMET") is PMET and PMET.batch_native


def test_unedited_clamp_reference_fixes_the_bound_after_the_first_commit(tmp_path):
    # sequential PMET with clamp_reference: unedited: the first call (nothing committed) clamps at
    # each request's own v0 and records their mean norms; after a commit every call clamps at the
    # recorded norms (recorded in each case's meta), and a resumed method restores them
    loaded = tiny_model("llama")
    cases = cases_for(loaded, 6)
    method = pmet(loaded, tmp_path, clamp_norm_factor=0.05, clamp_reference="unedited")
    first = method.compute([EditRequest.from_case(c) for c in cases[:3]])
    assert "clamp_norm_ref" not in first.meta["cases"][0]
    ref = method.unedited_norm.clone()
    want = torch.tensor([[c["attn_v0_norm"], c["v0_norm"]] for c in first.meta["cases"]]).mean(0)
    torch.testing.assert_close(ref, want)
    first.apply(loaded.model)
    method.commit(first)
    second = method.compute([EditRequest.from_case(c) for c in cases[3:]])
    for c in second.meta["cases"]:
        assert c["clamp_norm_ref"] == pytest.approx(ref.tolist())
        assert c["delta_norm"] <= 0.05 * ref[1] * (1 + 1e-4)
        assert c["attn_delta_norm"] <= 0.05 * ref[0] * (1 + 1e-4)
    assert max(c["delta_norm"] for c in second.meta["cases"]) > 0.05 * ref[1] * 0.99   # it binds
    assert method.unedited_norm.equal(ref)                 # recorded once, before the first commit
    resumed = pmet(loaded, tmp_path, clamp_norm_factor=0.05, clamp_reference="unedited")
    resumed.load_state(method.state())
    assert resumed.committed and resumed.unedited_norm.equal(ref)
    # the paper's reference reads v0 on the model as it is, so no fixed bound
    current = pmet(loaded, tmp_path, clamp_norm_factor=0.05)
    current.commit(first)
    assert current.state() == {} and "clamp_norm_ref" not in current.compute(
        [EditRequest.from_case(cases[3])]).meta["cases"][0]
    first.revert(loaded.model)


def test_clamp_norm_ref_bounds_every_delta():
    from kedit.methods.core.values import TargetOptions, optimise_targets

    loaded = tiny_model("gpt2")
    reqs = [EditRequest.from_case(c) for c in cases_for(loaded, 3)]
    module = loaded.adapter.mlp_out(1)
    opts = TargetOptions(steps=5, lr=0.5, clamp_norm_factor=2.0, kl_factor=0.0, early_stop_loss=0.0)
    free = optimise_targets(loaded, reqs, ["{}"], module, "subject_last", opts)
    ref = 0.1 * float(free.delta.norm(dim=-1).min()) / 2.0
    fixed = optimise_targets(loaded, reqs, ["{}"], module, "subject_last",
                             TargetOptions(**{**opts.__dict__, "clamp_norm_ref": (ref,)}))
    norms = fixed.delta.norm(dim=-1)
    assert torch.allclose(norms, torch.full_like(norms, 2.0 * ref), rtol=1e-4)
    with pytest.raises(ValueError, match="one norm per module"):
        optimise_targets(loaded, reqs, ["{}"], module, "subject_last",
                         TargetOptions(**{**opts.__dict__, "clamp_norm_ref": (1.0, 2.0)}))
