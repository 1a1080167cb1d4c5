"""The Python API: the README's example runs (on a tiny model), and an EditResult puts its
edit into the model and takes it out again bit-identically, giving the run's post metrics."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_patch import CASES, HPARAMS
from tiny import save_tiny_model_dir, tiny_model

import kedit
from kedit.data.cases import case_from_dict
from kedit.evaluation import evaluate_cases
from kedit.methods.base import Delta, Edit
from kedit.runs.export import PatchError

REPO = Path(__file__).resolve().parents[1]



def readme_api_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KEDIT_STATS_DIR", str(tmp_path / "stats"))
    model_dir = save_tiny_model_dir(tmp_path / "tiny-llama")
    hp = tmp_path / "rome.yaml"
    hp.write_text(yaml.safe_dump(HPARAMS))
    (tmp_path / "cases").mkdir()
    shutil.copy(REPO / "cases" / "messi.jsonl", tmp_path / "cases" / "messi.jsonl")
    monkeypatch.chdir(tmp_path)

    code = readme_api_block()
    for old, new in (('kedit.load_model("smollm2-135m")', f"kedit.load_model({str(model_dir)!r})"),
                     ('"configs/methods/rome/smollm2-135m.yaml"', repr(str(hp)))):
        assert code.count(old) == 1, f"the README example no longer contains {old}"
        code = code.replace(old, new)
    ns: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), ns)

    printed = out.getvalue().splitlines()
    assert float(printed[0]) == ns["result"].metrics["post"]["rewrite_acc"]
    assert printed[1].startswith("after: ") and printed[2].startswith("before:")
    model, result = ns["model"], ns["result"]
    fresh = kedit.load_model(str(model_dir), device="cpu")
    for (name, p), (_, q) in zip(model.model.named_parameters(), fresh.model.named_parameters()):
        assert torch.equal(p, q), name            # every weight is the original again
    inputs = fresh.tokenizer(ns["prompt"], return_tensors="pt")
    assert not torch.allclose(ns["edited_logits"], fresh.model(**inputs).logits)

    saved = Edit.load("messi-edit.safetensors")
    assert isinstance(saved, Delta) and saved.tensors.keys() == result.delta.tensors.keys()
    assert all(torch.equal(saved.tensors[k], result.delta.tensors[k]) for k in saved.tensors)
    exported = kedit.load_model("messi-model", device="cpu")
    name = next(iter(saved.tensors))
    assert torch.equal(dict(exported.model.named_parameters())[name],
                       dict(fresh.model.named_parameters())[name] + saved.tensors[name])
    assert json.loads(Path("messi-model/kedit-patch.json").read_text())["base_fingerprint"] == fresh.fingerprint
    assert torch.equal(dict(ns["edited"].model.named_parameters())[name], dict(exported.model.named_parameters())[name])


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    stats = tmp_path_factory.mktemp("api-stats")
    cases = [case_from_dict(c) for c in CASES]
    independent_model, sequential_model = tiny_model("llama"), tiny_model("llama")
    independent = kedit.edit(independent_model, cases, "rome", HPARAMS, stats_dir=str(stats))
    sequential = kedit.edit(sequential_model, cases, "rome", dict(HPARAMS), sequential=True, stats_dir=str(stats))
    return cases, independent, sequential


def snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(module, snap) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in module.state_dict().items())


def test_applied_gives_the_post_metrics_and_restores_bit_identically(edited):
    cases, independent, sequential = edited
    for result in (independent, sequential):
        loaded = result.model
        before = snapshot(loaded.model)
        _, reference = evaluate_cases(loaded.model, loaded.tokenizer, cases)
        if result.sequential:
            with result.applied() as m:
                assert m is loaded
                post, _ = evaluate_cases(loaded.model, loaded.tokenizer, cases, reference)
            assert post == [r["post"] for r in result.records]     # the state after the last edit
        else:
            for i, case in enumerate(cases):
                with result.applied(case=case.case_id):
                    [post], _ = evaluate_cases(loaded.model, loaded.tokenizer, [case], reference)
                assert post == result.records[i]["post"]
        assert same(loaded.model, before)


def test_apply_revert_and_misuse(edited):
    cases, independent, sequential = edited
    module = sequential.model.model
    before = snapshot(module)
    sequential.apply()
    assert not same(module, before)
    with pytest.raises(RuntimeError, match="already applied"):
        sequential.apply()
    with pytest.raises(PatchError, match="revert"):
        kedit.compare_gen(sequential)
    sequential.revert()
    assert same(module, before)
    with pytest.raises(RuntimeError, match="not applied"):
        sequential.revert()

    with pytest.raises(PatchError, match="--case ID"):
        independent.apply()            # two independent edits: which one?
    with pytest.raises(ZeroDivisionError):
        with independent.applied(all=True):
            1 / 0
    assert same(independent.model.model, before)    # both tiny models start from seed 0

    other = tiny_model("llama", seed=5)
    with pytest.raises(PatchError, match="fingerprint"):
        independent.apply(other, case="a")
    with independent.applied(other, case="a", force=True):
        assert not same(other.model, snapshot(tiny_model("llama", seed=5).model))


def test_delta_sums_every_edit(edited):
    _, independent, sequential = edited
    name = next(iter(independent.delta.tensors))
    a, b = independent.deltas["a"].tensors[name], independent.deltas["b"].tensors[name]
    assert torch.equal(independent.delta.tensors[name], a + b)
    steps = [sequential.deltas[f"batch{i}"].tensors[name] for i in range(2)]
    assert torch.equal(sequential.delta.tensors[name], steps[0] + steps[1])


def test_compare_rows(edited):
    _, independent, _ = edited
    rows = kedit.compare_gen(independent, max_new_tokens=3)
    assert {r["case_id"] for r in rows} == {"a", "b"} and all(r["decoding"] == "greedy" for r in rows)
    assert kedit.generate(independent.model, "The sport", max_new_tokens=3) == \
        kedit.generate(independent.model, ["The sport"], max_new_tokens=3)
