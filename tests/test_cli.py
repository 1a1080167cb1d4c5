"""The CLI as a user runs it: discovery commands, bad input, and `kedit edit` writing a run directory."""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors import safe_open
from tiny import save_tiny_model_dir
from typer.testing import CliRunner

from kedit.cli import app

runner = CliRunner()


def test_help_lists_the_commands():
    out = runner.invoke(app, ["--help"]).output
    for cmd in ("edit", "validate", "models", "methods", "stats"):
        assert cmd in out


def test_format_help_names_every_layout_the_reader_knows():
    from kedit.cli import FORMAT_HELP
    from kedit.data.cases import FORMATS

    assert FORMAT_HELP.split(": ", 1)[1].split(" | ") == list(FORMATS)
    for cmd in ("validate", "edit", "trace"):
        out = runner.invoke(app, [cmd, "--help"], terminal_width=200).output
        assert "knowedit" in out and "wikibio" in out, cmd


@pytest.mark.parametrize("args", [
    ["bench", "counterfact", "-n", "-3"],
    ["bench", "zsre", "-n", "0"],
    ["bench", "zsre", "--offset", "-1"],
    ["bench", "zsre", "--batch-size", "0"],
    ["bench", "zsre", "--sequential", "--checkpoint-every", "0"],
    ["bench", "zsre", "--generation", "--gen-tokens", "0"],
    ["edit", "cases/messi.jsonl", "--batch-size", "-2"],
    ["edit", "cases/messi.jsonl", "--gen-tokens", "-1"],
    ["stats", "--samples", "0"],
    ["stats", "--max-length", "-5"],
    ["train", "mend", "--steps", "0"],
    ["train", "serac", "--val-every", "-1"],
    ["compare-gen", "--cases", "cases/messi.jsonl", "--max-new-tokens", "0"],
])
def test_out_of_range_numbers_are_one_line_errors_before_any_work(args, tmp_path):
    res = runner.invoke(app, [*args, *(["--out", str(tmp_path / "out")] if args[0] in ("bench", "edit", "train") else [])])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "must be at least" in lines[0], res.output
    assert not (tmp_path / "out").exists()


def test_validate_ok_and_bad_input_is_one_line_with_exit_2(tmp_path):
    ok = runner.invoke(app, ["validate", "cases/anchor-31.jsonl"])
    assert ok.exit_code == 0 and "31 cases (easyedit layout)" in ok.output
    bad = tmp_path / "cases.jsonl"
    bad.write_text('{"prompt": "Who is Messi?", "subject": "Lionel", "target_new": "x"}\n')
    res = runner.invoke(app, ["validate", str(bad)])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{bad}:1: field 'subject'" in lines[0]


def test_models_and_methods_list_the_defaults():
    assert "smollm2-135m (default)" in runner.invoke(app, ["models"]).output
    assert "rome" in runner.invoke(app, ["methods"]).output


@pytest.fixture()
def tiny_dir(tmp_path, monkeypatch):
    """A tiny llama saved as a Hugging Face directory, and cases whose subject ends the prompt."""
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    d = save_tiny_model_dir(tmp_path / "tiny-llama")
    cases = tmp_path / "cases.jsonl"
    cases.write_text(
        json.dumps({"case_id": "a", "prompt": "The capital city of the Kingdom of France", "subject": "France",
                    "target_new": "of", "ground_truth": "and",
                    "locality": {"n": {"prompt": "The river Thames flows through", "ground_truth": "London"}}}) + "\n"
        + json.dumps({"case_id": "b", "prompt": "The sport played by Lionel Messi", "subject": "Lionel Messi",
                      "target_new": "in", "ground_truth": "the"}) + "\n")
    hp = tmp_path / "rome.yaml"
    hp.write_text(yaml.safe_dump({"layer": 1, "mom2_adjustment": True, "mom2_samples": 20, "v_num_grad_steps": 40,
                                  "clamp_norm_factor": 1000.0, "kl_factor": 0.0, "v_weight_decay": 0.0,
                                  "context_template_length_params": [[3, 2]], "early_stop_loss": 0.01}))
    return d, cases, hp, tmp_path


def test_edit_writes_a_complete_run_directory(tiny_dir):
    d, cases, hp, tmp = tiny_dir
    out = tmp / "runs"
    res = runner.invoke(app, ["edit", str(cases), "--model", str(d), "--hparams", str(hp), "--out", str(out),
                              "--stats-dir", str(tmp / "stats"), "--gen-tokens", "4", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    (run,) = list(out.iterdir())
    assert not run.name.startswith(".") and "-rome-tiny-llama-" in run.name
    names = {p.name for p in run.iterdir()}
    assert names == {"config.yaml", "cases.jsonl", "results.jsonl", "metrics.json", "generations.md",
                     "generations.jsonl", "edit.safetensors", "log.txt"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n"] == 2 and set(metrics) >= {"n", "pre", "post", "stderr"}
    assert set(metrics["stderr"]) == {"pre", "post"}
    assert metrics["post"]["rewrite_acc"] == 1.0 and metrics["pre"]["rewrite_acc"] < 1.0
    assert "portability_acc" not in metrics["post"]  # no data, no name
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["method"] == "rome" and config["hparams"]["layer"] == 1 and config["seed"] == 0
    assert config["model"]["fingerprint"] and config["versions"]["torch"] and config["command"].startswith("kedit")  # sys.argv: pytest in-process
    records = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in records] == ["a", "b"]
    assert {"key", "target", "update", "eval"} <= set(records[0]["time"])
    with safe_open(str(run / "edit.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["a/model.layers.1.mlp.down_proj.weight", "b/model.layers.1.mlp.down_proj.weight"]
        assert f.metadata()["mode"] == "independent"
    # same seed and inputs: identical metrics
    res2 = runner.invoke(app, ["edit", str(cases), "--model", str(d), "--hparams", str(hp), "--out", str(out),
                               "--stats-dir", str(tmp / "stats"), "--gen-tokens", "0", "--device", "cpu"])
    assert res2.exit_code == 0, res2.output
    runs = sorted(out.iterdir())
    assert len(runs) == 2
    assert [json.loads((r / "metrics.json").read_text()) for r in runs][0] == metrics


def test_interrupted_edit_leaves_no_run_directory(tiny_dir, monkeypatch):
    d, cases, hp, tmp = tiny_dir
    import kedit.runs.runner

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(kedit.runs.runner, "run_edits", boom)
    out = tmp / "runs"
    res = runner.invoke(app, ["edit", str(cases), "--model", str(d), "--hparams", str(hp), "--out", str(out),
                              "--stats-dir", str(tmp / "stats"), "--device", "cpu"])
    assert res.exit_code == 130
    assert not out.exists() or list(out.iterdir()) == []


def test_edit_bad_inputs_are_one_line_errors(tiny_dir):
    d, cases, hp, tmp = tiny_dir
    res = runner.invoke(app, ["edit", str(cases), "--model", str(tmp / "nope"), "--hparams", str(hp)])
    assert res.exit_code == 2 and "--model" in res.output
    res = runner.invoke(app, ["edit", str(cases), "--model", str(d), "--method", "rom"])
    assert res.exit_code == 2 and "did you mean 'rome'" in res.output
    res = runner.invoke(app, ["edit", str(cases), "--model", str(d), "--hparams", str(hp), "--set", "layr=2"])
    assert res.exit_code == 2 and "unknown key 'layr'" in res.output


def test_unreachable_hub_id_is_a_one_line_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at import time: also patch the constant
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    res = runner.invoke(app, ["stats", "--model", "no-such-org/no-such-model", "--layers", "1"])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--model no-such-org/no-such-model: cannot load" in lines[0]


def test_run_ids_never_collide(tmp_path):
    from kedit.runs.rundir import RunDir

    a = RunDir(tmp_path, "20260101-000000-rome-m-abcdef")
    b = RunDir(tmp_path, "20260101-000000-rome-m-abcdef")  # same config, same second
    assert a.finish().name == "20260101-000000-rome-m-abcdef"
    assert b.finish().name == "20260101-000000-rome-m-abcdef-2"


ALIAS_HPARAMS = {"ft_l": {"layers": [1], "lr": 0.05, "num_steps": 2},
                 "rome": {"layer": 1, "mom2_adjustment": False, "v_num_grad_steps": 2,
                          "context_template_length_params": [[3, 1]]},
                 "alphaedit": {"layers": [1, 2], "mom2_samples": 20, "v_num_grad_steps": 2,
                               "context_template_length_params": [[3, 1]]}}


@pytest.mark.parametrize("typed, canonical", [("FT-L", "ft_l"), ("ft-l", "ft_l"), ("ft_l", "ft_l"), ("Ft_L", "ft_l"),
                                              ("R-ROME", "rome"), ("AlphaEdit", "alphaedit")])
def test_method_names_people_type(typed, canonical, tiny_dir):
    """--method folds case, '-' and '_' (and r-ROME, which is kedit's default ROME) to the
    registered name; the run records and is named by the canonical name."""
    d, cases, _, tmp = tiny_dir
    hp = tmp / "alias.yaml"
    hp.write_text(yaml.safe_dump(ALIAS_HPARAMS[canonical]))
    out = tmp / "runs"
    res = runner.invoke(app, ["edit", str(cases), "--model", str(d), "--method", typed, "--hparams", str(hp),
                              "--out", str(out), "--stats-dir", str(tmp / "stats"), "--gen-tokens", "0",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    (run,) = list(out.iterdir())
    assert f"-{canonical.replace('_', '-')}-tiny-llama-" in run.name        # run ids slug the name
    assert yaml.safe_load((run / "config.yaml").read_text())["method"] == canonical
    assert f"{canonical} on " in res.output and f"{typed} on " not in res.output.replace(canonical, "")


def test_methods_lists_canonical_names_and_unknown_names_still_fail(tiny_dir):
    table = runner.invoke(app, ["methods"]).output
    assert all(name in table for name in ("ft_l", "alphaedit", "rome", "kn", "pmet", "ultraedit"))
    assert "FT-L" not in table and "R-ROME" not in table
    d, cases, _, _ = tiny_dir
    for typed in ("ft-x", "r-memit", "ftl2"):
        res = runner.invoke(app, ["edit", str(cases), "--model", str(d), "--method", typed])
        assert res.exit_code == 2 and f"unknown method '{typed}'" in res.output
