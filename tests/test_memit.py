"""MEMIT on tiny random models of every family: batch edits, the per-layer residual split,
covariance, configs (kedit and EasyEdit YAMLs) and the runner's one-call batches."""

from __future__ import annotations

import pytest
import torch

import kedit.methods.locate.memit as memit_mod
from kedit.data.cases import EditCase
from kedit.config import ConfigError, build_params, load_params
from kedit.evaluation import evaluate_cases
from kedit.models.hooks import record
from kedit.methods.base import EditRequest, RunContext
from kedit.methods.core.keys import compute_keys
from kedit.methods.locate.memit import MemitParams
from kedit.methods.registry import get_method
from kedit.util.paths import configs_dir
from kedit.runs.runner import run_edits
from kedit.models.tokens import subject_token_index
from tiny import FAMILIES, tiny_model

# As in test_rome: random tiny models pass little through attention, so each subject ends
# its prompt (the fact token predicts the target), and the subjects end in distinct tokens
# (their keys must differ for a batch of edits to be solvable).
FACTS = [
    ("Paris is the capital city of {}", "the Kingdom of France"),    # ...ce
    ("The sport played by {}", "Lionel Messi"),                      # ...i
    ("The theory of relativity came from {}", "Albert Einstein"),    # ...in
    ("The operating system made by {}", "Microsoft Windows"),        # ...s
    ("The largest ocean is {}", "the Pacific Ocean"),                # ...an
    ("The Brandenburg concertos were written by {}", "Johann Sebastian Bach"),  # ...h
    ("The longest river of America is {}", "the Mississippi"),       # Mississippi
    ("The prime meridian is the Greenwich {}", "Meridian"),          # Meridian
]
# Single-token targets (in the tiny tokenizer's vocabulary).
TARGETS = (" of", " and", " the", " in", " to", " a", " is", " was", " for", " with")
LAYERS = [1, 2]


def argmax_hits(loaded, cases) -> list[float]:
    """Teacher-forced rewrite accuracy of each case."""
    res, _ = evaluate_cases(loaded.model, loaded.tokenizer, cases)
    return [r["rewrite_acc"] for r in res]


def cases_for(loaded, n: int = len(FACTS)) -> list[EditCase]:
    """One case per fact whose target is not the pre-edit argmax (targets rotate over TARGETS)."""
    out = []
    for i, (template, subject) in enumerate(FACTS[:n]):
        for j in range(len(TARGETS)):
            target = TARGETS[(i + j) % len(TARGETS)]
            case = EditCase(case_id=f"c{i}", template=template, subject=subject, target_new=target)
            if argmax_hits(loaded, [case]) == [0.0]:
                out.append(case)
                break
        else:
            raise AssertionError(f"every candidate target is already the argmax for {subject!r}")
    return out


def memit(loaded, tmp_path, **over):
    params = build_params(MemitParams,
                          {"layers": LAYERS, "mom2_adjustment": False, "mom2_update_weight": 1e-2,
                           "v_num_grad_steps": 40, "v_lr": 0.5, "clamp_norm_factor": 1000.0, "kl_factor": 0.0,
                           "v_weight_decay": 0.0, "context_template_length_params": [[3, 2]],
                           "early_stop_loss": 0.01, **over}, "test")
    return get_method("memit")(loaded, params, RunContext(stats_dir=str(tmp_path / "stats"), progress=False))


def state(loaded) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in loaded.model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))



@pytest.mark.parametrize("family", FAMILIES)
def test_memit_batch_of_8_makes_every_target_the_argmax(family, tmp_path):
    loaded = tiny_model(family)
    cases = cases_for(loaded)
    method = memit(loaded, tmp_path)
    before = state(loaded)
    delta = method.compute([EditRequest.from_case(c) for c in cases])
    assert same(before, state(loaded))                      # compute() leaves the model as it was
    # exactly the MLP output projections of the configured layers, in their own layout
    params = dict(loaded.model.named_parameters())
    names = [loaded.adapter.mlp_out_param(layer) for layer in LAYERS]
    assert sorted(delta.tensors) == sorted(names)
    assert all(delta.tensors[n].shape == params[n].shape for n in names)
    assert [c["case_id"] for c in delta.meta["cases"]] == [c.case_id for c in cases]
    assert delta.meta["method"] == "memit"
    assert {"key", "target", "update"} <= set(method.ctx.timings)
    delta.apply(loaded.model)
    assert argmax_hits(loaded, cases) == [1.0] * len(cases)
    after = state(loaded)
    assert {k for k in after if not torch.equal(after[k], before[k])} == set(names)
    delta.revert(loaded.model)
    assert same(before, state(loaded))


def test_memit_with_covariance_from_the_shipped_corpus(tmp_path, monkeypatch):
    """C from 30 WikiText-2 texts for both layers (one get_stats call), GPT-2's Conv1D layout."""
    import kedit.methods.core.stats

    calls = []
    real = kedit.methods.core.stats.get_stats
    monkeypatch.setattr(kedit.methods.core.stats, "get_stats", lambda loaded, layers, **kw: calls.append(list(layers))
                        or real(loaded, layers, **kw))
    loaded = tiny_model("gpt2")
    cases = cases_for(loaded)
    method = memit(loaded, tmp_path, mom2_adjustment=True, mom2_samples=30)
    delta = method.compute([EditRequest.from_case(c) for c in cases])
    method.prepare()                                        # idempotent: no second pass
    assert calls == [LAYERS]
    assert sorted(method.C) == LAYERS
    assert all(c.shape == (128, 128) for c in method.C.values())
    assert len(list((tmp_path / "stats").rglob("*.safetensors"))) == len(LAYERS)
    delta.apply(loaded.model)
    assert argmax_hits(loaded, cases) == [1.0] * len(cases)


def _block_out_direct(loaded, case: EditCase, layer: int) -> torch.Tensor:
    """Block ``layer``'s output at the subject's last token of the bare prompt, one plain forward."""
    text, idx = subject_token_index(loaded.tokenizer, case.template, case.subject)
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad(), record({"h": loaded.adapter.block(layer)}, inputs=False) as seen:
        loaded.model(input_ids=ids)
    return seen["h"][0, idx].float()


def test_residual_is_spread_over_the_remaining_layers(tmp_path, monkeypatch):
    """Layers (1, 2): the first solve gets (z - cur_z)/2, the second the whole remaining
    (z - cur_z') with cur_z' measured after the first layer's update."""
    loaded = tiny_model("llama")
    cases = cases_for(loaded, 3)
    targets, solves = [], []
    real_opt, real_solve = memit_mod.optimise_targets, memit_mod.least_squares_update

    def opt_spy(*a, **kw):
        targets.append(real_opt(*a, **kw))
        return targets[-1]

    def solve_spy(R, K, C, lam):
        dW = real_solve(R, K, C, lam)
        solves.append((R.clone(), K.clone(), C.clone(), lam, dW.clone()))
        return dW

    monkeypatch.setattr(memit_mod, "optimise_targets", opt_spy)
    monkeypatch.setattr(memit_mod, "least_squares_update", solve_spy)
    method = memit(loaded, tmp_path)
    requests = [EditRequest.from_case(c) for c in cases]
    cur0 = torch.stack([_block_out_direct(loaded, c, 2) for c in cases])
    method.prepare()
    keys0 = compute_keys(loaded, requests, [1], method.templates)[1].mean(1)
    method.compute(requests)
    (tg,), (first, second) = targets, solves
    z = tg.v0 + tg.delta
    assert torch.allclose(tg.v0, cur0, atol=1e-5)           # z is written at the LAST layer's block
    R1, K1, C1, lam1, dW1 = first
    assert torch.allclose(R1, (z - cur0).T / 2, atol=1e-5)
    assert torch.allclose(K1, keys0.T, atol=1e-6)
    assert torch.equal(C1, torch.eye(loaded.adapter.key_size, dtype=torch.float64)) and lam1 == 1e-2
    # the second layer sees the model with the first update in place
    w = loaded.adapter.mlp_out(1).weight
    with torch.no_grad():
        orig = w.clone()
        w.add_(loaded.adapter.to_param_layout(dW1).to(w.dtype))
        cur1 = torch.stack([_block_out_direct(loaded, c, 2) for c in cases])
        keys1 = compute_keys(loaded, requests, [2], method.templates)[2].mean(1)
        w.copy_(orig)
    R2, K2 = second[0], second[1]
    assert torch.allclose(R2, (z - cur1).T, atol=1e-5)
    assert torch.allclose(K2, keys1.T, atol=1e-6)
    assert not torch.allclose(cur1, cur0, atol=1e-4)        # the first update did move block 2's output


def test_params_check_and_shipped_configs():
    with pytest.raises(ConfigError, match="layers"):
        build_params(MemitParams, {"layers": [1, 3]}, "x.yaml")
    with pytest.raises(ConfigError, match="layers"):
        build_params(MemitParams, {"layers": [2, 1]}, "x.yaml")
    with pytest.raises(ConfigError, match="layers"):
        build_params(MemitParams, {"layers": []}, "x.yaml")
    with pytest.raises(ConfigError, match="v_loss_layer"):
        build_params(MemitParams, {"layers": [3, 4], "v_loss_layer": 2}, "x.yaml")
    files = sorted((configs_dir() / "methods" / "memit").glob("*.yaml"))
    assert {f.stem for f in files} >= {"smollm2-135m", "gpt2-xl", "gpt-j-6b", "llama"}
    for f in files:
        p = load_params(MemitParams, f)
        assert isinstance(p.layers, tuple) and p.context_template_length_params == ((10, 5),)
    assert load_params(MemitParams, configs_dir() / "methods/memit/gpt2-xl.yaml").mom2_update_weight == 20000


EASYEDIT_MEMIT = """\
alg_name: "MEMIT"
model_name: "./hugging_cache/tiny-llama"
stats_dir: "./data/stats"
device: 0
layers: [1, 2]
clamp_norm_factor: 0.75
fact_token: "subject_last"
v_num_grad_steps: 25
v_lr: 5e-1
v_loss_layer: 2
v_weight_decay: 0.5
kl_factor: 0.0625
mom2_adjustment: true
mom2_update_weight: 15000
rewrite_module_tmp: "{rewrite}"
layer_module_tmp: "model.layers.{{}}"
mlp_module_tmp: "model.layers.{{}}.mlp"
attn_module_tmp: "model.layers.{{}}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
model_parallel: false
"""


def test_easyedit_memit_yaml_loads_and_wrong_module_is_refused(tmp_path):
    loaded = tiny_model("llama")
    good = tmp_path / "memit-llama.yaml"
    good.write_text(EASYEDIT_MEMIT.format(rewrite="model.layers.{}.mlp.down_proj"))
    p = load_params(get_method("memit").Params, good, loaded.adapter)
    assert p == MemitParams(layers=(1, 2), clamp_norm_factor=0.75, fact_token="subject_last", v_num_grad_steps=25,
                            v_lr=0.5, v_loss_layer=-1, v_weight_decay=0.5, kl_factor=0.0625, mom2_adjustment=True,
                            mom2_update_weight=15000, mom2_samples=100000,
                            early_stop_on="total")  # EasyEdit's compute_z stops on the whole loss
    bad = tmp_path / "memit-bad.yaml"
    bad.write_text(EASYEDIT_MEMIT.format(rewrite="model.layers.{}.mlp.up_proj"))
    with pytest.raises(ConfigError) as err:
        load_params(MemitParams, bad, loaded.adapter)
    assert str(bad) in str(err.value) and "rewrite_module_tmp" in str(err.value)


def test_runner_gives_memit_the_whole_batch_in_one_call(tmp_path):
    loaded = tiny_model("qwen2")
    cases = cases_for(loaded, 4)
    method = memit(loaded, tmp_path)
    assert get_method("memit").batch_native is True
    calls = []
    real = method.compute
    method.compute = lambda requests: calls.append(len(requests)) or real(requests)
    before = state(loaded)
    res = run_edits(method, cases)
    assert calls == [len(cases)]
    assert same(before, state(loaded))
    assert res.metrics["post"]["rewrite_acc"] == 1.0 and res.metrics["pre"]["rewrite_acc"] == 0.0
    assert all(r["method"]["steps"] >= 1 and r["batch"] == 0 for r in res.records)
    assert len({id(d) for d in res.deltas.values()}) == 1


def test_registered():
    cls = get_method("memit")
    assert cls is memit_mod.MEMIT and cls.Params is MemitParams and cls.description
