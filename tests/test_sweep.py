"""`kedit sweep`: a grid over methods × hyperparameters, each point a bench run; interrupted
sweeps resume (done points skipped, a cut point resumed); bad grids are one-line errors."""

from __future__ import annotations

import json

import pytest
from test_bench import ctrl_c_at_edit, science, tiny_bench  # noqa: F401 - tiny_bench is a fixture
from typer.testing import CliRunner

from kedit.cli import app
from kedit.methods.locate.rome import ROME
from kedit.runs.sweep import SweepError, grid_points, parse_grid

runner = CliRunner()
FIELDS = {"rome": {"layer", "v_lr"}, "memit": {"layers", "v_lr", "mom2_update_weight"}}


def test_grid_axes_and_points():
    assert parse_grid(["memit.layers=[1,2]"], ["memit"], FIELDS) == {"memit": {"layers": [[1, 2]]}}
    grid = parse_grid(["v_lr=0.1,0.5", "memit.layers=[1,2];[2]", "rome.layer=1"], ["rome", "memit"], FIELDS)
    assert grid == {"rome": {"v_lr": [0.1, 0.5], "layer": [1]}, "memit": {"v_lr": [0.1, 0.5], "layers": [[1, 2], [2]]}}
    points = grid_points(["rome", "memit"], grid)
    assert [p.name for p in points] == ["01-rome-v_lr=0.1", "02-rome-v_lr=0.5", "03-memit-v_lr=0.1-layers=1-2",
                                        "04-memit-v_lr=0.1-layers=2", "05-memit-v_lr=0.5-layers=1-2",
                                        "06-memit-v_lr=0.5-layers=2"]
    assert points[2].sets() == ["v_lr=0.1", "layers=[1, 2]"]
    for bad, msg in ((["v_lr"], "expected key=v1,v2"), (["lambda=1,2"], "no swept method"),
                     (["ft.lr=1"], "'ft' is not one of the swept methods"), (["rome.layers=1"], "rome has no"),
                     (["v_lr=0.1,"], "empty value")):
        with pytest.raises(SweepError, match=msg):
            parse_grid(bad, ["rome", "memit"], FIELDS)


def test_sweep_resumes_and_each_point_is_a_bench_run(tiny_bench, monkeypatch):
    args, tmp = tiny_bench
    common = [a for a in args[2:] if a not in ("--hparams", str(tmp / "rome.yaml"), "--out", str(tmp / "runs"))]
    sweep = ["sweep", "counterfact", *common, "-n", "2", "--method", "rome", "--grid", "v_lr=0.1,0.5",
             "--grid", "layer=1", "--grid", "mom2_adjustment=false", "--grid", "v_num_grad_steps=5",
             "--out", str(tmp / "sweeps")]
    real = ctrl_c_at_edit(monkeypatch, 3)                 # point 1: edits 1-2; point 2 cut in its first
    res = runner.invoke(app, sweep)
    assert res.exit_code == 130 and "kedit sweep --resume" in res.output
    (sweep_dir,) = list((tmp / "sweeps").iterdir())
    assert (sweep_dir / "01-rome-v_lr=0.1" / "metrics.json").exists()
    assert not (sweep_dir / "02-rome-v_lr=0.5" / "metrics.json").exists()
    calls = []
    monkeypatch.setattr(ROME, "compute", lambda self, r: calls.append(r[0].case_id) or real(self, r))
    res = runner.invoke(app, ["sweep", "--resume", str(sweep_dir)])
    assert res.exit_code == 0, res.output
    assert len(calls) == 2                                # point 1 skipped, point 2 done once
    table = (sweep_dir / "sweep.md").read_text()
    assert "| 1 | rome | v_lr=0.1, layer=1" in table and "| 2 | rome | v_lr=0.5, layer=1" in table
    # and one kedit report over the points, the runs told apart by the swept value
    report = (sweep_dir / "report" / "report.md").read_text()
    assert "v_lr=0.1" in report and "v_lr=0.5" in report and (sweep_dir / "report" / "report.png").exists()
    # a point is the bench run of its hyperparameters
    res = runner.invoke(app, ["bench", "counterfact", *common, "-n", "2", "--method", "rome", "--set", "v_lr=0.5",
                              "--set", "layer=1", "--set", "mom2_adjustment=false", "--set", "v_num_grad_steps=5",
                              "--out", str(tmp / "single")])
    assert res.exit_code == 0, res.output
    (single,) = list((tmp / "single").iterdir())
    assert science(json.loads((sweep_dir / "02-rome-v_lr=0.5" / "metrics.json").read_text())) == \
        science(json.loads((single / "metrics.json").read_text()))
    res = runner.invoke(app, ["sweep", "counterfact", "--method", "rome", "--grid", "nope=1"])
    assert res.exit_code == 2 and "no swept method (rome) has a hyperparameter 'nope'" in res.output
