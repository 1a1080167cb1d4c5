"""The contract every registered method keeps, checked the same way for each (tiny llama):
compute() leaves the model as it was and returns an edit of the method's kind; the edit
changes the model's output where it should, reverts bit-identically and saves/loads to
the same logits; a sequential run gives the model back unchanged."""

from __future__ import annotations

import pytest
from contract import (assert_revert_bit_identical, assert_save_load_same_logits, model_state, module_tree)
from tiny import tiny_model

from kedit.config import build_params
from kedit.data.cases import EditCase, EditRequest, PromptSet
from kedit.evaluation import evaluate_cases
from kedit.methods.base import RunContext
from kedit.methods.registry import get_method, method_names
from kedit.runs.runner import run_edits

LOCATE = {"mom2_adjustment": False, "v_num_grad_steps": 20, "v_lr": 0.5, "clamp_norm_factor": 1000.0,
          "kl_factor": 0.0, "v_weight_decay": 0.0, "context_template_length_params": [[3, 1]],
          "early_stop_loss": 0.01}
#: Settings for a 3-layer tiny model, per method (a new method adds its line).
TINY = {
    "rome": {"layer": 1, **LOCATE},
    "memit": {"layers": [1, 2], "mom2_update_weight": 1e-2, **LOCATE},
    "alphaedit": {"layers": [1, 2], "mom2_samples": 20, "l2": 1e-3, **{**LOCATE, "mom2_adjustment": True}},
    "emmet": {"layers": [1, 2], "mom2_update_weight": 1.0, "emmet_lambda": 1e-6, **LOCATE},
    "pmet": {"layers": [1, 2], "mom2_update_weight": 1e-2, **LOCATE},
    "kn": {"steps": 20, "context_template_length_params": [[3, 1]]},
    "ultraedit": {"layers": [1, 2], "lr": 1e-2, "token": "mask"},
    "ft_l": {"layers": [1], "lr": 0.05, "num_steps": 10},
    "ft_m": {"layers": [1], "lr": 0.05, "num_steps": 10},
    "lora": {"num_steps": 20, "lr": 0.05},
    "grace": {"layer": 1, "n_iter": 40, "eps": 1e-4},
    "wise": {"layer": 1, "edit_lr": 30.0, "n_iter": 25, "act_margin": [0.5, 3.0, 2.0], "norm_constraint": None,
             "context_template_length_params": [[3, 2]]},
    "ike": {"k": 2, "max_context_tokens": 200},
    "mend": {"layers": [1, 2], "rank": 8, "edit_lr": 1.0, "editor": "untrained"},
    "serac": {"cls_layer": 1, "cls_hidden": 16, "cls_dim": 8, "cntr_rank": 2, "editor": "untrained"},
}

CASES = [EditCase(case_id=f"c{i}", template=t, subject=s, target_new=" of", ground_truth=" the",
                  rephrase_prompts=[f"Another fact about {s} is"],
                  locality=(PromptSet("neighborhood", ("The river flows",), (" the",)),))
         for i, (t, s) in enumerate([("A fact about {} is", "France"), ("{} is known for", "Lionel Messi")])]


def make(name, tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    loaded = tiny_model("llama")
    cls = get_method(name)
    params = build_params(cls.Params, TINY[name], "test")
    return loaded, cls(loaded, params, RunContext(stats_dir=str(tmp_path / "stats"), progress=False))


def test_every_registered_method_is_covered():
    assert sorted(TINY) == method_names()


@pytest.mark.parametrize("name", sorted(TINY))
def test_method_keeps_the_edit_contract(name, tmp_path, monkeypatch):
    loaded, method = make(name, tmp_path, monkeypatch)
    method.prepare()
    state, tree = model_state(loaded), module_tree(loaded)
    edit = method.compute([EditRequest.from_case(CASES[0])])
    after = model_state(loaded)
    assert module_tree(loaded) == tree and "forward" not in loaded.model.__dict__
    assert all((after[k] == state[k]).all() for k in state), "compute() changed the model"
    assert edit.kind == method.kind
    prompts = [CASES[0].prompt, "The river flows", "Paris is"]
    assert_revert_bit_identical(loaded, edit, prompts)
    assert_save_load_same_logits(loaded, edit, tmp_path, prompts)


@pytest.mark.parametrize("name", sorted(TINY))
def test_sequential_run_gives_the_model_back(name, tmp_path, monkeypatch):
    loaded, method = make(name, tmp_path, monkeypatch)
    state, tree = model_state(loaded), module_tree(loaded)
    result = run_edits(method, CASES, sequential=True, batch_size=1)
    assert module_tree(loaded) == tree and "forward" not in loaded.model.__dict__
    after = model_state(loaded)
    assert all((after[k] == state[k]).all() for k in state)
    assert all(r["post_immediate"] for r in result.records)
    # a cumulative edit holds its sites' whole state: only the last step is kept, and it
    # alone rebuilds the model the run evaluated last
    cumulative = result.edits["batch1"].cumulative
    assert set(result.edits) == ({"batch1"} if cumulative else {"batch0", "batch1"})
    ref = evaluate_cases(loaded.model, loaded.tokenizer, CASES)[1]
    with result.applied(loaded.model):
        now, _ = evaluate_cases(loaded.model, loaded.tokenizer, CASES, ref)
    assert [m["rewrite_acc"] for m in now] == [r["post"]["rewrite_acc"] for r in result.records]


def test_a_checkpoint_after_the_last_edit_is_the_final_score(tmp_path, monkeypatch):
    """A sequential run whose last checkpoint falls after its last edit scores the final model
    once, and those scores equal a run without checkpoints."""
    from kedit.evaluation.suite import Evaluation

    calls = []
    real = Evaluation.cases

    def counted(self, loaded, cases, ref=None):
        calls.append(len(cases))
        return real(self, loaded, cases, ref)

    monkeypatch.setattr(Evaluation, "cases", counted)
    loaded, method = make("grace", tmp_path, monkeypatch)
    points = []
    with_points = run_edits(method, CASES, sequential=True, batch_size=1, checkpoint_every=2,
                            on_checkpoint=points.append)
    assert [p["edits"] for p in points] == [2]
    assert calls == [2, 1, 1, 2]           # pre, one per edit, the checkpoint (= the final scores)
    loaded, method = make("grace", tmp_path, monkeypatch)
    plain = run_edits(method, CASES, sequential=True, batch_size=1)
    assert [r["post"] for r in with_points.records] == [r["post"] for r in plain.records]
    assert with_points.metrics["post"] == points[0]["post"]
