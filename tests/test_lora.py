"""LoRA / AdaLoRA (kind ``adapter``) on tiny random models of every family: the edit, the
untouched model, the wrapper against peft's own layers, the merged weights, the contract
checks (revert, save/load, sequential resume), continuing an installed adapter, seeding,
and ``kedit edit`` + ``kedit apply`` to a plain Hugging Face directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from contract import (assert_revert_bit_identical, assert_save_load_same_logits, check_sequential_resume, logits,
                      model_state, module_tree)
from tiny import FAMILIES, save_tiny_model_dir, tiny_model
from typer.testing import CliRunner

from kedit.cli import app
from kedit.config import ConfigError, build_params, load_params
from kedit.data.cases import EditCase, load_cases
from kedit.evaluation import evaluate_cases
from kedit.methods.base import EditRequest, RunContext
from kedit.methods.edit import Delta, EditError, EditWrapper
from kedit.methods.finetune.lora import LoRA, LoraWrapper
from kedit.methods.registry import get_method
from kedit.models.load import load_model
from kedit.runs.rundir import read_results
from kedit.util.paths import configs_dir

runner = CliRunner()

# As in test_ft: the subject ends the prompt, one-token target (not the argmax before).
CASE = EditCase(case_id="c1", template="Paris is the capital city of {}", subject="the Kingdom of France",
                target_new=" of", ground_truth=" and")
OTHER = EditCase(case_id="c2", template="{} is known for", subject="Lionel Messi", target_new=" in",
                 ground_truth=" the")
TINY = {"num_steps": 20, "lr": 0.05}          # every other setting: EasyEdit's (q/v, r 8, alpha 32, dropout 0.1)
PROMPTS = [CASE.prompt, "The river flows", "Paris is"]


def method(loaded, seed: int = 0, **over) -> LoRA:
    cls = get_method("lora")
    return cls(loaded, build_params(cls.Params, {**TINY, **over}, "test"), RunContext(seed=seed, progress=False))


def rewrite_acc(loaded, case=CASE) -> float:
    res, _ = evaluate_cases(loaded.model, loaded.tokenizer, [case])
    return res[0]["rewrite_acc"]


def grad_flags(loaded) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in loaded.model.named_parameters()}


def unchanged(loaded, state, tree, flags) -> bool:
    now = model_state(loaded)
    return (module_tree(loaded) == tree and grad_flags(loaded) == flags and now.keys() == state.keys()
            and all(torch.equal(now[k], state[k]) for k in state) and "peft_config" not in loaded.model.__dict__)


@pytest.mark.parametrize("variant", ["adalora", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_edit_makes_target_the_argmax_and_leaves_the_model_unchanged(family, variant):
    loaded = tiny_model(family)
    assert rewrite_acc(loaded) == 0.0
    state, tree, flags = model_state(loaded), module_tree(loaded), grad_flags(loaded)
    m = method(loaded, variant=variant)
    edit = m.compute([EditRequest.from_case(CASE)])
    assert unchanged(loaded, state, tree, flags)
    assert edit.kind == "adapter" and edit.mergeable and edit.cumulative
    # the attention's q and v (one fused qkv projection in GPT-2 / GPT-NeoX) of every layer
    per_layer = 1 if family in ("gpt2", "gpt_neox") else 2
    assert len(edit.modules) == per_layer * loaded.adapter.n_layers
    attn = [loaded.adapter.module_path("attn", layer) + "." for layer in range(loaded.adapter.n_layers)]
    assert all(any(p.startswith(a) for a in attn) for p in edit.modules)
    info = edit.meta["cases"][0]
    assert info["loss"] < info["loss_start"]
    edit.apply(loaded.model)
    assert all(isinstance(loaded.model.get_submodule(p), LoraWrapper) for p in edit.modules)
    assert rewrite_acc(loaded) == 1.0
    edit.revert(loaded.model)
    assert unchanged(loaded, state, tree, flags)


def _peft_logits(loaded, m: LoRA, edit, prompts) -> torch.Tensor:
    """The same factors in peft's own layers (eval mode), before unload."""
    from peft import get_peft_model

    paths = list(edit.modules)
    peft_model = get_peft_model(loaded.model, m.peft_config(paths))
    try:
        with torch.no_grad():
            for path in paths:
                layer = peft_model.base_model.model.get_submodule(path)
                f = edit.modules[path].tensors
                if m.params.variant == "lora":
                    layer.lora_A["default"].weight.copy_(f["lora_A"])
                    layer.lora_B["default"].weight.copy_(f["lora_B"])
                else:
                    for name in ("lora_A", "lora_B", "lora_E", "ranknum"):
                        getattr(layer, name)["default"].copy_(f[name])
        peft_model.eval()
        return logits(loaded, prompts)
    finally:
        peft_model.base_model.unload()


@pytest.mark.parametrize("variant", ["adalora", "lora"])
@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_wrapper_gives_peft_models_output_and_the_merged_weights_give_the_same(family, variant):
    loaded = tiny_model(family)
    m = method(loaded, variant=variant)
    edit = m.compute([EditRequest.from_case(CASE)])
    base = logits(loaded, PROMPTS)
    peft_out = _peft_logits(loaded, m, edit, PROMPTS)
    assert not torch.allclose(peft_out, base, atol=1e-4)
    edit.apply(loaded.model)
    adapted = logits(loaded, PROMPTS)
    edit.revert(loaded.model)
    assert torch.equal(adapted, peft_out)

    delta = edit.merged(loaded.model)
    assert isinstance(delta, Delta)
    params = dict(loaded.model.named_parameters())
    assert sorted(delta.tensors) == sorted(f"{p}.weight" for p in edit.modules)
    for name, d in delta.tensors.items():
        assert d.shape == params[name].shape          # GPT-2's Conv1D: (in, out)
    # merge into a copy of the weights: a plain model with the adapter's logits
    copy = tiny_model(family)
    with torch.no_grad():
        for name, d in delta.tensors.items():
            copy.model.get_parameter(name).add_(d)
    real = loaded.tokenizer(PROMPTS, return_tensors="pt", padding=True)["attention_mask"].bool()
    merged, adapted, base = logits(copy, PROMPTS)[real], adapted[real], base[real]   # padding positions aside
    assert torch.allclose(merged, adapted, atol=1e-5, rtol=1e-5)
    assert (merged - base).abs().max() > 1000 * (merged - adapted).abs().max()


@pytest.mark.parametrize("variant", ["adalora", "lora"])
def test_contract_revert_and_save_load(variant, tmp_path):
    loaded = tiny_model("gpt2")
    edit = method(loaded, variant=variant).compute([EditRequest.from_case(CASE)])
    assert_revert_bit_identical(loaded, edit, PROMPTS)
    back = assert_save_load_same_logits(loaded, edit, tmp_path, PROMPTS)
    assert back.modules.keys() == edit.modules.keys()
    assert all(s.cls is LoraWrapper and s.config == edit.modules[p].config for p, s in back.modules.items())


@pytest.mark.parametrize("variant", ["adalora", "lora"])
def test_sequential_resume_equals_uninterrupted(variant, tmp_path, monkeypatch):
    want = check_sequential_resume(tmp_path, monkeypatch, "lora", {**TINY, "variant": variant}, LoRA)
    assert want["post"]["rewrite_acc"] > want["pre"]["rewrite_acc"]


def test_same_seed_same_edit_and_the_callers_random_state_is_kept():
    runs = []
    for seed in (0, 0, 1):
        loaded = tiny_model("llama")
        torch.manual_seed(123)
        rng = torch.get_rng_state()
        runs.append(method(loaded, seed=seed).compute([EditRequest.from_case(CASE)]))
        assert torch.equal(torch.get_rng_state(), rng)
    same = [all(torch.equal(a.modules[p].tensors[k], b.modules[p].tensors[k]) for p in a.modules
                for k in a.modules[p].tensors) for a, b in ((runs[0], runs[1]), (runs[0], runs[2]))]
    assert same == [True, False]


@pytest.mark.parametrize("variant", ["adalora", "lora"])
def test_next_edit_continues_the_installed_adapter(variant):
    loaded = tiny_model("llama")
    m = method(loaded, variant=variant, lora_dropout=0.0)
    first = m.compute([EditRequest.from_case(CASE)])
    first.apply(loaded.model)
    first.forget_originals()             # kept, as a sequential run keeps it
    again = m.compute([EditRequest.from_case(CASE)])
    # peft's adapter started from the installed factors: its first loss is the first edit's final one
    assert again.meta["cases"][0]["loss_start"] == pytest.approx(first.meta["cases"][0]["loss"], rel=1e-5)
    assert again.meta["adapter_steps"] == 2 * TINY["num_steps"]
    assert all(s.config["steps"] == 2 * TINY["num_steps"] for s in again.modules.values())
    installed = {p: loaded.model.get_submodule(p) for p in first.modules}
    again.apply(loaded.model)            # the same wrapper objects take the new state
    assert all(loaded.model.get_submodule(p) is w for p, w in installed.items())
    assert rewrite_acc(loaded) == 1.0
    other = "lora" if variant == "adalora" else "adalora"
    with pytest.raises(EditError, match="adapter"):
        method(loaded, variant=other).compute([EditRequest.from_case(OTHER)])


def test_adalora_allocates_the_rank_budget():
    loaded = tiny_model("llama")
    pruned = method(loaded).compute([EditRequest.from_case(CASE)])
    kept = method(loaded, rank_allocation=False).compute([EditRequest.from_case(CASE)])
    nonzero = [int((s.tensors["lora_E"] != 0).sum()) for s in pruned.modules.values()]
    assert all(s.tensors["lora_A"].shape[0] == 12 for s in pruned.modules.values())        # init_rank
    assert sum(nonzero) == 8 * len(nonzero) and pruned.meta["cases"][0]["mean_rank"] == 8  # target rank on average
    assert all(int((s.tensors["lora_E"] != 0).sum()) == 12 for s in kept.modules.values())


@pytest.mark.parametrize("variant", ["adalora", "lora"])
def test_early_stop_ends_training_once_the_target_nll_is_below_the_threshold(variant):
    loaded = tiny_model("llama")
    full = method(loaded, variant=variant, num_steps=40).compute([EditRequest.from_case(CASE)])
    history = full.meta["loss_history"]
    threshold = history[10]                       # reached after 10 steps: stop there (the NLL falls)
    short = method(loaded, variant=variant, num_steps=40, early_stop_loss=threshold * 1.0001
                   ).compute([EditRequest.from_case(CASE)])
    steps = short.meta["cases"][0]["steps"]
    assert steps == next(i for i, h in enumerate(history) if h < threshold * 1.0001) < 40
    assert short.meta["loss_history"] == history[: steps + 1]
    assert all(s.config["steps"] == steps for s in short.modules.values())


def test_target_modules_and_layers():
    loaded = tiny_model("llama")
    m = method(loaded, layers=[1], target_modules=["up_proj", "down_proj"])
    assert m.target_paths() == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(EditError, match="no module named"):
        method(loaded, target_modules=["c_attn"]).target_paths()
    with pytest.raises(ConfigError, match="init_rank"):
        build_params(LoRA.Params, {"rank": 16}, "test")
    with pytest.raises(ConfigError, match="kl_factor"):
        build_params(LoRA.Params, {"kl_factor": 0.1}, "test")


def test_shipped_config_loads():
    params = load_params(LoRA.Params, configs_dir() / "methods" / "lora" / "smollm2-135m.yaml")
    assert params.variant in ("adalora", "lora") and params.target_modules is None


def test_wrapper_is_an_edit_wrapper_of_kind_adapter():
    loaded = tiny_model("gpt2")
    base = loaded.model.get_submodule("transformer.h.0.attn.c_attn")
    w = LoraWrapper(base, {"variant": "lora", "rank": 2, "scaling": 2.0, "layout": "in_out", "steps": 0})
    assert isinstance(w, EditWrapper) and w.kind == "adapter" and w.mergeable
    a, b = torch.randn(2, 32), torch.randn(96, 2)
    w.load_wrapper_state({"lora_A": a, "lora_B": b})
    x = torch.randn(3, 32)
    assert torch.allclose(w(x), base(x) + 2.0 * x @ a.T @ b.T, atol=1e-5)
    assert torch.allclose(w.merged_weight_delta()["weight"], 2.0 * (b @ a).T)   # Conv1D layout (in, out)
    assert "lora_A" not in w.state_dict()
    with pytest.raises(EditError):
        w.load_wrapper_state({"lora_A": a})


# ----------------------------------------------------------------------------- kedit edit + kedit apply


@pytest.mark.parametrize("sequential", [False, True])
def test_edit_then_apply_gives_a_plain_model_with_the_runs_post_metrics(tmp_path, monkeypatch, sequential):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    model_dir = save_tiny_model_dir(tmp_path / "tiny-gpt2", "gpt2")
    cases = tmp_path / "cases.jsonl"
    cases.write_text("".join(json.dumps({"case_id": c.case_id, "prompt": c.template.replace("{}", c.subject),
                                         "subject": c.subject, "target_new": c.target_new,
                                         "ground_truth": c.ground_truth}) + "\n" for c in (CASE, OTHER)))
    hp = tmp_path / "lora.yaml"
    hp.write_text(yaml.safe_dump(TINY))
    extra = ["--sequential"] if sequential else []
    res = runner.invoke(app, ["edit", str(cases), "--method", "lora", "--model", str(model_dir), "--hparams", str(hp),
                              "--out", str(tmp_path / "runs"), "--gen-tokens", "0", "--device", "cpu", *extra])
    assert res.exit_code == 0, res.output
    (run,) = list((tmp_path / "runs").iterdir())
    out = tmp_path / "exported"
    pick = [] if sequential else ["--case", "c1"]
    res = runner.invoke(app, ["apply", str(run), "--out", str(out), *pick])
    assert res.exit_code == 0, res.output
    assert not (out / "kedit-edit.safetensors").exists()        # merged: a plain model directory

    run_cases = load_cases(run / "cases.jsonl")
    base = load_model(str(model_dir), device="cpu")
    _, reference = evaluate_cases(base.model, base.tokenizer, run_cases)
    edited = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    records = read_results(run / "results.jsonl")
    chosen = run_cases if sequential else run_cases[:1]
    post, _ = evaluate_cases(edited, tok, chosen, reference)
    want = [r["post"] for r in records][: len(chosen)]
    assert [p["rewrite_acc"] for p in post] == [w["rewrite_acc"] for w in want]
    assert max(p["rewrite_acc"] for p in post) == 1.0
    for p, w in zip(post, want):   # merged weights: the same numbers up to float rounding
        assert p.keys() == w.keys()
        assert all(p[k] == pytest.approx(w[k], abs=1e-4) for k in p if isinstance(p[k], float))
