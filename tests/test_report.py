"""`kedit runs` and `kedit report` on hand-written run directories (edit runs, bench runs,
an unfinished bench run, sequential runs with a metric-vs-edits curve)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kedit.cli import app
from kedit.runs.report import config_differences, distinguish, list_runs, summarize, write_report

runner = CliRunner()


def make_run(root: Path, run_id: str, config: dict, metrics: dict | None = None, records: list[dict] = ()) -> Path:
    d = root / run_id
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return d


def metrics(pre: dict, post: dict, n: int = 1, **extra) -> dict:
    return {"n": n, "pre": pre, "post": post, "stderr": {"pre": {}, "post": {k: 0.03 for k in post}}, **extra}


def edit_config(method: str, layer: int, cases: str = "cases/messi.jsonl", **extra) -> dict:
    return {"method": method, "model": {"name": "smollm2-135m", "dtype": "float32"}, "hparams": {"layer": layer},
            "cases": {"file": cases, "n": 1}, "sequential": False, "batch_size": None, "seed": 0, **extra}


@pytest.fixture()
def root(tmp_path):
    r = tmp_path / "runs"
    pre = {"rewrite_acc": 0.06, "locality_acc": 1.0, "efficacy_success": 0.36, "score": 0.46}
    make_run(r, "20261125-100000-rome-smollm2-135m-aaaaaa", {"run_id": "20261125-100000-rome-smollm2-135m-aaaaaa",
                                                              **edit_config("rome", 3)},
             metrics(pre, {"rewrite_acc": 0.93, "locality_acc": 0.95, "efficacy_success": 1.0, "score": 0.86}))
    make_run(r, "20261125-090000-memit-smollm2-135m-bbbbbb", edit_config("memit", 4, "cases/anchor-31.jsonl"),
             metrics(pre, {"rewrite_acc": 0.97, "locality_acc": 0.95, "efficacy_success": 1.0, "score": 0.9}, n=31))
    curve = [{"edits": k, "n": k, "post": {"rewrite_acc": 1 - 0.1 * k, "locality_acc": 1 - 0.05 * k}}
             for k in range(1, 6)]
    make_run(r, "20261125-110000-bench-counterfact-rome-smollm2-135m-cccccc",
             {**edit_config("rome", 3), "sequential": True, "bench": {"name": "counterfact", "n": 5}},
             metrics(pre, curve[-1]["post"], n=5, curve=curve))
    make_run(r, "20261125-120000-bench-zsre-rome-smollm2-135m-dddddd",
             {**edit_config("rome", 3), "cases": {"file": "z", "n": 10}, "bench": {"name": "zsre", "n": 10}},
             None, [{"case_id": str(i), "pre": {"rewrite_acc": 0.0}, "post": {"rewrite_acc": 1.0 * (i % 2)}}
                    for i in range(4)])
    (r / "not-a-run").mkdir()
    (r / ".20261125-130000-rome-x.partial").mkdir()
    return r


def test_list_runs_oldest_first_with_unfinished_bench_runs(root):
    runs = list_runs(root)
    assert [r.method for r in runs] == ["memit", "rome", "rome", "rome"]
    memit, rome, seq, zsre = runs
    assert (memit.n, memit.cases_name, memit.mode, memit.complete) == (31, "anchor-31", "independent", True)
    assert (seq.kind, seq.mode, len(seq.curve)) == ("bench counterfact", "sequential", 5)
    assert (zsre.complete, zsre.n, zsre.n_planned, zsre.status) == (False, 4, 10, "unfinished 4/10")
    assert zsre.metrics["post"]["rewrite_acc"] == 0.5   # from the cases finished so far
    assert rome.time.hour == 10


def test_kedit_runs_prints_the_table(root, tmp_path):
    res = runner.invoke(app, ["runs", str(root)], env={"COLUMNS": "120"})
    assert res.exit_code == 0, res.output
    out = res.output
    assert "4 runs in" in out and "11-25 09:00" in out and "anchor-31" in out and "4/10 unfinished" in out
    assert "0.97" in out and "20261125-120000-bench-zsre-rome-smollm2-135m-dddddd" in out
    assert out.index("memit") < out.index("counterfact")
    (tmp_path / "empty").mkdir()
    assert "no runs" in runner.invoke(app, ["runs", str(tmp_path / "empty")]).output
    bad = runner.invoke(app, ["runs", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "no such directory" in bad.output


def test_report_writes_markdown_and_readable_charts(root, tmp_path):
    from matplotlib.image import imread

    dirs = [root / "20261125-100000-rome-smollm2-135m-aaaaaa", root / "20261125-090000-memit-smollm2-135m-bbbbbb",
            root / "20261125-110000-bench-counterfact-rome-smollm2-135m-cccccc"]
    out = tmp_path / "report"
    res = runner.invoke(app, ["report", *map(str, dirs), "--out", str(out)], env={"COLUMNS": "120"})
    assert res.exit_code == 0, res.output
    assert "0.06 → 0.93" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["report-curve.png", "report.md", "report.png"]
    md = (out / "report.md").read_text()
    assert "| rewrite_acc | 0.06 → **0.93** ± 0.03 | 0.06 → **0.97** ± 0.03 |" in md
    assert "![pre and post per metric and run](report.png)" in md and "(report-curve.png)" in md
    assert "| 5 | 0.50 | 0.75 |" in md                            # the curve's last point
    assert "| hparams.layer | 3 | 4 | 3 |" in md and "| method | \"rome\" | \"memit\" | \"rome\" |" in md
    for name in ("report.png", "report-curve.png"):
        img = imread(out / name)
        assert img.shape[0] > 300 and img.shape[1] > 600 and img.std() > 0.05   # a real picture, not blank


def test_report_without_curves_and_bad_input(root, tmp_path):
    written = write_report([root / "20261125-100000-rome-smollm2-135m-aaaaaa"], tmp_path / "r")
    assert set(written) == {"bars", "markdown"}
    assert "Sequential" not in written["markdown"].read_text()
    res = runner.invoke(app, ["report", str(root / "not-a-run"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no config.yaml" in res.output
    assert not (tmp_path / "x").exists()


def test_config_differences_lists_only_what_differs(root):
    a = summarize(root / "20261125-100000-rome-smollm2-135m-aaaaaa")
    b = summarize(root / "20261125-090000-memit-smollm2-135m-bbbbbb")
    diffs = dict(config_differences([a, b]))
    assert diffs["hparams.layer"] == ["3", "4"] and diffs["method"] == ['"rome"', '"memit"']
    assert "model.name" not in diffs and "seed" not in diffs


def test_runs_with_the_same_label_are_told_apart_by_their_settings(root, tmp_path):
    make_run(tmp_path, "x", edit_config("rome", 5), metrics({"rewrite_acc": 0.0}, {"rewrite_acc": 1.0}))
    a = summarize(root / "20261125-100000-rome-smollm2-135m-aaaaaa")
    b = summarize(tmp_path / "x")
    c = summarize(root / "20261125-090000-memit-smollm2-135m-bbbbbb")
    assert a.label == b.label == "rome, messi, n=1"
    distinguish([a, b, c])
    assert (a.label, b.label) == ("rome, messi, n=1, layer=3", "rome, messi, n=1, layer=5")
    assert c.label == "memit, anchor-31, n=31"


def test_summary_table_has_one_row_per_run_with_mode_and_time(root, tmp_path):
    seq10 = make_run(root, "20261125-140000-bench-counterfact-memit-smollm2-135m-eeeeee",
                     {**edit_config("memit", 4), "sequential": True, "batch_size": 10,
                      "bench": {"name": "counterfact", "n": 20}},
                     metrics({"rewrite_acc": 0.06, "locality_acc": 1.0, "efficacy_success": 0.36, "score": 0.46},
                             {"rewrite_acc": 0.8, "locality_acc": 0.9, "efficacy_success": 0.95, "score": 0.7},
                             n=20, time={"edit_s": 50.0, "pre_eval_s": 1.0, "eval_s": 2.0}))
    assert summarize(seq10).mode == "sequential, batches of 10"
    md = write_report([root / "20261125-100000-rome-smollm2-135m-aaaaaa", seq10], tmp_path / "r")["markdown"].read_text()
    summary = md.split("## Summary")[1].split("## Metrics")[0]
    assert "| # | method | mode | n | rewrite | locality | ES | score | time |" in summary
    assert "| | before editing | | | 0.06 | 1.00 | 0.36 | 0.46 | |" in summary      # same cases: one pre row
    assert "| 1 | rome | independent | 1 | 0.93 | 0.95 | 1.00 | 0.86 | – |" in summary
    assert "| 2 | memit | sequential, batches of 10 | 20 | 0.80 | 0.90 | 0.95 | 0.70 | 2.5 s |" in summary
    md2 = write_report([root / "20261125-100000-rome-smollm2-135m-aaaaaa", root / "20261125-120000-bench-zsre-rome-smollm2-135m-dddddd"],
                       tmp_path / "r2")["markdown"].read_text()
    assert "before editing" not in md2                                          # different cases: no shared row
