"""`kedit report` on runs scored beyond teacher forcing, made by tiny-model runs end to end
(an independent `edit --eval all --cost` and a sequential `bench --eval all --cost` with
checkpoints): the teacher-forced against generated table and chart, the cost table and
chart, and the cost along the sequential run; teacher-forced runs get none of them."""

from __future__ import annotations

import pytest
from tiny import fact_world
from typer.testing import CliRunner

from kedit.cli import app
from kedit.runs.figures import fmt
from kedit.runs.report import summarize, write_report
from kedit.runs.report_beyond import cost_chart, cost_curve_chart, generated_chart, markdown_sections

runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("beyond")
    mp = pytest.MonkeyPatch()
    mp.setenv("KEDIT_HOME", str(tmp / "home"))
    d, cases, hp = fact_world(tmp)
    common = ["--method", "ft_m", "--model", str(d), "--hparams", str(hp), "--device", "cpu"]
    made = {}
    for name, args in (("edit", ["edit", str(cases), *common, "--eval", "all", "--cost", "--ppl-tokens", "300",
                                 "--gen-tokens", "0"]),
                       ("sequential", ["bench", "counterfact", "--data", str(cases), *common, "--sequential",
                                       "--checkpoint-every", "2", "--eval", "all", "--cost", "--ppl-tokens", "300"]),
                       ("teacher", ["edit", str(cases), *common, "--gen-tokens", "0"])):
        res = runner.invoke(app, [*args, "--out", str(tmp / name)])
        assert res.exit_code == 0, res.output
        (made[name],) = list((tmp / name).iterdir())
    mp.undo()
    return made, tmp


def pre_post(metrics: dict, name: str) -> str:
    return f"{fmt(metrics['pre'][name])} → **{fmt(metrics['post'][name])}**"


def test_report_shows_generated_answers_and_cost_beside_teacher_forcing(runs):
    from matplotlib.image import imread

    made, tmp = runs
    written = write_report([made["edit"], made["sequential"]], tmp / "report")
    assert {"generated", "cost", "cost_curve"} <= set(written)
    md = written["markdown"].read_text()
    edit, seq = summarize(made["edit"]), summarize(made["sequential"])

    table = md.split("## Teacher-forced against generated answers")[1].split("\n## ")[0]
    for i, r in ((1, edit), (2, seq)):
        m = r.metrics
        for kind in ("rewrite", "rephrase", "locality"):
            row = (f"| {i} | {r.label} | {kind} | {pre_post(m, kind + '_acc')} | {pre_post(m, f'gen_{kind}_acc')} | "
                   f"{pre_post(m, f'gen_{kind}_em') if f'gen_{kind}_em' in m['post'] else '–'} |")
            assert row in table, row
    assert "(report-generated.png)" in table

    cost = md.split("## What editing costs the model")[1].split("\n## ")[0]
    for i, r in ((1, edit), (2, seq)):
        assert f"| {i} | {r.label} | {pre_post(r.metrics, 'ppl')} | {pre_post(r.metrics, 'retained_acc')} |" in cost
    assert "(report-cost.png)" in cost

    curve = md.split("## What sequential editing costs, edit by edit")[1].split("\n## ")[0]
    assert "Run 2 (" in curve and "Run 1 (" not in curve           # the independent run has no curve
    assert f"| 0 (before) | {fmt(seq.metrics['pre']['ppl'])} | {fmt(seq.metrics['pre']['retained_acc'])} |" in curve
    assert [p["edits"] for p in seq.curve] == [2, 3]
    for p in seq.curve:
        assert f"| {p['edits']} | {fmt(p['post']['ppl'])} | {fmt(p['post']['retained_acc'])} |" in curve
    assert "(report-cost-curve.png)" in curve

    for kind in ("generated", "cost", "cost_curve"):
        img = imread(written[kind])
        assert img.shape[0] > 250 and img.shape[1] > 500 and img.std() > 0.05, kind   # a real picture


def test_teacher_forced_runs_get_no_generated_or_cost_part(runs, tmp_path):
    made, _ = runs
    teacher, edit = summarize(made["teacher"]), summarize(made["edit"])
    assert markdown_sections([teacher], {}) == []
    assert generated_chart([teacher], tmp_path / "g.png") is None and not (tmp_path / "g.png").exists()
    assert cost_chart([teacher], tmp_path / "c.png") is None and cost_curve_chart([teacher], tmp_path / "cc.png") is None
    # beside a run that has them, the teacher-forced run has no row in their tables
    md = "\n".join(markdown_sections([teacher, edit], {}))
    assert "| 2 | " in md and "| 1 | " not in md
