"""`kedit train` on a tiny model: the run directory (config, split, curve, PNG, checkpoint and
editor in safetensors), Ctrl-C then --resume ends with the editor of an uninterrupted run,
the same seed gives the same editor, early stopping, the shipped training splits keep the
evaluation cases out, and a trained editor edits through `kedit edit`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny import save_tiny_model_dir
from typer.testing import CliRunner

import kedit.cli
from kedit.cli import app
from kedit.methods.learned.mend import MendLearner
from kedit.methods.learned.trainer import batch_at, load_tensors, training_split

runner = CliRunner()
SUBJECTS = ["France", "Lionel Messi", "the Thames", "Mount Everest", "Tokyo", "Paris", "the Moon", "Brazil",
            "Mozart", "the Nile", "Berlin", "Einstein", "Canada", "Picasso", "the Alps", "Rome", "Chopin",
            "Kenya", "Madrid", "Newton", "Peru", "Oslo", "Dante", "Cairo"]
TARGETS = ["of", "the", "and", "in", "to", "was"]
HPARAMS = {"layers": [1, 2], "rank": 8, "lr": 3.0e-3, "lr_lr": 3.0e-2, "edit_lr": 1.0e-3, "batch_size": 4,
           "steps": 12, "val_every": 3, "val_cases": 6, "patience": 50, "log_every": 2}


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    model = save_tiny_model_dir(tmp_path / "model", "llama")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({
        "case_id": f"t{i}", "prompt": f"A fact about {s} is", "subject": s, "target_new": TARGETS[i % 6],
        "ground_truth": "a", "rephrase_prompts": [f"Something about {s} is"],
        "locality": {"neighborhood": {"prompt": "The river flows", "ground_truth": "the"}}}) + "\n"
        for i, s in enumerate(SUBJECTS)))
    hp = tmp_path / "mend.yaml"
    hp.write_text(yaml.safe_dump(HPARAMS))
    return tmp_path, ["train", "mend", "--model", str(model), "--device", "cpu", "--data", str(data),
                      "--hparams", str(hp)]


def one_run(root: Path) -> Path:
    (run,) = [p for p in root.iterdir() if p.is_dir()]
    return run


def tensors(path: Path) -> dict:
    return load_tensors(path)[0]


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)


def test_run_directory(setup):
    tmp, args = setup
    res = runner.invoke(app, [*args, "--out", str(tmp / "runs")])
    assert res.exit_code == 0, res.output
    run = one_run(tmp / "runs")
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "split.json", "curve.jsonl", "curve.png", "checkpoint.safetensors", "editor.safetensors",
            "summary.json", "log.txt"} <= names
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")]        # atomic writes left nothing
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["method"] == "mend" and config["hparams"]["rank"] == 8 and config["seed"] == 0
    assert config["model"]["fingerprint"] and config["hparams_source"].endswith("mend.yaml")
    split = json.loads((run / "split.json").read_text())
    assert len(split["val"]) == 6 and len(split["train"]) == len(SUBJECTS) - 6
    assert not set(split["val"]) & set(split["train"]) and split["val"] == [f"t{i}" for i in range(18, 24)]
    curve = [json.loads(line) for line in (run / "curve.jsonl").read_text().splitlines()]
    assert [p["step"] for p in curve if p["kind"] == "val"] == [0, 3, 6, 9, 12]
    assert [p["step"] for p in curve if p["kind"] == "train"] == [2, 4, 6, 8, 10, 12]
    assert {"loss", "loss_edit", "loss_loc"} <= set(curve[1]) and {"edit_success", "locality"} <= set(curve[0])
    assert (run / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["stopped"] == "steps" and summary["best_step"] is not None
    assert "edit_success" in res.output and str(run) in res.output.replace("\n", "")


def test_ctrl_c_then_resume_gives_the_uninterrupted_editor(setup, monkeypatch):
    tmp, args = setup
    res = runner.invoke(app, [*args, "--out", str(tmp / "clean")])
    assert res.exit_code == 0, res.output
    clean = one_run(tmp / "clean")
    real, calls = MendLearner.train_loss, {"n": 0}

    def flaky(self, cases):
        calls["n"] += 1
        if calls["n"] == 8:            # during step 8: the last checkpoint is step 6
            raise KeyboardInterrupt
        return real(self, cases)

    monkeypatch.setattr(MendLearner, "train_loss", flaky)
    res = runner.invoke(app, [*args, "--out", str(tmp / "cut")])
    assert res.exit_code == 130 and "kedit train --resume" in res.output
    cut = one_run(tmp / "cut")
    assert not (cut / "summary.json").exists()
    monkeypatch.setattr(MendLearner, "train_loss", real)
    res = runner.invoke(app, ["train", "--resume", str(cut)])
    assert res.exit_code == 0, res.output
    assert "resumed at step 6" in (cut / "log.txt").read_text()
    assert same_tensors(cut / "editor.safetensors", clean / "editor.safetensors")
    assert same_tensors(cut / "checkpoint.safetensors", clean / "checkpoint.safetensors")
    assert (cut / "curve.jsonl").read_text() == (clean / "curve.jsonl").read_text()
    drop = {"seconds_this_session", "cpu_seconds_this_session"}
    a, b = (json.loads((r / "summary.json").read_text()) for r in (cut, clean))
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


def test_resume_with_a_new_budget_equals_a_run_with_that_budget(setup, monkeypatch):
    """--resume RUN --steps N continues a finished (or cut) run to N steps: the batches depend
    on seed and step only, so it ends with the editor of an uninterrupted N-step run. A budget
    below the checkpoint is refused before any model is loaded."""
    tmp, args = setup
    every = ["--val-every", "2"]
    for name, steps in (("short", "4"), ("long", "8")):
        res = runner.invoke(app, [*args, "--steps", steps, *every, "--out", str(tmp / name)])
        assert res.exit_code == 0, res.output
    short, long = one_run(tmp / "short"), one_run(tmp / "long")
    assert not same_tensors(short / "checkpoint.safetensors", long / "checkpoint.safetensors")
    load = kedit.cli._load
    monkeypatch.setattr(kedit.cli, "_load", lambda *a, **k: pytest.fail("model loaded before the check"))
    res = runner.invoke(app, ["train", "--resume", str(short), "--steps", "2"])
    assert res.exit_code == 2 and "below the step its checkpoint reached (4)" in res.output
    monkeypatch.setattr(kedit.cli, "_load", load)
    res = runner.invoke(app, ["train", "--resume", str(short), "--steps", "8", "--val-every", "4"])
    assert res.exit_code == 2 and "--val-every cannot change on resume" in res.output
    assert yaml.safe_load((short / "config.yaml").read_text())["hparams"]["steps"] == 4    # refused: untouched
    res = runner.invoke(app, ["train", "--resume", str(short), "--steps", "8"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((short / "config.yaml").read_text())["hparams"]["steps"] == 8
    assert same_tensors(short / "editor.safetensors", long / "editor.safetensors")
    assert same_tensors(short / "checkpoint.safetensors", long / "checkpoint.safetensors")
    assert (short / "curve.jsonl").read_text() == (long / "curve.jsonl").read_text()
    assert json.loads((short / "summary.json").read_text())["steps"] == 8


def test_same_seed_same_editor_other_seed_another(setup):
    tmp, args = setup
    short = ["--steps", "4", "--val-every", "2"]
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        res = runner.invoke(app, [*args, *short, "--seed", str(seed), "--out", str(tmp / name)])
        assert res.exit_code == 0, res.output
    a, b, c = (one_run(tmp / n) / "editor.safetensors" for n in "abc")
    assert same_tensors(a, b)
    assert not same_tensors(a, c)


def test_early_stopping_on_validation_edit_success(setup, monkeypatch):
    tmp, args = setup
    scores = iter([0.1, 0.3, 0.2, 0.3, 0.9])        # steps 0, 3, 6, 9, (12): best at 3, then two without gain
    real = MendLearner.validate

    def scripted(self, cases):
        return {**real(self, cases), "edit_success": next(scores)}

    monkeypatch.setattr(MendLearner, "validate", scripted)
    res = runner.invoke(app, [*args, "--set", "patience=2", "--out", str(tmp / "runs")])
    assert res.exit_code == 0, res.output
    run = one_run(tmp / "runs")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped"] == "early_stop" and summary["steps"] == 9 and summary["best_step"] == 3
    assert summary["best"]["edit_success"] == 0.3
    assert load_tensors(run / "editor.safetensors")[1]["step"] == "3"


def test_trained_editor_edits_through_kedit_edit(setup):
    tmp, args = setup
    res = runner.invoke(app, [*args, "--out", str(tmp / "runs")])
    assert res.exit_code == 0, res.output
    run = one_run(tmp / "runs")
    cases = tmp / "cases.jsonl"
    cases.write_text(json.dumps({"case_id": "x", "prompt": "A fact about Lima is", "subject": "Lima",
                                 "target_new": "of", "ground_truth": "the"}) + "\n")
    res = runner.invoke(app, ["edit", str(cases), "--method", "mend", "--model", str(tmp / "model"), "--device", "cpu",
                              "--editor", str(run), "--out", str(tmp / "edits"), "--gen-tokens", "0"])
    assert res.exit_code == 0, res.output
    edit_run = one_run(tmp / "edits")
    config = yaml.safe_load((edit_run / "config.yaml").read_text())
    assert config["hparams"]["editor"] == str(run)
    result = json.loads((edit_run / "results.jsonl").read_text().splitlines()[0])
    assert result["method"]["delta_norm"] > 0
    # the same editor through bench, recorded so that --resume takes it again
    res = runner.invoke(app, ["bench", "counterfact", "--data", str(tmp / "train.jsonl"), "-n", "2", "--method", "mend",
                              "--model", str(tmp / "model"), "--device", "cpu", "--editor", str(run),
                              "--out", str(tmp / "bench")])
    assert res.exit_code == 0, res.output
    bench_run = one_run(tmp / "bench")
    assert yaml.safe_load((bench_run / "config.yaml").read_text())["hparams"]["editor"] == str(run)
    assert len((bench_run / "results.jsonl").read_text().splitlines()) == 2


def test_train_refuses_what_it_cannot_train(setup):
    tmp, args = setup
    res = runner.invoke(app, ["train", "rome", "--model", args[3], "--device", "cpu"])
    assert res.exit_code == 2 and "is not trained" in res.output
    res = runner.invoke(app, [*args, "--data", str(tmp / "missing.jsonl")])
    assert res.exit_code == 2 and "no such file" in res.output
    res = runner.invoke(app, ["train", "--resume", str(tmp)])
    assert res.exit_code == 2 and "not a training run directory" in res.output


def test_shipped_splits_keep_evaluation_cases_out():
    from kedit.data.cases import load_cases
    from kedit.util.paths import package_data

    cf = training_split("counterfact", 100)
    assert len(cf.val) == 100 and len(cf.train) > 9000
    ids = set(cf.info["train"]) | set(cf.info["val"])
    assert not set(cf.info["train"]) & set(cf.info["val"])
    held = {c.case_id for c in load_cases(package_data() / "benchmarks/counterfact-val.json", "easyedit")}
    assert not ids & held                                  # kedit bench counterfact / the anchor cases
    zs = training_split("zsre", 100)
    bench = load_cases(package_data() / "benchmarks/zsre_mend_train-1k.json", "zsre", skip_invalid=True)[:200]
    assert zs.info["reserved"] == [c.case_id for c in bench]
    assert not ({c.case_id for c in bench} & (set(zs.info["train"]) | set(zs.info["val"])))


def test_batches_are_a_function_of_seed_and_step():
    n, bs = 10, 4
    steps = [batch_at(n, bs, s, seed=0) for s in range(5)]
    assert steps == [batch_at(n, bs, s, seed=0) for s in range(5)]
    first_epoch = steps[0] + steps[1] + steps[2][:2]
    assert sorted(first_epoch) == list(range(n))           # every case once per epoch
    assert steps != [batch_at(n, bs, s, seed=1) for s in range(5)]
