"""`kedit compare-gen`: before/after text of a run (or of an edit made on the spot), each
case's prompts under that case's own edit, seeded sampling, files written into the run."""

from __future__ import annotations

import json

import pytest
import torch
from test_patch import CASES, HPARAMS, edit_run
from tiny import save_tiny_model_dir
from typer.testing import CliRunner

from kedit.cli import app
from kedit.runs.compare import compare_result, read_prompts_file
from kedit.evaluation.generation import default_prompts, generate
from kedit.models.load import load_model
from kedit.runs.export import PatchError, load_run
from kedit.runs.result import applied_edits as applied

runner = CliRunner()



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KEDIT_HOME", str(tmp / "home"))
        model_dir = save_tiny_model_dir(tmp / "tiny-llama")
        yield {"tmp": tmp, "model": model_dir, "both": edit_run(tmp, model_dir, CASES)}


def test_compare_gen_on_a_run_writes_files_and_uses_each_cases_own_edit(runs):
    run = runs["both"]
    res = runner.invoke(app, ["compare-gen", str(run), "--max-new-tokens", "5"], env={"COLUMNS": "160"})
    assert res.exit_code == 0, res.output
    assert "before / after (greedy, 5 new tokens)" in res.output and "Lionel Messi, the" in res.output
    rows = [json.loads(line) for line in (run / "compare-gen.jsonl").read_text().splitlines()]
    md = (run / "compare-gen.md").read_text()
    assert md.startswith(f"# compare-gen: {run.name} (greedy, 5 new tokens)")
    result = load_run(run)
    assert [(r["case_id"], r["kind"], r["prompt"]) for r in rows] == \
        [(p["case_id"], p["kind"], p["prompt"]) for p in default_prompts(result.cases)]

    loaded = load_model(str(runs["model"]), device="cpu")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    for case_id in ("a", "b"):
        mine = [r for r in rows if r["case_id"] == case_id]
        prompts = [r["prompt"] for r in mine]
        assert [r["before"] for r in mine] == generate(loaded, prompts, 5)
        with applied(loaded.model, [result.deltas[case_id]]):
            assert [r["after"] for r in mine] == generate(loaded, prompts, 5)
    assert all(torch.equal(v, before[k]) for k, v in loaded.model.state_dict().items())
    assert any(r["before"] != r["after"] for r in rows)


def test_given_prompts_need_one_edit_and_prompt_files(runs, tmp_path):
    run = runs["both"]
    res = runner.invoke(app, ["compare-gen", str(run), "-p", "The sport played by Lionel Messi"])
    assert res.exit_code == 2 and "--case" in res.output
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "Lionel Messi plays"}\n\n{"prompt": "France is"}\n')
    res = runner.invoke(app, ["compare-gen", str(run), "--case", "b", "--prompts", str(f), "-p", "The sport",
                              "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (run / "compare-gen.jsonl").read_text().splitlines()]
    assert [(r["case_id"], r["kind"], r["prompt"]) for r in rows] == \
        [("b", "given", "The sport"), ("b", "given", "Lionel Messi plays"), ("b", "given", "France is")]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(PatchError, match=r"bad.jsonl:2: field 'prompt'"):
        read_prompts_file(bad)
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\nsecond one\n")
    assert read_prompts_file(txt) == ["first prompt", "second one"]
    res = runner.invoke(app, ["compare-gen", str(run), "--prompts", str(bad), "--case", "a"])
    assert res.exit_code == 2 and "bad.jsonl:2" in res.output


def test_sampling_is_seeded_and_recorded(runs):
    loaded = load_model(str(runs["model"]), device="cpu")
    result = load_run(runs["both"], loaded)
    kw = dict(case="a", max_new_tokens=6, sample=True, temperature=1.5)
    a = compare_result(loaded, result, **kw, seed=1)
    b = compare_result(loaded, result, **kw, seed=1)
    c = compare_result(loaded, result, **kw, seed=2)
    assert a == b and a != c
    assert a[0]["decoding"] == "sample (temperature 1.5, seed 1)"
    assert {r["case_id"] for r in a} == {"a"}
    greedy = compare_result(loaded, result, case="a", max_new_tokens=6)
    assert greedy[0]["decoding"] == "greedy" and greedy != a


def test_compare_gen_without_a_run_edits_on_the_fly(runs, tmp_path):
    cases = tmp_path / "cases.jsonl"
    cases.write_text(json.dumps(CASES[1]) + "\n")
    hp = tmp_path / "hp.yaml"
    import yaml

    hp.write_text(yaml.safe_dump(HPARAMS))
    out = tmp_path / "cmp"
    res = runner.invoke(app, ["compare-gen", "--cases", str(cases), "--model", str(runs["model"]), "--method", "rome",
                              "--hparams", str(hp), "--stats-dir", str(runs["tmp"] / "stats"), "--max-new-tokens", "4",
                              "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (out / "compare-gen.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"] == CASES[1]["prompt"] and rows[0]["before"] != rows[0]["after"]
    assert runner.invoke(app, ["compare-gen"]).exit_code == 2   # neither a run nor --cases


def test_other_model_refused(runs, tmp_path):
    other = save_tiny_model_dir(tmp_path / "other", seed=3)
    res = runner.invoke(app, ["compare-gen", str(runs["both"]), "--model", str(other)])
    assert res.exit_code == 2 and "fingerprint" in res.output
