"""`kedit bench`: shipped data readers, resumable runs (interrupted in the test), no case counted twice."""

from __future__ import annotations

import json

import pytest
import yaml
from tiny import save_tiny_model_dir
from typer.testing import CliRunner

from kedit.data.cases import EditCase
from kedit.runs.bench import BenchError, load_benchmark
from kedit.runs.shard import complete_records
from kedit.cli import app
from kedit.methods.locate.rome import ROME
from kedit.runs.rundir import read_results

runner = CliRunner()


def test_shipped_benchmarks_load():
    cf = load_benchmark("counterfact", n=5, offset=2)
    assert len(cf) == 5 and cf[0].case_id == load_benchmark("counterfact", n=3)[2].case_id
    assert cf[0].locality and cf[0].rephrase_prompts and cf[0].ground_truth
    zs = load_benchmark("zsre", n=4)
    assert len(zs) == 4 and zs[0].locality[0].name == "nq" and zs[0].target_new == "unmanned aircraft"
    with pytest.raises(BenchError, match="unknown benchmark 'mquake'"):
        load_benchmark("mquake")
    with pytest.raises(BenchError, match="--offset 5000"):
        load_benchmark("counterfact", offset=5000)


def test_complete_records_drops_a_cut_off_batch():
    cases = [EditCase(case_id=c, template="A fact about {}", subject=c, target_new="x") for c in "abc"]
    recs = [{"case_id": "a", "batch": 0}, {"case_id": "b", "batch": 0}, {"case_id": "c", "batch": 1}]
    assert [r["case_id"] for r in complete_records(recs, cases, 2)] == ["a", "b", "c"]  # c: the short last batch
    cut = [recs[0], recs[2]]                                  # batch 0 lost b: redone
    assert [r["case_id"] for r in complete_records(cut, cases, 2)] == ["c"]
    # each batch once, in case order, whatever order and how many times the logs hold it
    assert [r["case_id"] for r in complete_records([recs[2], recs[1], recs[0], recs[1]], cases, 2)] == ["a", "b", "c"]


def science(metrics: dict) -> dict:
    """metrics.json without its wall-clock times (which differ from run to run)."""
    assert metrics["time"]["edit_s"] > 0 and 0 < metrics["time"]["eval_share"] < 1
    return {k: v for k, v in metrics.items() if k != "time"}


def ctrl_c_at_edit(monkeypatch, n: int, cls=ROME):
    """Make ``cls``'s n-th compute() raise KeyboardInterrupt (Ctrl-C); returns the real compute."""
    real = cls.compute
    calls = {"n": 0}

    def flaky(self, requests):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(self, requests)
    monkeypatch.setattr(cls, "compute", flaky)
    return real


@pytest.fixture()
def tiny_bench(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    d = save_tiny_model_dir(tmp_path / "tiny-llama")
    subjects = ["France", "Lionel Messi", "the Thames", "Mount Everest", "Tokyo"]
    data = tmp_path / "bench.jsonl"
    data.write_text("".join(json.dumps({"case_id": f"c{i}", "prompt": f"A fact about {s}", "subject": s,
                                        "target_new": "of", "ground_truth": "the",
                                        "rephrase_prompts": [f"Another fact about {s}"]}) + "\n"
                            for i, s in enumerate(subjects)))
    hp = tmp_path / "rome.yaml"
    hp.write_text(yaml.safe_dump({"layer": 1, "mom2_adjustment": False, "v_num_grad_steps": 10,
                                  "clamp_norm_factor": 1000.0, "kl_factor": 0.0, "v_weight_decay": 0.0,
                                  "context_template_length_params": [[3, 1]]}))
    args = ["bench", "counterfact", "--data", str(data), "--model", str(d), "--hparams", str(hp),
            "--out", str(tmp_path / "runs"), "--device", "cpu"]
    return args, tmp_path


def test_interrupted_bench_resumes_without_losing_or_repeating_cases(tiny_bench, monkeypatch):
    args, tmp = tiny_bench
    real = ctrl_c_at_edit(monkeypatch, 3)
    res = runner.invoke(app, args)
    assert res.exit_code == 130 and "kedit bench --resume" in res.output
    (run,) = list((tmp / "runs").iterdir())
    assert [r["case_id"] for r in read_results(run / "results.jsonl")] == ["c0", "c1"]
    assert not (run / "metrics.json").exists()  # unfinished runs do not look complete

    monkeypatch.setattr(ROME, "compute", real)
    res = runner.invoke(app, ["bench", "--resume", str(run)])
    assert res.exit_code == 0, res.output
    ids = [r["case_id"] for r in read_results(run / "results.jsonl")]
    assert ids == ["c0", "c1", "c2", "c3", "c4"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n"] == 5 and "rewrite_acc" in metrics["post"]
    res = runner.invoke(app, ["bench", "--resume", str(run)])
    assert res.exit_code == 2 and "already complete" in res.output


def test_half_done_batch_is_redone(tiny_bench):
    args, tmp = tiny_bench
    res = runner.invoke(app, [*args, "--batch-size", "2", "-n", "4"])
    assert res.exit_code == 0, res.output
    (run,) = list((tmp / "runs").iterdir())
    full = read_results(run / "results.jsonl")
    assert [r["batch"] for r in full] == [0, 0, 1, 1]
    # simulate a cut inside batch 1: one of its two records written, metrics not yet
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full[:3]) + '{"case_id": "c3", "ba')
    (run / "metrics.json").unlink()
    res = runner.invoke(app, ["bench", "--resume", str(run)])
    assert res.exit_code == 0, res.output
    again = read_results(run / "results.jsonl")
    assert [r["case_id"] for r in again] == ["c0", "c1", "c2", "c3"]
    assert again[:2] == full[:2]


def test_sequential_bench_resumes_from_its_checkpoint_with_the_same_numbers(tiny_bench, monkeypatch):
    args, tmp = tiny_bench
    seq = [*args, "--sequential", "--checkpoint-every", "2"]
    res = runner.invoke(app, [*seq, "--out", str(tmp / "clean")])
    assert res.exit_code == 0, res.output
    (clean,) = list((tmp / "clean").iterdir())
    want = science(json.loads((clean / "metrics.json").read_text()))
    assert [p["edits"] for p in want["curve"]] == [2, 4, 5]
    # scored after the last edit (post) and right after each edit (post_immediate), both kept
    assert want["post_immediate"].keys() == want["post"].keys()
    recs = read_results(clean / "results.jsonl")
    assert want["post_immediate"]["rewrite_acc"] == pytest.approx(
        sum(r["post_immediate"]["rewrite_acc"] for r in recs) / len(recs))
    assert not (clean / "checkpoint.safetensors").exists()

    real = ctrl_c_at_edit(monkeypatch, 4)
    res = runner.invoke(app, [*seq, "--out", str(tmp / "cut")])
    assert res.exit_code == 130
    (run,) = list((tmp / "cut").iterdir())
    assert (run / "checkpoint.safetensors").exists() and not (run / "metrics.json").exists()
    assert len(read_results(run / "results.jsonl")) == 3
    monkeypatch.setattr(ROME, "compute", real)
    res = runner.invoke(app, ["bench", "--resume", str(run)])
    assert res.exit_code == 0, res.output
    got = science(json.loads((run / "metrics.json").read_text()))
    assert got == want  # same final metrics and the same curve as the uninterrupted run
    recs = read_results(run / "results.jsonl")
    assert [r["case_id"] for r in recs] == ["c0", "c1", "c2", "c3", "c4"]
    assert all("post_immediate" in r for r in recs)
    assert not (run / "checkpoint.safetensors").exists()


def test_sequential_alphaedit_resumes_with_its_preserved_keys(tiny_bench, monkeypatch):
    """AlphaEdit's sequential state (Σ k kᵀ of the committed edits) goes into the checkpoint;
    a resumed run that lost it would solve the later batches differently."""
    from safetensors import safe_open

    from kedit.methods.locate.alphaedit import AlphaEdit

    args, tmp = tiny_bench
    hp = tmp / "alphaedit.yaml"
    # threshold far above every eigenvalue: P = I, so the preserved keys alone keep earlier edits
    hp.write_text(yaml.safe_dump({"layers": [1, 2], "mom2_samples": 20, "v_num_grad_steps": 10,
                                  "clamp_norm_factor": 1000.0, "kl_factor": 0.0, "v_weight_decay": 0.0,
                                  "context_template_length_params": [[3, 1]], "nullspace_threshold": 1e9,
                                  "l2": 1e-3}))
    i = args.index("--hparams")
    seq = [*args[:i + 1], str(hp), *args[i + 2:], "--method", "alphaedit", "--sequential",
           "--batch-size", "2", "--checkpoint-every", "2"]
    res = runner.invoke(app, [*seq, "--out", str(tmp / "clean")])
    assert res.exit_code == 0, res.output
    (clean,) = list((tmp / "clean").iterdir())
    want = science(json.loads((clean / "metrics.json").read_text()))

    real = ctrl_c_at_edit(monkeypatch, 3, AlphaEdit)           # Ctrl-C in the third batch
    res = runner.invoke(app, [*seq, "--out", str(tmp / "cut")])
    assert res.exit_code == 130
    (run,) = list((tmp / "cut").iterdir())
    with safe_open(str(run / "checkpoint.safetensors"), framework="pt") as f:
        assert int(f.get_tensor("state/committed")) == 4
        assert float(f.get_tensor("state/preserved.1").abs().sum()) > 0
    monkeypatch.setattr(AlphaEdit, "compute", real)
    res = runner.invoke(app, ["bench", "--resume", str(run)])
    assert res.exit_code == 0, res.output
    assert science(json.loads((run / "metrics.json").read_text())) == want

    # without the state the third batch is solved as if nothing were preserved: other numbers
    monkeypatch.setattr(AlphaEdit, "load_state", lambda self, tensors: self.prepare())
    real = ctrl_c_at_edit(monkeypatch, 3, AlphaEdit)
    res = runner.invoke(app, [*seq, "--out", str(tmp / "lost")])
    (lost,) = list((tmp / "lost").iterdir())
    monkeypatch.setattr(AlphaEdit, "compute", real)
    assert runner.invoke(app, ["bench", "--resume", str(lost)]).exit_code == 0
    assert science(json.loads((lost / "metrics.json").read_text())) != want


def test_bench_generation_metrics(tiny_bench):
    args, tmp = tiny_bench
    res = runner.invoke(app, [*args, "-n", "2", "--generation", "--gen-tokens", "8"])
    assert res.exit_code == 0, res.output
    (run,) = list((tmp / "runs").iterdir())
    m = json.loads((run / "metrics.json").read_text())
    assert m["pre"]["fluency"] > 0 and m["post"]["fluency"] > 0
    assert "consistency" not in m["post"]  # no reference data given
    res = runner.invoke(app, [*args, "--checkpoint-every", "2"])
    assert res.exit_code == 2 and "--sequential" in res.output
