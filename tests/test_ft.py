"""FT-L and FT-M on tiny random models of every family: the edit, the L∞ bound, the
untouched model, the two objectives' token positions, and their hparams files."""

from __future__ import annotations

import pytest
import torch

from kedit.data.cases import EditCase
from kedit.config import ConfigError, build_params, load_params
from kedit.evaluation import evaluate_cases
from kedit.methods.base import EditRequest, RunContext
from kedit.methods.core.keys import Row
from kedit.methods.finetune.ft import loss_terms
from kedit.methods.registry import get_method
from kedit.util.paths import configs_dir
from tiny import FAMILIES, tiny_model

# As in test_rome: the subject ends the prompt, one-token target.
CASE = EditCase(case_id="c1", template="Paris is the capital city of {}", subject="the Kingdom of France",
                target_new=" of", ground_truth=" and")
SETTINGS = {"layers": [1, 2], "lr": 0.05, "num_steps": 30, "early_stop_loss": 0.05}


def method(loaded, name, **over):
    cls = get_method(name)
    return cls(loaded, build_params(cls.Params, {**SETTINGS, **over}, "test"), RunContext(progress=False))


def rewrite_acc(loaded) -> float:
    res, _ = evaluate_cases(loaded.model, loaded.tokenizer, [CASE])
    return res[0]["rewrite_acc"]


def state(loaded) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in loaded.model.state_dict().items()}


def unchanged(loaded, before) -> bool:
    return all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
def test_ft_m_makes_target_the_argmax_and_leaves_the_model_unchanged(family):
    loaded = tiny_model(family)
    assert rewrite_acc(loaded) == 0.0
    before = state(loaded)
    flags = {n: p.requires_grad for n, p in loaded.model.named_parameters()}
    delta = method(loaded, "ft_m").compute([EditRequest.from_case(CASE)])
    assert unchanged(loaded, before)
    assert flags == {n: p.requires_grad for n, p in loaded.model.named_parameters()}
    assert sorted(delta.tensors) == sorted(loaded.adapter.mlp_out_param(l) for l in (1, 2))
    assert delta.meta["cases"][0]["loss"] < delta.meta["cases"][0]["loss_start"]
    delta.apply(loaded.model)
    assert rewrite_acc(loaded) == 1.0
    delta.revert(loaded.model)
    assert unchanged(loaded, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_ft_l_respects_its_bound_and_edits_when_the_bound_allows(family):
    loaded = tiny_model(family)
    before = state(loaded)
    bound = 1e-3
    tight = method(loaded, "ft_l", norm_constraint=bound).compute([EditRequest.from_case(CASE)])
    assert unchanged(loaded, before)
    worst = max(float(t.abs().max()) for t in tight.tensors.values())
    assert worst <= bound and worst == pytest.approx(bound)   # the clamp binds, and holds exactly
    assert tight.meta["cases"][0]["steps"] == SETTINGS["num_steps"]

    loose = method(loaded, "ft_l", norm_constraint=0.5, mlp_in=True).compute([EditRequest.from_case(CASE)])
    assert len(loose.tensors) == 2 * (1 + len(loaded.adapter.mlp_in(1)))
    assert max(float(t.abs().max()) for t in loose.tensors.values()) <= 0.5
    assert loose.meta["cases"][0]["loss"] < tight.meta["cases"][0]["loss"]
    loose.apply(loaded.model)
    assert rewrite_acc(loaded) == 1.0


def test_objectives_read_the_target_where_each_definition_says():
    # ids: 3 prompt tokens then 2 target tokens (7, 8); the prompt's last position is 2
    row = Row(0, (4, 5, 6, 7, 8), lookup=2, target_start=3, target_end=5)
    terms, w = loss_terms([row], "prompt_last", "cpu")
    assert terms.tolist() == [[0, 0], [2, 2], [7, 8]] and w.tolist() == [0.5, 0.5]
    terms, w = loss_terms([row], "target_new", "cpu")
    assert terms.tolist() == [[0, 0], [2, 3], [7, 8]] and w.tolist() == [0.5, 0.5]


def test_fitting_two_requests_together():
    loaded = tiny_model("llama")
    other = EditCase(case_id="c2", template="The sport played by {}", subject="Lionel Messi",
                     target_new=" in", ground_truth=" the")
    delta = method(loaded, "ft_m", num_steps=40).compute([EditRequest.from_case(c) for c in (CASE, other)])
    assert [c["case_id"] for c in delta.meta["cases"]] == ["c1", "c2"]
    delta.apply(loaded.model)
    res, _ = evaluate_cases(loaded.model, loaded.tokenizer, [CASE, other])
    assert [r["rewrite_acc"] for r in res] == [1.0, 1.0]


def test_shipped_and_easyedit_configs_load(tmp_path):
    loaded = tiny_model("llama")
    for name in ("ft_l", "ft_m"):
        cls = get_method(name)
        for f in sorted((configs_dir() / "methods" / name).glob("*.yaml")):
            p = load_params(cls.Params, f)
            assert p.objective == ("prompt_last" if name == "ft_l" else "target_new")
    smol = load_params(get_method("ft_l").Params, configs_dir() / "methods" / "ft_l" / "smollm2-135m.yaml")
    assert smol.norm_constraint is not None and smol.norm_constraint > 0
    # an EasyEdit FT file (LLaMA layout, ".weight" in the module template, norm bound off)
    easy = tmp_path / "ft.yaml"
    easy.write_text('alg_name: "FT"\nmodel_name: "x"\ndevice: 0\nlayers: [1]\nnum_steps: 25\nbatch_size: 1\n'
                    'max_length: 40\nlr: 5e-4\nweight_decay: 0\nkl_factor: 0\nnorm_constraint: false\n'
                    'objective_optimization: "target_new"\n'
                    'rewrite_module_tmp: "model.layers.{}.mlp.down_proj.weight"\n')
    p = load_params(get_method("ft_m").Params, easy, loaded.adapter)
    assert (p.layers, p.lr, p.num_steps, p.norm_constraint) == ((1,), 5e-4, 25, None)
    with pytest.raises(ConfigError, match="use --method ft_m"):
        load_params(get_method("ft_l").Params, easy, loaded.adapter)
    with pytest.raises(ConfigError, match="kl_factor"):
        build_params(get_method("ft_l").Params, {"kl_factor": 0.1}, "x.yaml")
