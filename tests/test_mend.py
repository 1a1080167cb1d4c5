"""MEND on tiny models: the untrained editor is a plain gradient step (the identity
transform), the training-time edit is the edit-time Delta, meta-training raises held-out
edit success, a saved editor reloads to identical edits, an editor for another model is
refused, and the edit keeps the contract of weight deltas."""

from __future__ import annotations

import json

import pytest
import torch
from contract import assert_revert_bit_identical, assert_save_load_same_logits, logits
from tiny import tiny_model
from typer.testing import CliRunner

from kedit.cli import app
from kedit.config import ConfigError, build_params
from kedit.data.cases import EditRequest
from kedit.methods.base import RunContext
from kedit.methods.learned.mend import (MEND, MendEditor, MendLearner, MendParams, edit_sites, factored_update,
                                        gradient_factors, padded_by_owner, row_nll, target_terms, trow)
from kedit.methods.learned.trainer import (EDITOR_FILE, LearnCase, TrainSettings, register_editor, save_editor,
                                           Split, train_editor)
from kedit.methods.core.keys import pad_id
from kedit.models.tokens import pad_batch

SUBJECTS = ["France", "Lionel Messi", "the Thames", "Mount Everest", "Tokyo", "Paris", "the Moon", "Brazil",
            "Mozart", "the Nile", "Berlin", "Einstein", "Canada", "Picasso", "the Alps", "Rome", "Chopin",
            "Kenya", "Madrid", "Newton", "Peru", "Oslo", "Dante", "Cairo", "Vienna", "Goethe", "Chile",
            "Lisbon", "Darwin", "Nepal", "Athens", "Kepler", "Cuba", "Dublin", "Homer", "Fiji"]
TARGETS = [" of", " the", " and", " in", " to", " was"]
REQ = EditRequest("c0", "A fact about {} is", "France", " of", " the")


def learn_cases(n: int, start: int = 0) -> list[LearnCase]:
    out = []
    for i in range(start, start + n):
        s = SUBJECTS[i % len(SUBJECTS)]
        out.append(LearnCase(f"c{i}", f"A fact about {s} is", s, TARGETS[i % len(TARGETS)],
                             f"Something about {s} is", "The river flows", " the"))
    return out


def params(**kw) -> MendParams:
    return build_params(MendParams, {"rank": 8, **kw}, "test")


def true_gradient(loaded, names, req: EditRequest) -> dict[str, torch.Tensor]:
    rows = [trow(loaded.tokenizer, req.prompt, req.target_new)]
    ids = torch.tensor([rows[0].ids])
    ws = [loaded.model.get_parameter(n) for n in names]
    for w in ws:
        w.requires_grad_(True)
    try:
        out = loaded.model(input_ids=ids).logits
        terms = target_terms(rows, ids.device)
        grads = torch.autograd.grad(row_nll(out[terms[0], terms[1]], terms, 1).sum(), ws)
    finally:
        for w in ws:
            w.requires_grad_(False)
    return dict(zip(names, grads))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_untrained_editor_is_the_identity_so_the_edit_is_a_gradient_step(family):
    loaded = tiny_model(family)
    sites = edit_sites(loaded, [1, 2], True)
    editor = MendEditor(sites, 8, 1, 0.5, seed=3).eval()
    x = [torch.randn(5, s.d_in) for s in sites]
    d = [torch.randn(5, s.d_out) for s in sites]
    for (xt, dt), xi, di in zip(editor.transform(x, d), x, d):
        assert torch.equal(xt, xi) and torch.equal(dt, di)
    # the Delta of the untrained editor: −edit_lr · ∇_W L, in the parameter's own layout (GPT-2: Conv1D)
    method = MEND(loaded, params(layers=[1, 2], edit_lr=0.5, editor="untrained"))
    delta = method.compute([REQ])
    grads = true_gradient(loaded, list(delta.tensors), REQ)
    assert set(delta.tensors) == {s.param for s in sites} and len(sites) == {"llama": 6, "gpt2": 4}[family]
    for name, t in delta.tensors.items():
        assert t.shape == grads[name].shape
        torch.testing.assert_close(t, -0.5 * grads[name], rtol=1e-4, atol=1e-7)


def test_training_time_edit_is_the_edit_time_delta():
    """The trainer applies an edit as −α (h X̃ᵀ) D̃ on the outputs, row by row; applying the
    Delta that compute() returns gives the same logits."""
    loaded = tiny_model("llama")
    p = params(layers=[1, 2], edit_lr=0.3, editor="untrained")
    learner = MendLearner(loaded, p, seed=0)
    learner.editor.train(True)
    learner.train_loss(learn_cases(4))           # running statistics: the editor now normalises
    learner.editor.train(False)
    with torch.no_grad():
        learner.editor.nets[next(iter(learner.editor.nets))].layers[0].u.normal_(0, 0.01)  # not the identity
    method = MEND(loaded, p)
    method._editor = learner.editor                # the same editor, as loaded
    delta = method.compute([REQ])
    rows = [trow(loaded.tokenizer, REQ.prompt, REQ.target_new)]
    ids, mask = pad_batch([r.ids for r in rows], pad_id(loaded.tokenizer))
    with torch.enable_grad():
        factors, _ = gradient_factors(loaded, learner.modules, rows, ids, mask)
    with torch.no_grad():
        tr = learner.editor.transform([f[0] for f in factors], [f[1] for f in factors])
        xt = [padded_by_owner(t[0], f[2], 1) for t, f in zip(tr, factors)]
        dt = [padded_by_owner(t[1], f[2], 1) for t, f in zip(tr, factors)]
        owner = torch.zeros(3, dtype=torch.long)
        prompts = [REQ.prompt, "The river flows", "Paris is"]
        with factored_update(learner.modules, learner.editor.edit_lrs, xt, dt, owner):
            factored = logits(loaded, prompts)
    base = logits(loaded, prompts)
    delta.apply(loaded.model)
    applied = logits(loaded, prompts)
    delta.revert(loaded.model)
    assert not torch.allclose(applied, base, atol=1e-4)
    torch.testing.assert_close(factored, applied, rtol=1e-4, atol=1e-5)


def test_edit_loss_on_prompt_or_rephrase():
    """The meta-loss's edit term is the NLL after the edit on the rephrasing (the paper) or
    on the edit prompt itself (EasyEdit): the same edit, scored on different rows."""
    loaded = tiny_model("llama")
    cases = learn_cases(2)
    out = {}
    for on in ("rephrase", "prompt"):
        learner = MendLearner(loaded, params(layers=[2], edit_lr=0.5, edit_loss_on=on, c_loc=0.0), seed=0)
        learner.editor.train(False)
        _, info = learner.train_loss(cases)
        out[on] = info["loss_edit"]
    method = MEND(loaded, params(layers=[2], edit_lr=0.5, editor="untrained"))
    want = {}
    for on, attr in (("rephrase", "rephrase"), ("prompt", "prompt")):
        nll = []
        for c in cases:
            delta = method.compute([EditRequest(c.case_id, c.prompt.replace(c.subject, "{}"), c.subject, c.target)])
            delta.apply(loaded.model)
            rows = [trow(loaded.tokenizer, getattr(c, attr), c.target)]
            with torch.no_grad():
                lg = loaded.model(input_ids=torch.tensor([rows[0].ids])).logits
            delta.revert(loaded.model)
            terms = target_terms(rows, lg.device)
            nll.append(float(row_nll(lg[terms[0], terms[1]], terms, 1)))
        want[on] = sum(nll) / len(nll)
    assert out["rephrase"] != pytest.approx(out["prompt"], abs=1e-3)
    assert out["rephrase"] == pytest.approx(want["rephrase"], rel=1e-4)
    assert out["prompt"] == pytest.approx(want["prompt"], rel=1e-4)


def _train(loaded, tmp_path, steps: int, seed: int = 0, **kw):
    p = params(**{"layers": [1, 2], "rank": 16, "lr": 3e-3, "lr_lr": 3e-2, "edit_lr": 1e-3, "batch_size": 4, **kw})
    learner = MendLearner(loaded, p, seed)
    split = Split(learn_cases(28), learn_cases(8, start=28), {})
    settings = TrainSettings(steps=steps, batch_size=4, val_every=max(1, steps // 4), patience=100, grad_clip=100.0,
                             seed=seed)
    tmp_path.mkdir(parents=True, exist_ok=True)
    summary = train_editor(learner, split, tmp_path, settings, {"name": loaded.name, "fingerprint": loaded.fingerprint})
    return learner, summary


def test_meta_training_raises_held_out_edit_success(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    loaded = tiny_model("llama")
    # the steps α frozen (lr_lr ~ 0): what edits better is the editor network alone
    learner, summary = _train(loaded, tmp_path / "run", steps=100, lr=1e-2, lr_lr=1e-12, edit_lr=3e-2)
    before, best = summary["untrained"], summary["best"]
    assert before["edit_success"] < 0.2                    # one small gradient step: nothing flips
    assert best["edit_success"] >= before["edit_success"] + 0.5
    assert torch.allclose(learner.editor.edit_lrs, torch.full_like(learner.editor.edit_lrs, 3e-2))
    assert any(float(layer.u.detach().abs().max()) > 0 for net in learner.editor.nets.values() for layer in net.layers)
    assert best["rephrase"] > before["rephrase"] and best["step"] > 0
    train = [p for p in map(json.loads, (tmp_path / "run" / "curve.jsonl").read_text().splitlines())
             if p["kind"] == "train"]
    assert train[-1]["loss_edit"] < train[0]["loss_edit"]


def test_saved_editor_reloads_to_identical_edits(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    loaded = tiny_model("llama")
    learner, _ = _train(loaded, tmp_path / "run", steps=8)
    save_editor(tmp_path / EDITOR_FILE, learner, {"name": loaded.name, "fingerprint": loaded.fingerprint}, 8, {})
    live = MEND(loaded, params(layers=[1, 2]))
    live._editor = learner.editor.eval()
    want = live.compute([REQ])
    for where in (tmp_path / EDITOR_FILE, tmp_path):      # the file, or a run directory holding it
        back = MEND(loaded, params(layers=[1, 2], editor=str(where)), RunContext(progress=False))
        got = back.compute([REQ])
        assert got.tensors.keys() == want.tensors.keys()
        assert all(torch.equal(got.tensors[k], want.tensors[k]) for k in want.tensors)
    assert_revert_bit_identical(loaded, got)
    assert_save_load_same_logits(loaded, got, tmp_path)


def test_newest_editor_for_this_model_is_the_default_and_another_models_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    loaded = tiny_model("llama")
    with pytest.raises(ConfigError, match="no trained mend editor for model"):
        MEND(loaded, params()).prepare()
    learner, _ = _train(loaded, tmp_path / "a", steps=2)
    _train(loaded, tmp_path / "b", steps=4)
    method = MEND(loaded, params())
    method.prepare()
    assert method._info["editor"] == str(tmp_path / "b" / EDITOR_FILE) and method._info["editor_step"] > 0
    register_editor("mend", loaded.fingerprint, tmp_path / "a")   # a newer registration of run a
    method = MEND(loaded, params())
    method.prepare()
    assert method._info["editor"] == str(tmp_path / "a" / EDITOR_FILE)
    other = tiny_model("llama", seed=1)                           # same architecture, other weights
    with pytest.raises(ConfigError, match="was trained for model .* not for") as e:
        MEND(other, params(editor=str(tmp_path / "a"))).prepare()
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="no trained mend editor"):   # none registered for that fingerprint
        MEND(other, params()).prepare()


def test_cli_edit_refuses_an_editor_of_another_model_in_one_line(tmp_path, monkeypatch):
    from tiny import save_tiny_model_dir

    from kedit.models.load import load_model

    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    a = save_tiny_model_dir(tmp_path / "model-a", "llama", seed=0)
    b = save_tiny_model_dir(tmp_path / "model-b", "llama", seed=1)
    loaded = load_model(str(a), device="cpu")
    _train(loaded, tmp_path / "run", steps=2)
    cases = tmp_path / "cases.jsonl"
    cases.write_text(json.dumps({"case_id": "x", "prompt": "A fact about France is", "subject": "France",
                                 "target_new": "of", "ground_truth": "the"}) + "\n")
    res = CliRunner().invoke(app, ["edit", str(cases), "--method", "mend", "--model", str(b), "--device", "cpu",
                                   "--editor", str(tmp_path / "run"), "--out",
                                   str(tmp_path / "runs"), "--gen-tokens", "0"])
    assert res.exit_code == 2, res.output
    assert "was trained for model" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["edit", str(cases), "--method", "mend", "--model", str(a), "--device", "cpu",
                                   "--out", str(tmp_path / "runs"), "--gen-tokens", "0"])
    assert res.exit_code == 0, res.output                  # no --editor: the newest for model a
    (run,) = list((tmp_path / "runs").iterdir())
    meta = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert meta[0]["post"]["rewrite_acc"] is not None
