"""SERAC on tiny models: out-of-scope inputs keep the base model's output bit for bit,
in-scope positions take the counterfactual model's (scoring, padded batches and cached
generation alike), the memory accumulates, training teaches the scope classifier, and a
saved editor reloads to identical edits."""

from __future__ import annotations

import json
from dataclasses import replace

import torch
from contract import assert_revert_bit_identical, assert_save_load_same_logits, cached_step_logits, logits
from tiny import tiny_model

from kedit.config import build_params
from kedit.data.cases import EditRequest
from kedit.evaluation.generation import generate
from kedit.methods.base import RunContext
from kedit.methods.edit import ModuleEdit, WrapperSpec
from kedit.methods.learned.serac import (SERAC, SeracLearner, SeracParams, SeracWrapper, body_path, context_text,
                                         merged_weights)
from kedit.methods.learned.trainer import EDITOR_FILE, Split, TrainSettings, save_editor, train_editor

REQ = EditRequest("c0", "A fact about {} is", "France", " of", " the")
PROMPTS = ["A fact about France is", "The river flows", "Paris is"]


def params(**kw) -> SeracParams:
    return build_params(SeracParams, {"cls_layer": 1, "cls_hidden": 16, "cls_dim": 8, "cntr_rank": 2, **kw}, "test")


def untrained_edit(loaded, scale: float = 1.0, **kw) -> ModuleEdit:
    method = SERAC(loaded, params(editor="untrained", **kw), RunContext(seed=0, progress=False))
    edit = method.compute([REQ])
    # a counterfactual change that is not zero, so the counterfactual model differs from the base
    (spec,) = edit.modules.values()
    for k in spec.tensors:
        if k.startswith("cntr.b."):
            spec.tensors[k] = scale * torch.randn(spec.tensors[k].shape, generator=torch.Generator().manual_seed(1))
    return edit


def routing(edit: ModuleEdit, everything: bool) -> ModuleEdit:
    """The same edit with a classifier that puts every input in scope (all embeddings 0,
    the key 0: distance 0) or none (the key far away)."""
    (path, spec), = edit.modules.items()
    t = dict(spec.tensors)
    if everything:
        t["cls.l2.weight"] = torch.zeros_like(t["cls.l2.weight"])
        t["cls.l2.bias"] = torch.zeros_like(t["cls.l2.bias"])
        t["keys"] = torch.zeros_like(t["keys"])
    else:
        t["keys"] = torch.full_like(t["keys"], 1e3)
    return ModuleEdit({path: WrapperSpec(spec.cls, spec.config, t)})


def counterfactual_logits(loaded, edit: ModuleEdit, prompt: str | list[int]) -> torch.Tensor:
    """The counterfactual model (base + B A) on "edit context + prompt": logits at the prompt's positions."""
    (spec,) = edit.modules.values()
    cfg, t = spec.config, spec.tensors
    from kedit.methods.learned.serac import CntrSite

    sites = [CntrSite(**s) for s in cfg["sites"]]
    a = [t[f"cntr.a.{i}"] for i in range(len(sites))]
    b = [t[f"cntr.b.{i}"] for i in range(len(sites))]
    tok = loaded.tokenizer
    ctx = tok(context_text(REQ.prompt, REQ.target_new, cfg["separator"]))["input_ids"]
    ids = tok(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
    weights = merged_weights(loaded.model, sites, a, b, cfg["layout"], relative=False)
    with torch.no_grad():
        out = torch.func.functional_call(loaded.model, weights, args=(),
                                         kwargs={"input_ids": torch.tensor([ctx + ids])}).logits
    return out[0, len(ctx):]


def test_out_of_scope_inputs_keep_the_base_output_bit_for_bit():
    loaded = tiny_model("llama")
    edit = routing(untrained_edit(loaded), everything=False)
    base = logits(loaded, PROMPTS)
    edit.apply(loaded.model)
    assert isinstance(loaded.model.get_submodule(body_path(loaded.adapter)), SeracWrapper)
    got = logits(loaded, PROMPTS)
    edit.revert(loaded.model)
    assert torch.equal(got, base)


def test_in_scope_positions_take_the_counterfactual_model():
    loaded = tiny_model("llama")
    edit = routing(untrained_edit(loaded), everything=True)
    tok = loaded.tokenizer
    edit.apply(loaded.model)
    got = logits(loaded, PROMPTS)                        # a right-padded batch
    edit.revert(loaded.model)
    for i, p in enumerate(PROMPTS):
        n = len(tok(p)["input_ids"])
        torch.testing.assert_close(got[i, :n], counterfactual_logits(loaded, edit, p), rtol=1e-4, atol=1e-5)


def test_cached_generation_is_routed_like_a_full_forward():
    loaded = tiny_model("llama")
    edit = routing(untrained_edit(loaded, scale=30.0), everything=True)
    tok = loaded.tokenizer
    edit.apply(loaded.model)
    together = generate(loaded, PROMPTS, max_new_tokens=6)          # left-padded, with a key/value cache
    alone = [generate(loaded, [p], max_new_tokens=6)[0] for p in PROMPTS]
    edit.revert(loaded.model)
    assert together == alone
    # greedy decoding of the counterfactual model itself, token by token, no cache
    for p, text in zip(PROMPTS, alone):
        ids = tok(p)["input_ids"]
        start = len(ids)
        for _ in range(6):
            ids.append(int(counterfactual_logits(loaded, edit, ids)[-1].argmax()))
        assert text == tok.decode(ids[start:])
    assert together != generate(loaded, PROMPTS, max_new_tokens=6)   # the base model continues otherwise


def test_edit_contract_and_memory_that_accumulates():
    loaded = tiny_model("gpt2")                          # Conv1D weights: the counterfactual change's layout
    method = SERAC(loaded, params(editor="untrained"), RunContext(seed=0, progress=False))
    first = method.compute([REQ])
    assert_revert_bit_identical(loaded, routing(first, everything=True), PROMPTS)
    assert_save_load_same_logits(loaded, first, __import__("pathlib").Path(__import__("tempfile").mkdtemp()), PROMPTS)
    first.apply(loaded.model)
    second = method.compute([EditRequest("c1", "{} plays", "Lionel Messi", " football", " golf")])
    (spec,) = second.modules.values()
    assert spec.tensors["keys"].shape[0] == 2 and spec.tensors["ctx_len"].tolist()[0] == \
        first.modules[body_path(loaded.adapter)].tensors["ctx_len"].tolist()[0]
    second.apply(loaded.model)
    second.revert(loaded.model)
    first.revert(loaded.model)
    assert not isinstance(loaded.model.get_submodule(body_path(loaded.adapter)), SeracWrapper)


def _cases():
    from test_mend import learn_cases

    locs = ["The river flows", "Paris is a city", "A book about cats", "The weather today"]
    return [replace(c, loc_prompt=locs[i % 4]) for i, c in enumerate(learn_cases(36))]


def test_training_teaches_the_scope_classifier(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    loaded = tiny_model("llama")
    learner = SeracLearner(loaded, params(lr=1e-2, cntr_lr=1e-2, batch_size=4), seed=0)
    cases = _cases()
    summary = train_editor(learner, Split(cases[:28], cases[28:], {}), tmp_path, TrainSettings(
        steps=60, batch_size=4, val_every=20, patience=100, grad_clip=100.0, seed=0, early_stop_on="score"),
        {"name": loaded.name, "fingerprint": loaded.fingerprint})
    curve = [json.loads(line) for line in (tmp_path / "curve.jsonl").read_text().splitlines()]
    val = [p for p in curve if p["kind"] == "val"]
    assert val[0]["cls_pos_acc"] + val[0]["cls_neg_acc"] < 1.9
    assert val[-1]["cls_pos_acc"] == 1.0 and val[-1]["cls_neg_acc"] == 1.0
    assert val[-1]["loss_cls"] < val[0]["loss_cls"] / 5 and val[-1]["loss_cntr"] < val[0]["loss_cntr"]
    assert summary["best"]["locality"] == 1.0


def test_saved_editor_reloads_to_identical_edits(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    loaded = tiny_model("llama")
    learner = SeracLearner(loaded, params(lr=1e-2, batch_size=4), seed=0)
    cases = _cases()
    train_editor(learner, Split(cases[:28], cases[28:], {}), tmp_path / "run",
                 TrainSettings(steps=3, batch_size=4, val_every=3, patience=9, grad_clip=100.0, seed=0),
                 {"name": loaded.name, "fingerprint": loaded.fingerprint})
    save_editor(tmp_path / EDITOR_FILE, learner, {"name": loaded.name, "fingerprint": loaded.fingerprint}, 3, {})
    edits = [SERAC(loaded, params(editor=str(w))).compute([REQ]) for w in (tmp_path / EDITOR_FILE, tmp_path)]
    a, b = (next(iter(e.modules.values())).tensors for e in edits)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = learner.module().state_dict()
    assert all(torch.equal(a[k], state[k].cpu()) for k in state)


def test_kedit_edit_writes_a_run_of_several_serac_edits(tmp_path, monkeypatch):
    from tiny import save_tiny_model_dir
    from typer.testing import CliRunner

    from kedit.cli import app
    from kedit.runs.result import EDIT_FILE

    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    model = save_tiny_model_dir(tmp_path / "model", "llama")
    cases = tmp_path / "cases.jsonl"
    cases.write_text("".join(json.dumps({"case_id": f"x{i}", "prompt": f"A fact about {s} is", "subject": s,
                                         "target_new": "of", "ground_truth": "the"}) + "\n"
                             for i, s in enumerate(["France", "Tokyo"])))
    hp = tmp_path / "serac.yaml"
    hp.write_text("cls_layer: 1\ncls_hidden: 16\ncls_dim: 8\ncntr_rank: 2\neditor: untrained\n")
    res = CliRunner().invoke(app, ["edit", str(cases), "--method", "serac", "--model", str(model), "--device", "cpu",
                                   "--hparams", str(hp), "--out", str(tmp_path / "runs"), "--gen-tokens", "4"])
    assert res.exit_code == 0, res.output
    (run,) = list((tmp_path / "runs").iterdir())
    assert (run / EDIT_FILE).exists() and (run / "metrics.json").exists()


def test_a_cached_step_keeps_the_history_of_the_sequence():
    # the routed state of a cached step is the counterfactual model's on the whole sequence
    # so far, whatever name the cache arrives under
    loaded = tiny_model("llama")
    edit = routing(untrained_edit(loaded, scale=30.0), everything=True)
    ids = loaded.tokenizer("A fact about France is the")["input_ids"]
    edit.apply(loaded.model)
    step = cached_step_logits(loaded.model, ids)
    edit.revert(loaded.model)
    torch.testing.assert_close(step, counterfactual_logits(loaded, edit, ids)[-1], rtol=1e-4, atol=1e-5)
