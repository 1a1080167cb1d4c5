"""``--report-to``: bench and sweep runs log their config, the sequential curve and the final
metrics to experiment trackers.  TensorBoard runs for real (its event files are read back);
wandb and MLflow are stood in for by modules that record every call, so what kedit logs, at
which steps, on resume and from which process is checked without their libraries."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from test_bench import ctrl_c_at_edit, tiny_bench  # noqa: F401 - tiny_bench is a fixture
from test_distributed import torchrun
from typer.testing import CliRunner

from kedit.cli import app
from kedit.methods.locate.rome import ROME
from kedit.runs.trackers import Reporter, TrackerError, parse_report_to

runner = CliRunner()


def tensorboard_scalars(root: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in every event file under ``root``: tag -> [(step, value)] in file order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(root.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(f)).Load():
            for v in event.summary.value:        # the loader gives scalars as tensors
                if v.metadata.plugin_data.plugin_name == "scalars":
                    out.setdefault(v.tag, []).append((event.step, v.tensor.float_val[0]))
    return out


def tensorboard_texts(root: Path) -> str:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    texts = []
    for f in sorted(root.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(f)).Load():
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name == "text":
                    texts += [s.decode() for s in v.tensor.string_val]
    return "\n".join(texts)


def one_run(root: Path) -> Path:
    (run,) = [p for p in root.iterdir() if p.is_dir()]
    return run


class FakeWandb(types.ModuleType):
    """``wandb`` as kedit uses it: ``init`` -> a run with ``log``, ``summary``, ``finish``."""

    def __init__(self):
        super().__init__("wandb")
        self.calls: list[tuple] = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        fake, calls = self, self.calls

        class Run:
            id = kwargs.get("id") or f"w{sum(c[0] == 'init' for c in fake.calls)}"
            summary = types.SimpleNamespace(update=lambda d: calls.append(("summary", dict(d))))

            def log(self, metrics, step):
                calls.append(("log", step, dict(metrics)))

            def finish(self, exit_code=0):
                calls.append(("finish", exit_code))
        return Run()


class FakeMlflow(types.ModuleType):
    """``mlflow``'s fluent API as kedit uses it, recording every call."""

    def __init__(self):
        super().__init__("mlflow")
        self.calls: list[tuple] = []
        self.experiments: dict[str, str] = {}

    def set_tracking_uri(self, uri):
        self.calls.append(("uri", uri))

    def get_experiment_by_name(self, name):
        return types.SimpleNamespace(experiment_id=self.experiments[name]) if name in self.experiments else None

    def create_experiment(self, name, artifact_location=None):
        self.experiments[name] = f"e{len(self.experiments)}"
        self.calls.append(("experiment", name, artifact_location))
        return self.experiments[name]

    def start_run(self, run_id=None, experiment_id=None, run_name=None):
        run_id = run_id or f"m{sum(c[0] == 'start' for c in self.calls)}"
        self.calls.append(("start", run_id, experiment_id, run_name))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id))

    def log_params(self, params):
        self.calls.append(("params", dict(params)))

    def log_metrics(self, metrics, step=None):
        self.calls.append(("log", step, dict(metrics)))

    def end_run(self, status="FINISHED"):
        self.calls.append(("end", status))


@pytest.fixture()
def fakes(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    wandb, mlflow = FakeWandb(), FakeMlflow()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    return wandb, mlflow


def steps(calls, prefix: str) -> list[int]:
    """The steps at which metrics starting with ``prefix`` were logged, in call order."""
    return [c[1] for c in calls if c[0] == "log" and any(k.startswith(prefix) for k in c[2])]


def test_sequential_run_logs_config_curve_and_final_metrics_to_tensorboard(tiny_bench):
    args, tmp = tiny_bench
    res = runner.invoke(app, [*args, "-n", "4", "--sequential", "--checkpoint-every", "2",
                              "--report-to", "tensorboard"])
    assert res.exit_code == 0, res.output
    run = one_run(tmp / "runs")
    metrics = json.loads((run / "metrics.json").read_text())
    board = run / "tensorboard" / run.name
    scalars = tensorboard_scalars(board)
    assert [s for s, _ in scalars["post/rewrite_acc"]] == [1, 2, 3, 4]            # every checkpoint, step = edits
    assert [s for s, _ in scalars["curve/rewrite_acc"]] == [2, 4]
    assert [p["post"]["rewrite_acc"] for p in metrics["curve"]] == \
        pytest.approx([v for _, v in scalars["curve/rewrite_acc"]])
    for when in ("pre", "post", "post_immediate"):
        for name, value in metrics[when].items():
            (logged,) = [v for _, v in scalars[f"final/{when}/{name}"]]
            assert logged == pytest.approx(value, rel=1e-6), (when, name)
    text = tensorboard_texts(board)
    assert "method: rome" in text and "bench.sequential: True" in text and "hparams.layer: 1" in text
    assert (run / "config.yaml").read_text().count("- tensorboard") == 1           # --resume reads it


def test_resumed_run_goes_on_in_the_same_tracker_runs_without_repeating_a_step(tiny_bench, fakes, monkeypatch):
    args, tmp = tiny_bench
    wandb, mlflow = fakes
    real = ctrl_c_at_edit(monkeypatch, 4)               # edits 1-3 done, Ctrl-C in the 4th
    res = runner.invoke(app, [*args, "--sequential", "--checkpoint-every", "2", "--report-to", "wandb,mlflow"])
    assert res.exit_code == 130, res.output
    run = one_run(tmp / "runs")
    monkeypatch.setattr(ROME, "compute", real)
    res = runner.invoke(app, ["bench", "--resume", str(run)])      # --report-to comes from config.yaml
    assert res.exit_code == 0, res.output
    metrics = json.loads((run / "metrics.json").read_text())
    for calls in (wandb.calls, mlflow.calls):
        assert steps(calls, "post/") == [1, 2, 3, 4, 5]
        assert steps(calls, "curve/") == [2, 4, 5]
    # wandb: offline, files in the run directory, the first run resumed, interrupted then finished
    (first, second) = [c[1] for c in wandb.calls if c[0] == "init"]
    assert first["mode"] == second["mode"] == "offline" and first["dir"] == second["dir"] == str(run)
    assert first["id"] is None and second["id"] == "w1" and second["resume"] == "allow"
    assert first["config"]["method"] == "rome" and first["config"]["bench"]["sequential"] is True
    assert [c[1] for c in wandb.calls if c[0] == "finish"] == [1, 0]
    (summary,) = [c[1] for c in wandb.calls if c[0] == "summary"]
    assert summary["final/post/rewrite_acc"] == metrics["post"]["rewrite_acc"]
    assert summary["final/pre/rephrase_acc"] == metrics["pre"]["rephrase_acc"]
    # mlflow: a local store in the run directory, one run continued, params once, final metrics once
    uris = [c[1] for c in mlflow.calls if c[0] == "uri"]
    assert uris == [f"sqlite:///{run.resolve() / 'mlflow.db'}"] * 2
    assert [c[1] for c in mlflow.calls if c[0] == "start"] == ["m0", "m0"]
    (params,) = [c[1] for c in mlflow.calls if c[0] == "params"]
    assert params["method"] == "rome" and params["hparams.layer"] == "1" and params["bench.name"] == "counterfact"
    assert [c[1] for c in mlflow.calls if c[0] == "end"] == ["KILLED", "FINISHED"]
    (final,) = [c[2] for c in mlflow.calls if c[0] == "log" and "final/post/rewrite_acc" in c[2]]
    assert final["final/post/rewrite_acc"] == metrics["post"]["rewrite_acc"]


def test_user_settings_win_over_the_offline_defaults(tiny_bench, fakes, monkeypatch):
    args, tmp = tiny_bench
    wandb, mlflow = fakes
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    res = runner.invoke(app, [*args, "-n", "1", "--report-to", "wandb", "--report-to", "mlflow",
                              "--report-dir", str(tmp / "reports")])
    assert res.exit_code == 0, res.output
    (init,) = [c[1] for c in wandb.calls if c[0] == "init"]
    assert init["mode"] is None and init["dir"] == str(tmp / "reports")
    assert not [c for c in mlflow.calls if c[0] == "uri"]                      # MLflow reads the variable itself
    assert steps(wandb.calls, "post/") == []                                    # independent edits: no curve


def test_sweep_logs_one_tracker_run_per_point_grouped_by_the_sweep(tiny_bench, fakes):
    args, tmp = tiny_bench
    wandb, mlflow = fakes
    common = [a for a in args[2:] if a not in ("--hparams", str(tmp / "rome.yaml"), "--out", str(tmp / "runs"))]
    res = runner.invoke(app, ["sweep", "counterfact", *common, "-n", "1", "--method", "rome", "--grid", "v_lr=0.1,0.5",
                              "--grid", "layer=1", "--grid", "mom2_adjustment=false", "--grid", "v_num_grad_steps=2",
                              "--out", str(tmp / "sweeps"), "--report-to", "mlflow,wandb"])
    assert res.exit_code == 0, res.output
    sweep = one_run(tmp / "sweeps")
    inits = [c[1] for c in wandb.calls if c[0] == "init"]
    assert [(i["name"], i["group"], i["dir"]) for i in inits] == \
        [("01-rome-v_lr=0.1", sweep.name, str(sweep)), ("02-rome-v_lr=0.5", sweep.name, str(sweep))]
    assert [c for c in mlflow.calls if c[0] == "experiment"] == \
        [("experiment", sweep.name, (sweep.resolve() / "mlartifacts").as_uri())]
    assert [(c[2], c[3]) for c in mlflow.calls if c[0] == "start"] == \
        [("e0", "01-rome-v_lr=0.1"), ("e0", "02-rome-v_lr=0.5")]
    assert [c[1]["hparams.v_lr"] for c in mlflow.calls if c[0] == "params"] == ["0.1", "0.5"]
    for point in ("01-rome-v_lr=0.1", "02-rome-v_lr=0.5"):
        assert json.loads((sweep / point / "trackers.json").read_text())["ids"]["mlflow"]


class Recorder:
    """A tracker that records what it is given."""

    def __init__(self, report_dir, name, group, run_id=None):
        self.run_id, self.seen = run_id or "r1", []

    def start(self, config):
        self.seen.append(("start", dict(config)))

    def log(self, metrics, step):
        self.seen.append(("log", step, dict(metrics)))

    def finish(self, final):
        self.seen.append(("finish", final))


def test_reporter_logs_each_step_of_a_stream_once_across_restarts(tmp_path, monkeypatch):
    from kedit.runs import trackers

    monkeypatch.setattr(trackers, "ADAPTERS", {**trackers.ADAPTERS, "tensorboard": Recorder})
    first = Reporter(["tensorboard"], tmp_path)
    first.start({"method": "rome"})
    for step in (1, 2):
        first.log({"post": {"rewrite_acc": 0.5, "locality_acc.known_fact": 1.0, "note": "text"}}, step)
    first.log({"curve": {"rewrite_acc": 0.5}}, 2, "curve")
    again = Reporter(["tensorboard"], tmp_path)          # a resumed run redoes steps 2 and 3
    again.start({"method": "rome"})
    for step in (2, 3):
        again.log({"post": {"rewrite_acc": 1.0}}, step)
    again.log({"curve": {"rewrite_acc": 1.0}}, 2, "curve")
    again.finish({"n": 3, "pre": {"rewrite_acc": 0.0}, "post": {"rewrite_acc": 1.0}, "time": {"edit_s": 1.0}})
    (tracker,) = first.trackers.values()
    assert tracker.seen[1:] == [("log", 1, {"post/rewrite_acc": 0.5, "post/locality_acc.known_fact": 1.0}),
                                ("log", 2, {"post/rewrite_acc": 0.5, "post/locality_acc.known_fact": 1.0}),
                                ("log", 2, {"curve/rewrite_acc": 0.5})]
    (tracker,) = again.trackers.values()
    assert tracker.seen[1:] == [("log", 3, {"post/rewrite_acc": 1.0}),
                                ("finish", {"pre/rewrite_acc": 0.0, "post/rewrite_acc": 1.0})]


def test_report_to_names_and_missing_libraries(monkeypatch):
    assert parse_report_to(["tensorboard, TensorBoard", "none"]) == ["tensorboard"]
    assert parse_report_to(None) == []
    with pytest.raises(TrackerError, match="--report-to comet: unknown tracker"):
        parse_report_to(["tensorboard,comet"])
    monkeypatch.setitem(sys.modules, "wandb", None)       # not installed
    with pytest.raises(TrackerError, match=r"wandb library is not installed \(pip install 'kedit\[wandb\]'\)"):
        parse_report_to(["wandb"])


def test_only_the_main_process_logs_a_sharded_run(tiny_bench):
    args, tmp = tiny_bench
    proc = torchrun([*args, "--report-to", "tensorboard"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = one_run(tmp / "runs")
    files = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert len({f.name.split(".")[-2] for f in files}) == 1, files     # one writing process (pid)
    scalars = tensorboard_scalars(run / "tensorboard")
    assert len(scalars["final/post/rewrite_acc"]) == 1
    assert json.loads((run / "metrics.json").read_text())["post"]["rewrite_acc"] == \
        pytest.approx(scalars["final/post/rewrite_acc"][0][1])
