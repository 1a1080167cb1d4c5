"""AlphaEdit: the null-space projector and update checked by hand, the projector cache,
batch edits on tiny random models of every family, orthogonality of the update to the
preserved keys, and the sequential state kept by commit()."""

from __future__ import annotations

import pytest
import torch

import kedit.methods.locate.alphaedit as ae
from kedit.config import ConfigError, build_params, load_params
from kedit.evaluation import evaluate_cases
from kedit.methods.locate.alphaedit import AlphaEditParams, projector, projector_path
from kedit.methods.base import Delta, EditRequest, RunContext
from kedit.methods.core.keys import compute_keys
from kedit.methods.core.solve import nullspace_projector, nullspace_update
from kedit.methods.registry import get_method
from kedit.util.paths import configs_dir
from kedit.methods.core.stats import get_stats
from tiny import FAMILIES, tiny_model

# Subjects end their prompts and end in distinct tokens (see test_memit).
FACTS = [
    ("Paris is the capital city of {}", "the Kingdom of France"),
    ("The sport played by {}", "Lionel Messi"),
    ("The theory of relativity came from {}", "Albert Einstein"),
    ("The operating system made by {}", "Microsoft Windows"),
    ("The largest ocean is {}", "the Pacific Ocean"),
    ("The Brandenburg concertos were written by {}", "Johann Sebastian Bach"),
    ("The longest river of America is {}", "the Mississippi"),
    ("The prime meridian is the Greenwich {}", "Meridian"),
]
TARGETS = (" of", " and", " the", " in", " to", " a", " is", " was", " for", " with")
LAYERS = [1, 2]
SAMPLES = 30


def hits(loaded, cases) -> list[float]:
    res, _ = evaluate_cases(loaded.model, loaded.tokenizer, cases)
    return [r["rewrite_acc"] for r in res]


def cases_for(loaded, facts=FACTS):
    from kedit.data.cases import EditCase

    out = []
    for i, (template, subject) in enumerate(facts):
        for j in range(len(TARGETS)):
            case = EditCase(case_id=f"c{i}", template=template, subject=subject,
                            target_new=TARGETS[(i + j) % len(TARGETS)])
            if hits(loaded, [case]) == [0.0]:
                out.append(case)
                break
    return out


def quantile_threshold(loaded, tmp_path, q: float = 0.6) -> float:
    """A threshold leaving the lowest ``q`` share of C's eigen-directions (of the first edited
    layer) as the null space: tiny random models have no published scale for it."""
    C = get_stats(loaded, LAYERS, samples=SAMPLES, stats_dir=tmp_path / "stats", progress=False)[LAYERS[0]]
    return float(torch.quantile(torch.linalg.eigvalsh(C), q))


def alphaedit(loaded, tmp_path, **over):
    params = build_params(AlphaEditParams,
                          {"layers": LAYERS, "mom2_samples": SAMPLES, "l2": 1e-3, "v_num_grad_steps": 40,
                           "v_lr": 0.5, "clamp_norm_factor": 1000.0, "kl_factor": 0.0, "v_weight_decay": 0.0,
                           "context_template_length_params": [[3, 2]], "early_stop_loss": 0.01, **over}, "test")
    return get_method("alphaedit")(loaded, params, RunContext(stats_dir=str(tmp_path / "stats"), progress=False))


def dW_out_in(loaded, delta, layer) -> torch.Tensor:
    """The delta of ``layer`` as (d_out, d_key): read back from the weights it changes."""
    before = loaded.adapter.weight_out_in(layer).detach().clone().double()
    delta.apply(loaded.model)
    after = loaded.adapter.weight_out_in(layer).detach().clone().double()
    delta.revert(loaded.model)
    return after - before


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))



# --------------------------------------------------------------------------- the math by hand


def rotation(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


def test_projector_keeps_exactly_the_eigenvectors_below_the_threshold():
    eig = torch.tensor([5.0, 3.0, 1e-3, 2e-3, 0.5, 1e-4], dtype=torch.float64)
    P, dim = nullspace_projector(torch.diag(eig), 1e-2)
    assert dim == 3
    assert torch.allclose(P, torch.diag(torch.tensor([0, 0, 1, 1, 0, 1.0], dtype=torch.float64)), atol=1e-12)
    Q = rotation(6)
    P, dim = nullspace_projector(Q @ torch.diag(eig) @ Q.T, 1e-2)
    small = Q[:, [2, 3, 5]]
    assert dim == 3 and torch.allclose(P, small @ small.T, atol=1e-12)
    assert torch.allclose(P @ P, P, atol=1e-12) and torch.allclose(P, P.T)
    assert nullspace_projector(torch.diag(eig), 1e-5)[1] == 0          # the threshold is absolute


def test_nullspace_update_worked_by_hand():
    """C = diag(1, 1e-3), threshold 1e-2 -> P = diag(0, 1).  One key k = (1, 1), wanted
    change r = 2, L2 = 1, no earlier edits: M = k kᵀ = [[1,1],[1,1]], M P + I = [[1,1],[0,2]],
    its inverse [[1,-1/2],[0,1/2]], R kᵀ P = (0, 2), so ΔW = (0, 1): nothing on the
    preserved direction e₁, and ΔW k = 1 (the ridge halves r, as min (x-2)² + x² says)."""
    P, _ = nullspace_projector(torch.diag(torch.tensor([1.0, 1e-3], dtype=torch.float64)), 1e-2)
    dW = nullspace_update(torch.tensor([[2.0]]), torch.tensor([[1.0], [1.0]]), P, None, 1.0)
    assert torch.allclose(dW, torch.tensor([[0.0, 1.0]], dtype=torch.float64), atol=1e-12)


def test_update_is_orthogonal_to_the_preserved_keys_and_matches_the_formula():
    d_key, d_out, n = 12, 5, 3
    Q = rotation(d_key, 1)
    eig = torch.tensor([4.0, 3.0, 2.0, 1.5, 1.0, 0.8] + [1e-4] * 6, dtype=torch.float64)
    C = Q @ torch.diag(eig) @ Q.T
    P, dim = nullspace_projector(C, 1e-2)
    assert dim == 6
    g = torch.Generator().manual_seed(3)
    K = torch.randn(d_key, n, generator=g, dtype=torch.float64)
    R = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    Kp = torch.randn(d_key, 4, generator=g, dtype=torch.float64)
    dW = nullspace_update(R, K, P, Kp @ Kp.T, 0.1)
    # the paper's form, with explicit inverses
    M = Kp @ Kp.T + K @ K.T
    expect = R @ K.T @ P @ torch.linalg.inv(M @ P + 0.1 * torch.eye(d_key, dtype=torch.float64))
    assert torch.allclose(dW, expect, atol=1e-9)
    K0 = Q[:, :6] @ torch.randn(6, 50, generator=g, dtype=torch.float64)   # keys spanning the preserved subspace
    assert float((dW @ K0).norm()) < 1e-9 * float(dW.norm() * K0.norm())
    assert torch.allclose(dW @ P, dW, atol=1e-10)
    # with a small ridge the batch's own constraints hold through the null space
    dW_small = nullspace_update(R, K, P, None, 1e-8)
    assert torch.allclose(dW_small @ K, R, atol=1e-5)


# --------------------------------------------------------------------------- the projector cache


def test_projector_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    stats_file = tmp_path / "fp" / "layer3-wikitext-n10.safetensors"
    stats_file.parent.mkdir()
    C = torch.diag(torch.tensor([2.0, 1e-3, 0.5, 1e-4], dtype=torch.float64))
    calls = []
    real = ae.nullspace_projector
    monkeypatch.setattr(ae, "nullspace_projector", lambda c, t: calls.append(t) or real(c, t))

    P1, dim1, cached1 = projector(C, stats_file, 1e-2)
    path = projector_path(stats_file, 1e-2)
    assert path.parent == stats_file.parent and path.exists() and not cached1 and dim1 == 2
    P2, dim2, cached2 = projector(C, stats_file, 1e-2)
    assert cached2 and dim2 == 2 and torch.equal(P1, P2) and calls == [1e-2]
    # another threshold: another file, computed
    P3, dim3, cached3 = projector(C, stats_file, 1.0)
    assert not cached3 and dim3 == 3 and projector_path(stats_file, 1.0).exists() and calls == [1e-2, 1.0]
    # recomputed statistics (another C): the old file no longer matches and is replaced
    C2 = torch.diag(torch.tensor([2.0, 2.0, 0.5, 1e-4], dtype=torch.float64))
    P4, dim4, cached4 = projector(C2, stats_file, 1e-2)
    assert not cached4 and dim4 == 1 and calls[-1] == 1e-2
    assert projector(C2, stats_file, 1e-2)[2]
    # a damaged file is rebuilt
    path.write_bytes(b"not a safetensors file")
    P5, dim5, cached5 = projector(C2, stats_file, 1e-2)
    assert not cached5 and torch.equal(P5, P4)
    assert sorted(p.name for p in stats_file.parent.iterdir()) == sorted(
        [projector_path(stats_file, 1e-2).name, projector_path(stats_file, 1.0).name])


# --------------------------------------------------------------------------- on tiny models


@pytest.mark.parametrize("family", FAMILIES)
def test_alphaedit_batch_of_8_makes_every_target_the_argmax(family, tmp_path):
    loaded = tiny_model(family)
    cases = cases_for(loaded)
    method = alphaedit(loaded, tmp_path, nullspace_threshold=quantile_threshold(loaded, tmp_path))
    delta = method.compute([EditRequest.from_case(c) for c in cases])
    assert sorted(delta.tensors) == sorted(loaded.adapter.mlp_out_param(layer) for layer in LAYERS)
    assert delta.meta["method"] == "alphaedit"
    d = loaded.adapter.key_size
    assert all(0 < method.null_dim[layer] < d for layer in LAYERS)
    # the projector files sit beside the statistics they come from
    for layer in LAYERS:
        stats_file = method.stats_info[layer].path
        assert projector_path(stats_file, method.params.nullspace_threshold).exists()
    delta.apply(loaded.model)
    assert hits(loaded, cases) == [1.0] * len(cases)
    delta.revert(loaded.model)


def test_update_leaves_the_preserved_keys_alone_on_a_model(tmp_path):
    """‖ΔW_l U_big‖ ≈ 0 for the eigenvectors of C_l above the threshold (float32 weights),
    while MEMIT's update on the same batch has a large component there."""
    loaded = tiny_model("gpt2")                                  # Conv1D: the (in, out) layout
    cases = cases_for(loaded, FACTS[:4])
    requests = [EditRequest.from_case(c) for c in cases]
    t = quantile_threshold(loaded, tmp_path)
    method = alphaedit(loaded, tmp_path, nullspace_threshold=t)
    delta = method.compute(requests)
    memit = get_method("memit")(loaded, build_params(get_method("memit").Params, {
        "layers": LAYERS, "mom2_samples": SAMPLES, "mom2_update_weight": 1e-3, "v_num_grad_steps": 40,
        "clamp_norm_factor": 1000.0, "kl_factor": 0.0, "v_weight_decay": 0.0,
        "context_template_length_params": [[3, 2]], "early_stop_loss": 0.01}, "test"),
        RunContext(stats_dir=str(tmp_path / "stats"), progress=False))
    memit_delta = memit.compute(requests)
    for layer in LAYERS:
        evals, U = torch.linalg.eigh(method.C[layer].cpu())
        big = U[:, evals >= t]
        dW = dW_out_in(loaded, delta, layer)
        assert float(dW.norm()) > 0
        assert float((dW @ big).norm()) < 1e-5 * float(dW.norm())
        dW_memit = dW_out_in(loaded, memit_delta, layer)
        assert float((dW_memit @ big).norm()) > 0.1 * float(dW_memit.norm())


def test_commit_keeps_the_edited_keys_and_later_batches_spare_them(tmp_path):
    loaded = tiny_model("llama")
    cases = cases_for(loaded)
    first, second = [EditRequest.from_case(c) for c in cases[:4]], [EditRequest.from_case(c) for c in cases[4:]]
    t = quantile_threshold(loaded, tmp_path)
    method = alphaedit(loaded, tmp_path, nullspace_threshold=t)
    d1 = method.compute(first)
    with pytest.raises(RuntimeError, match="last compute"):
        method.commit(Delta())                                      # not the delta it computed
    d1.apply(loaded.model)
    method.commit(d1)
    d1.forget_originals()
    assert method.committed == len(first)
    # K_p K_pᵀ = Σ k kᵀ over the keys the *edited* model has for the first batch
    for layer in LAYERS:
        K = compute_keys(loaded, first, [layer], method.templates)[layer].mean(1).double()
        assert torch.allclose(method.preserved[layer], K.T @ K, rtol=1e-4, atol=1e-6)
    d2 = method.compute(second)
    fresh = alphaedit(loaded, tmp_path, nullspace_threshold=t)      # same model, nothing committed
    d2_fresh = fresh.compute(second)
    for layer in LAYERS:
        Kp = compute_keys(loaded, first, [layer], method.templates)[layer].mean(1).double().T
        spare = float((dW_out_in(loaded, d2, layer) @ Kp).norm())
        ignore = float((dW_out_in(loaded, d2_fresh, layer) @ Kp).norm())
        # a soft penalty (the keys of tiny random models are far from orthogonal), but a real one
        assert spare < 0.75 * ignore
    # the state round-trips (a resumed sequential run continues from it)
    st = method.state()
    fresh.load_state(st)
    assert fresh.committed == len(first)
    assert all(torch.equal(fresh.preserved[layer].cpu(), method.preserved[layer].cpu()) for layer in LAYERS)
    with pytest.raises(ValueError, match="expected"):
        fresh.load_state({"committed": st["committed"]})


def test_params_configs_and_easyedit_yaml(tmp_path):
    with pytest.raises(ConfigError, match="mom2_adjustment"):
        build_params(AlphaEditParams, {"mom2_adjustment": False}, "x.yaml")
    with pytest.raises(ConfigError, match="nullspace_threshold"):
        build_params(AlphaEditParams, {"nullspace_threshold": 0}, "x.yaml")
    with pytest.raises(ConfigError, match="l2"):
        build_params(AlphaEditParams, {"l2": 0.0}, "x.yaml")
    files = sorted((configs_dir() / "methods" / "alphaedit").glob("*.yaml"))
    assert {f.stem for f in files} >= {"smollm2-135m", "gpt2-xl", "gpt-j-6b", "llama"}
    for f in files:
        load_params(AlphaEditParams, f)
    p = load_params(AlphaEditParams, configs_dir() / "methods/alphaedit/gpt2-xl.yaml")
    assert p.nullspace_threshold == 2e-2 and p.l2 == 10 and p.layers == (13, 14, 15, 16, 17)
    loaded = tiny_model("llama")
    f = tmp_path / "alphaedit.yaml"
    f.write_text('alg_name: "AlphaEdit"\nmodel_name: "./hugging_cache/llama-3-8b"\nP_loc: "./null_space_project.pt"\n'
                 'layers: [1, 2]\nclamp_norm_factor: 0.75\nv_lr: 1e-1\nv_loss_layer: 2\nmom2_adjustment: true\n'
                 'mom2_update_weight: 15000\nrewrite_module_tmp: "model.layers.{}.mlp.down_proj"\n'
                 'nullspace_threshold: 2e-2\nL2: 10\n')
    p = load_params(get_method("alphaedit").Params, f, loaded.adapter)
    assert (p.layers, p.nullspace_threshold, p.l2, p.v_lr, p.v_loss_layer) == ((1, 2), 0.02, 10, 0.1, -1)
    assert get_method("alphaedit").description


def test_runner_commits_every_sequential_batch(tmp_path):
    """Through the runner: two sequential batches of 4, each committed (the delta the
    runner hands back is the one compute returned), the model restored at the end."""
    from kedit.runs.runner import run_edits

    loaded = tiny_model("qwen2")
    cases = cases_for(loaded)
    method = alphaedit(loaded, tmp_path, nullspace_threshold=quantile_threshold(loaded, tmp_path))
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    res = run_edits(method, cases, sequential=True, batch_size=4)
    assert method.committed == len(cases)
    assert all(r["post_immediate"]["rewrite_acc"] == 1.0 for r in res.records)
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
