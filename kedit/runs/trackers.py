"""Experiment trackers (``--report-to tensorboard|wandb|mlflow``): a bench run's resolved
config, its sequential curve and its final metrics, logged through the trackers' own
libraries, offline by default.

One interface, :class:`Tracker` (``start(config)`` / ``log(metrics, step)`` /
``finish(final)``), one adapter per library, each imported only when asked for:

- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` into
  ``<report dir>/tensorboard/<run name>/`` (scalars; the config as text and as hparams).
- ``wandb``: ``wandb.init(dir=<report dir>)``, mode ``offline`` unless ``WANDB_MODE`` is
  set (files under ``<report dir>/wandb/``; ``wandb sync`` uploads them later).
- ``mlflow``: a local SQLite store ``<report dir>/mlflow.db`` (artifacts in
  ``<report dir>/mlartifacts``) unless ``MLFLOW_TRACKING_URI`` is set; experiment = the
  sweep's name (or ``kedit``), run = the run directory's name.

The report directory is the run directory (a sweep: the sweep directory, one tracker run
per point).  :class:`Reporter` fans out to the trackers of one run and keeps
``trackers.json`` in the run directory: each tracker's run id (a resumed run goes on
logging into the same tracker run) and, per stream, the last step logged, so that a step
is logged once even when a resumed run redoes it (logging is idempotent per step).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

STATE = "trackers.json"


class TrackerError(ValueError):
    """An unknown tracker or a tracker library that is not installed (one line)."""


class Tracker(Protocol):
    """One experiment tracker run.  ``run_id`` (after :meth:`start`) is what a resumed run
    hands back to the adapter to continue the same tracker run."""

    run_id: str | None

    def start(self, config: Mapping) -> None: ...

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def finish(self, final: Mapping[str, float] | None) -> None: ...


def flatten(tree: Mapping, prefix: str = "", sep: str = ".") -> dict[str, float | int | str | bool]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and other values as text, ``None`` left out."""
    out: dict = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + sep, sep))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif value is not None:
            out[name] = json.dumps(value, default=str)
    return out


def numbers(tree: Mapping, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of ``tree``, flattened with '/' (``post/rewrite_acc``)."""
    return {k: float(v) for k, v in flatten(tree, prefix, "/").items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


# --------------------------------------------------------------------------- adapters

class TensorBoard:
    """``torch.utils.tensorboard.SummaryWriter`` into ``<dir>/tensorboard/<name>``."""

    library, module = "tensorboard", "torch.utils.tensorboard"

    def __init__(self, report_dir: Path, name: str, group: str | None, run_id: str | None = None):
        self.log_dir = Path(report_dir) / "tensorboard" / name
        self.run_id, self.writer, self.params = name, None, {}

    def start(self, config: Mapping) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.params = flatten(config)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in self.params.items()))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def finish(self, final: Mapping[str, float] | None) -> None:
        if final:   # add_hparams writes the metrics as scalars too (final/*)
            self.writer.add_hparams(self.params, {f"final/{k}": v for k, v in final.items()}, run_name=".")
        self.writer.close()


class Wandb:
    """``wandb.init`` with files under ``<dir>/wandb``, offline unless ``WANDB_MODE`` says otherwise."""

    library, module = "wandb", "wandb"

    def __init__(self, report_dir: Path, name: str, group: str | None, run_id: str | None = None):
        self.dir, self.name, self.group, self.run_id, self.run = Path(report_dir), name, group, run_id, None

    def start(self, config: Mapping) -> None:
        import wandb

        self.dir.mkdir(parents=True, exist_ok=True)
        mode = None if os.environ.get("WANDB_MODE") else "offline"
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "kedit", name=self.name, group=self.group,
                              config=dict(config), dir=str(self.dir), id=self.run_id,
                              resume="allow" if self.run_id else None, mode=mode)
        self.run_id = self.run.id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def finish(self, final: Mapping[str, float] | None) -> None:
        if final:
            self.run.summary.update({f"final/{k}": v for k, v in final.items()})
        self.run.finish(exit_code=0 if final is not None else 1)


class Mlflow:
    """An MLflow run in a SQLite store ``<dir>/mlflow.db`` (artifacts: ``<dir>/mlartifacts``)
    unless ``MLFLOW_TRACKING_URI`` is set.  (MLflow 3 refuses new ``file:`` stores by default:
    SQLite is its own local store.)"""

    library, module = "mlflow", "mlflow"

    def __init__(self, report_dir: Path, name: str, group: str | None, run_id: str | None = None):
        self.dir, self.name, self.group, self.run_id = Path(report_dir).resolve(), name, group, run_id

    def start(self, config: Mapping) -> None:
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            self.dir.mkdir(parents=True, exist_ok=True)
            mlflow.set_tracking_uri(f"sqlite:///{self.dir / 'mlflow.db'}")
        if self.run_id:
            run = mlflow.start_run(run_id=self.run_id)
        else:
            name = self.group or "kedit"
            found = mlflow.get_experiment_by_name(name)
            experiment = found.experiment_id if found else mlflow.create_experiment(
                name, artifact_location=(self.dir / "mlartifacts").as_uri())
            run = mlflow.start_run(experiment_id=experiment, run_name=self.name)
            # MLflow refuses a parameter logged twice with another value: only a new run logs them
            mlflow.log_params({k: str(v)[:500] for k, v in flatten(config).items()})
        self.run_id = run.info.run_id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        import mlflow

        mlflow.log_metrics({_mlflow_key(k): v for k, v in metrics.items()}, step=step)

    def finish(self, final: Mapping[str, float] | None) -> None:
        import mlflow

        if final:
            mlflow.log_metrics({_mlflow_key(f"final/{k}"): v for k, v in final.items()})
        mlflow.end_run("FINISHED" if final is not None else "KILLED")


def _mlflow_key(key: str) -> str:
    """MLflow metric names: letters, digits, ``_ - . / space``; kedit's names already are."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


#: ``--report-to`` name -> adapter; the extra to install is the name.
ADAPTERS: Mapping[str, type] = MappingProxyType({"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": Mlflow})


def parse_report_to(values: Sequence[str] | None) -> list[str]:
    """``--report-to`` (repeatable, or a comma list) -> tracker names in order, each once;
    an unknown name or a library that is not installed is a :class:`TrackerError`."""
    names: list[str] = []
    for value in values or []:
        for name in (v.strip().lower() for v in value.split(",")):
            if name in ("", "none"):
                continue
            if name not in ADAPTERS:
                raise TrackerError(f"--report-to {name}: unknown tracker (known: {', '.join(ADAPTERS)})")
            if name not in names:
                names.append(name)
    for name in names:
        check_installed(name)
    return names


def check_installed(name: str) -> None:
    adapter = ADAPTERS[name]
    try:
        importlib.import_module(adapter.module)
    except ImportError:
        raise TrackerError(f"--report-to {name}: the {adapter.library} library is not installed "
                           f"(pip install 'kedit[{name}]')") from None


# --------------------------------------------------------------------------- one run's trackers

class Reporter:
    """The trackers of one bench run.  ``log(metrics, step, stream)`` logs a step of a stream
    (``edits``: each checkpoint's post metrics; ``curve``: the ``--checkpoint-every`` points)
    only when it is past the last step of that stream already logged (``trackers.json``)."""

    def __init__(self, names: Sequence[str], run_dir: Path, *, report_dir: Path | None = None,
                 name: str | None = None, group: str | None = None):
        self.state_path = Path(run_dir) / STATE
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        ids = self.state.setdefault("ids", {})
        self.state.setdefault("logged", {})
        name = name or Path(run_dir).name
        self.trackers = {n: ADAPTERS[n](Path(report_dir or run_dir), name, group, ids.get(n)) for n in names}

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def start(self, config: Mapping) -> None:
        config = json.loads(json.dumps(config, default=str))     # as config.yaml holds it: plain values
        for n, tracker in self.trackers.items():
            tracker.start(config)
            self.state["ids"][n] = tracker.run_id
        self._save()

    def log(self, metrics: Mapping, step: int, stream: str = "edits") -> None:
        if step <= self.state["logged"].get(stream, 0):
            return
        values = numbers(metrics)
        for tracker in self.trackers.values():
            tracker.log(values, step)
        self.state["logged"][stream] = step
        self._save()

    def finish(self, final: Mapping | None) -> None:
        values = None if final is None else numbers({k: final[k] for k in ("pre", "post", "post_immediate")
                                                     if k in final})
        for tracker in self.trackers.values():
            tracker.finish(values)

    def _save(self) -> None:
        from kedit.runs.rundir import write_json

        write_json(self.state_path, self.state)
