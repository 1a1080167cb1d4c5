"""A run's edit.safetensors as a patch: `kedit apply` exports a Hugging Face model that gives
the run's post-edit metrics; choosing deltas; the fingerprint check; no pickle anywhere."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from tiny import save_tiny_model_dir
from typer.testing import CliRunner

from kedit.data.cases import load_cases
from kedit.cli import app
from kedit.evaluation import evaluate_cases
from kedit.methods.base import Delta
from kedit.models.load import load_model
from kedit.runs.export import PatchError, load_run, read_patch
from kedit.runs.result import applied_edits as applied, select_edits as select_deltas
from kedit.runs.rundir import read_results

runner = CliRunner()


CASES = [
    {"case_id": "a", "prompt": "The capital city of the Kingdom of France", "subject": "France",
     "target_new": "of", "ground_truth": "and",
     "locality": {"n": {"prompt": "The river Thames flows through", "ground_truth": "London"}}},
    {"case_id": "b", "prompt": "The sport played by Lionel Messi", "subject": "Lionel Messi",
     "target_new": "in", "ground_truth": "the", "rephrase_prompts": ["Lionel Messi plays the sport"]},
]
HPARAMS = {"layer": 1, "mom2_adjustment": True, "mom2_samples": 20, "v_num_grad_steps": 30,
           "clamp_norm_factor": 1000.0, "kl_factor": 0.0, "v_weight_decay": 0.0,
           "context_template_length_params": [[3, 2]], "early_stop_loss": 0.01}


def edit_run(tmp: Path, model_dir: Path, cases: list[dict], *extra: str) -> Path:
    """`kedit edit` on a tiny model; returns the run directory."""
    f = tmp / f"cases-{len(list(tmp.glob('cases-*')))}.jsonl"
    f.write_text("".join(json.dumps(c) + "\n" for c in cases))
    hp = tmp / "rome.yaml"
    hp.write_text(yaml.safe_dump(HPARAMS))
    out = tmp / "runs"
    before = set(out.iterdir()) if out.exists() else set()
    res = runner.invoke(app, ["edit", str(f), "--model", str(model_dir), "--hparams", str(hp), "--out", str(out),
                              "--stats-dir", str(tmp / "stats"), "--gen-tokens", "0", "--device", "cpu", *extra])
    assert res.exit_code == 0, res.output
    (run,) = set(out.iterdir()) - before
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("patch")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KEDIT_HOME", str(tmp / "home"))
        model_dir = save_tiny_model_dir(tmp / "tiny-llama")
        other_dir = save_tiny_model_dir(tmp / "tiny-llama-other", seed=1)
        single = edit_run(tmp, model_dir, CASES[:1])
        both = edit_run(tmp, model_dir, CASES)
        seq = edit_run(tmp, model_dir, CASES, "--sequential")
        yield {"tmp": tmp, "model": model_dir, "other": other_dir, "single": single, "both": both, "seq": seq}


def post_metrics_of_export(run: Path, model_dir: Path, export: Path, case_ids: list[str]) -> list[dict]:
    """Evaluate the exported directory, loaded by plain transformers, on the run's cases."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cases = load_cases(run / "cases.jsonl")
    base = load_model(str(model_dir), device="cpu")
    _, reference = evaluate_cases(base.model, base.tokenizer, cases)  # the pre-edit argmaxes, as the run took them
    edited = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    post, _ = evaluate_cases(edited, tok, [c for c in cases if c.case_id in case_ids], reference)
    return post


def test_apply_writes_a_model_that_gives_the_runs_post_metrics(runs):
    run, out = runs["single"], runs["tmp"] / "exported-single"
    res = runner.invoke(app, ["apply", str(run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "kedit-patch.json"} <= names
    assert not any(p.name.startswith(".") for p in out.parent.iterdir() if "exported-single" in p.name)
    assert json.loads((out / "kedit-patch.json").read_text())["edits"] == ["a"]
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask                       # not mkdtemp's private 0700
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    [post] = post_metrics_of_export(run, runs["model"], out, ["a"])
    [record] = read_results(run / "results.jsonl")
    assert post == record["post"]  # the same numbers, not merely close
    assert post["rewrite_acc"] == 1.0


def test_sequential_run_applies_every_step_in_order(runs):
    run, out = runs["seq"], runs["tmp"] / "exported-seq"
    res = runner.invoke(app, ["apply", str(run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "kedit-patch.json").read_text())["edits"] == ["batch0", "batch1"]
    post = post_metrics_of_export(run, runs["model"], out, ["a", "b"])
    assert post == [r["post"] for r in read_results(run / "results.jsonl")]
    bad = runner.invoke(app, ["apply", str(run), "--out", str(runs["tmp"] / "x"), "--case", "a"])
    assert bad.exit_code == 2 and "sequential" in bad.output


def test_several_independent_edits_need_case_or_all(runs):
    run, tmp = runs["both"], runs["tmp"]
    res = runner.invoke(app, ["apply", str(run), "--out", str(tmp / "nope")])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--case" in lines[0] and "--all" in lines[0]
    assert not (tmp / "nope").exists()
    assert runner.invoke(app, ["apply", str(run), "--out", str(tmp / "b"), "--case", "zz"]).exit_code == 2

    res = runner.invoke(app, ["apply", str(run), "--out", str(tmp / "only-b"), "--case", "b"])
    assert res.exit_code == 0, res.output
    post = post_metrics_of_export(run, runs["model"], tmp / "only-b", ["a", "b"])
    rec_b = [r for r in read_results(run / "results.jsonl") if r["case_id"] == "b"][0]
    assert post[1] == rec_b["post"]

    res = runner.invoke(app, ["apply", str(run), "--out", str(tmp / "all"), "--all"])
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    w_all = load_file(str(tmp / "all" / "model.safetensors"))
    w_b = load_file(str(tmp / "only-b" / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    deltas, _ = read_patch(run)
    base = load_model(str(runs["model"]), device="cpu").model.state_dict()[name]
    assert torch.equal(w_b[name], base + deltas["b"].tensors[name])
    assert torch.equal(w_all[name], base + deltas["a"].tensors[name] + deltas["b"].tensors[name])


def test_other_model_refused_unless_forced_and_out_must_be_new(runs):
    run, tmp = runs["single"], runs["tmp"]
    res = runner.invoke(app, ["apply", str(run), "--out", str(tmp / "f1"), "--model", str(runs["other"])])
    assert res.exit_code == 2 and "fingerprint" in res.output and "--force" in res.output
    assert not (tmp / "f1").exists()
    res = runner.invoke(app, ["apply", str(run), "--out", str(tmp / "f1"), "--model", str(runs["other"]), "--force"])
    assert res.exit_code == 0, res.output
    again = runner.invoke(app, ["apply", str(run), "--out", str(tmp / "f1")])
    assert again.exit_code == 2 and "not empty" in again.output


def test_bad_run_directories_are_one_line_errors(runs, tmp_path):
    assert "no config.yaml" in runner.invoke(app, ["apply", str(tmp_path), "--out", str(tmp_path / "o")]).output
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "x"}}))
    res = runner.invoke(app, ["apply", str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no edit.safetensors" in res.output
    (tmp_path / "edit.safetensors").write_bytes(b"not a safetensors file")
    res = runner.invoke(app, ["apply", str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not a readable safetensors file" in res.output


def test_load_run_reads_back_what_was_edited(runs):
    result = load_run(runs["both"])
    assert [c.case_id for c in result.cases] == ["a", "b"] and not result.sequential
    assert result.deltas["a"] is not result.deltas["b"]
    assert result.metrics["n"] == 2 and [r["case_id"] for r in result.records] == ["a", "b"]
    seq = load_run(runs["seq"])
    assert seq.sequential and list(seq.deltas) == ["batch0", "batch1"]
    loaded = load_model(str(runs["model"]), device="cpu")
    with pytest.raises(PatchError, match="fingerprint"):
        load_run(runs["single"], load_model(str(runs["other"]), device="cpu"))
    bound = load_run(runs["single"], loaded)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    with bound.applied():
        changed = [k for k, v in loaded.model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed == ["model.layers.1.mlp.down_proj.weight"]
    assert all(torch.equal(v, before[k]) for k, v in loaded.model.state_dict().items())


# ----------------------------------------------------------------------------- choosing and applying


def _deltas():
    d1, d2 = Delta({"w": torch.ones(2)}, {"label": "x"}), Delta({"w": torch.full((2,), 0.1)}, {"label": "y"})
    return d1, d2


def test_select_rules():
    d1, d2 = _deltas()
    assert select_deltas({"a": d1}, False) == [d1]
    assert select_deltas({"a": d1, "b": d1}, False) == [d1]          # one batch: one delta
    assert select_deltas({"a": d1, "b": d2}, False, "b") == [d2]
    assert select_deltas({"a": d1, "b": d2}, False, all_=True) == [d1, d2]
    assert select_deltas({"batch1": d2, "batch0": d1}, True) == [d1, d2]   # in step order
    with pytest.raises(PatchError, match="--case"):
        select_deltas({"a": d1, "b": d2}, False)
    with pytest.raises(PatchError, match="no case 'c'"):
        select_deltas({"a": d1, "b": d2}, False, "c")
    with pytest.raises(PatchError, match="sequential"):
        select_deltas({"batch0": d1}, True, "a")
    with pytest.raises(PatchError, match="not both"):
        select_deltas({"a": d1}, False, "a", True)


def test_applied_restores_bit_identically_even_on_error():
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.tensor([0.1, 0.7]), requires_grad=False)
    original = module.w.detach().clone()
    d1, d2 = _deltas()
    with pytest.raises(ZeroDivisionError):
        with applied(module, [d1, d2, d1]):   # the same delta twice: applied through private copies
            assert torch.allclose(module.w, original + 2.1)
            1 / 0
    assert torch.equal(module.w, original) and not d1.applied
    with pytest.raises(PatchError, match="shape"):
        with applied(module, [Delta({"w": torch.ones(3)})]):
            pass


# ----------------------------------------------------------------------------- no pickle


def test_no_pickle_in_loading_paths():
    """kedit never unpickles: no pickle module, torch.load only with weights_only=True."""
    root = Path(__file__).resolve().parents[1] / "kedit"
    offenders = []
    for f in root.rglob("*.py"):
        text = f.read_text()
        if re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M) or "pickle.load" in text:
            offenders.append(f"{f}: pickle")
        for m in re.finditer(r"torch\.load\((.*?)\)", text, re.S):
            if "weights_only=True" not in m.group(1):
                offenders.append(f"{f}: {m.group(0)[:60]}")
        if re.search(r"from_pretrained\([^)]*use_safetensors\s*=\s*False", text):
            offenders.append(f"{f}: use_safetensors=False")
    assert not offenders, offenders


def test_export_of_a_model_converted_from_gguf(runs, tmp_path):
    """kedit's GGUF cache keeps `quantization_config: gguf` in config.json; transformers then
    refuses save_pretrained, so the export rebuilds a plain model around the same tensors."""
    from transformers import AutoModelForCausalLM

    from kedit.runs.export import export_model

    src = save_tiny_model_dir(tmp_path / "from-gguf")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"dequantize": False, "gguf_file": "x.gguf", "quant_method": "gguf"}
    (src / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(str(src), device="cpu")
    name = "model.layers.1.mlp.down_proj.weight"
    params = dict(loaded.model.named_parameters())
    delta = Delta({name: torch.randn(params[name].shape, generator=torch.Generator().manual_seed(0))}, {"label": "x"})
    base = {k: v.detach().clone() for k, v in params.items()}
    export_model(loaded, [delta], tmp_path / "out")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    exported = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "out").named_parameters())
    assert exported.keys() == base.keys()
    for k, v in base.items():
        assert torch.equal(exported[k], v + delta.tensors[k] if k == name else v), k
        assert torch.equal(params[k], v)   # the loaded model is untouched
