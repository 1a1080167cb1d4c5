"""Sweeps: a grid over methods × hyperparameter values, each point one bench run.

A sweep directory holds ``sweep.yaml`` (the methods, the grid and the bench options, so
``--resume`` needs nothing else), one bench run directory per point, named after the
point (``01-memit-mom2_update_weight=1500``), and ``sweep.md``, the points side by side,
written when every point is done.  A point whose directory has ``metrics.json`` is done;
one with a directory but no metrics is resumed like any bench run; the others start.
Under a launcher every point is split over the processes as a single bench run is.

Grid axes (``--grid``): ``key=v1,v2,...`` applies to every method whose hyperparameters
have ``key``; ``method.key=v1,v2`` to that method alone.  Values are YAML, separated by
commas, or by semicolons when a value holds commas (``layers=[4,5];[5,6]``; a single
such value needs no separator: ``layers=[4,5]``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kedit.util.yamlio import read_dir_yaml
from kedit.runs.rundir import write_text

SPEC = "sweep.yaml"
TABLE = "sweep.md"
REPORT = "report"           # kedit report over the finished points
HEADLINE = ("rewrite_acc", "rephrase_acc", "locality_acc", "portability_acc", "efficacy_success",
            "paraphrase_success", "neighborhood_success", "score")


class SweepError(ValueError):
    """A grid or sweep directory that cannot be used (one line)."""


@dataclass(frozen=True)
class Point:
    """One bench run of a sweep: a method and the hyperparameter values it overrides."""

    index: int
    method: str
    overrides: dict
    fixed: tuple[str, ...] = ()      # keys with one value in the grid: not part of the name

    @property
    def name(self) -> str:
        parts = [f"{_safe(k)}={_safe(_text(v))}" for k, v in self.overrides.items() if k not in self.fixed]
        return "-".join([f"{self.index:02d}", self.method, *parts])

    def sets(self) -> list[str]:
        """The overrides as ``--set key=value`` items."""
        return [f"{k}={_text(v)}" for k, v in self.overrides.items()]


def _safe(text: str) -> str:
    """A piece of a directory name: letters, digits, '.', '_'; other runs become '-'."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-") or "x"


def _text(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _values(key: str, text: str) -> list:
    sep = ";" if ";" in text else ","
    raw = [v.strip() for v in text.split(sep)]
    if not raw or any(not v for v in raw):
        raise SweepError(f"--grid {key}={text}: empty value (expected e.g. {key}=0.1,0.5)")
    try:
        return [yaml.safe_load(v) for v in raw]
    except yaml.YAMLError:
        pass
    try:                       # one value that holds commas: layers=[4,5]
        return [yaml.safe_load(text)]
    except yaml.YAMLError:
        raise SweepError(f"--grid {key}={text}: not YAML values (separate values holding commas with ';')") from None


def parse_grid(items: list[str], methods: list[str], fields: dict[str, set[str]]) -> dict[str, dict[str, list]]:
    """``--grid`` items -> method -> {key: values}; ``fields``: each method's hyperparameter names."""
    grid: dict[str, dict[str, list]] = {m: {} for m in methods}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SweepError(f"--grid {item!r}: expected key=v1,v2 or method.key=v1,v2")
        values = _values(key, text)
        scope, dot, name = key.rpartition(".")
        if dot:
            if scope not in grid:
                raise SweepError(f"--grid {item}: '{scope}' is not one of the swept methods ({', '.join(methods)})")
            if name not in fields[scope]:
                raise SweepError(f"--grid {item}: {scope} has no hyperparameter '{name}'")
            grid[scope][name] = values
            continue
        takers = [m for m in methods if key in fields[m]]
        if not takers:
            raise SweepError(f"--grid {item}: no swept method ({', '.join(methods)}) has a hyperparameter '{key}'")
        for m in takers:
            grid[m].setdefault(key, values)
    return grid


def grid_points(methods: list[str], grid: dict[str, dict[str, list]]) -> list[Point]:
    """Every point: for each method in order, the product of its axes (one point without axes);
    a point is named by its index, its method and the values of the axes that vary."""
    out: list[Point] = []
    for m in methods:
        axes = grid.get(m, {})
        fixed = tuple(k for k, values in axes.items() if len(values) == 1)
        for combo in itertools.product(*axes.values()):
            out.append(Point(len(out) + 1, m, dict(zip(axes, combo)), fixed))
    return out


def hyperparameter_names(method_cls) -> set[str]:
    return {f.name for f in dataclasses.fields(method_cls.Params)}


def save_spec(sweep_dir: Path, spec: dict) -> None:
    write_text(Path(sweep_dir) / SPEC, yaml.safe_dump(spec, sort_keys=False))


def load_spec(sweep_dir: Path) -> dict:
    spec = read_dir_yaml(sweep_dir, SPEC, SweepError, "kedit sweep")
    if not isinstance(spec, dict) or not {"benchmark", "methods", "grid", "bench"} <= set(spec):
        raise SweepError(f"--resume {sweep_dir}: {SPEC} is not a kedit sweep spec")
    return spec


def point_state(sweep_dir: Path, point: Point) -> str:
    """``done`` (metrics.json written), ``partial`` (a run directory without it) or ``todo``."""
    run = Path(sweep_dir) / point.name
    if (run / "metrics.json").exists():
        return "done"
    return "partial" if (run / "config.yaml").exists() else "todo"


def summary(sweep_dir: Path, points: list[Point]) -> str:
    """``sweep.md``: one row per point, the post-edit headline metrics (mean, n)."""
    rows, cols = [], []
    for p in points:
        f = Path(sweep_dir) / p.name / "metrics.json"
        m = json.loads(f.read_text()) if f.exists() else {}
        rows.append((p, m))
        cols += [c for c in HEADLINE if c in m.get("post", {}) and c not in cols]
    lines = [f"# Sweep {Path(sweep_dir).name}", "",
             "| point | method | hyperparameters | n | " + " | ".join(cols) + " |",
             "|---|---|---|---|" + "---|" * len(cols)]
    for p, m in rows:
        hp = ", ".join(f"{k}={_text(v)}" for k, v in p.overrides.items()) or "(defaults)"
        vals = [f"{m['post'][c]:.3f}" if c in m.get("post", {}) else "–" for c in cols]
        lines.append(f"| {p.index} | {p.method} | {hp} | {m.get('n', '–')} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: Path, points: list[Point]) -> str:
    """Write ``sweep.md`` (atomic) and ``report/`` (``kedit report`` over the finished points:
    report.md and its charts) and return the summary's text."""
    from kedit.runs.report import write_report

    text = summary(sweep_dir, points)
    write_text(Path(sweep_dir) / TABLE, text)
    done = [Path(sweep_dir) / p.name for p in points if (Path(sweep_dir) / p.name / "metrics.json").exists()]
    if done:
        write_report(done, Path(sweep_dir) / REPORT)
    return text
