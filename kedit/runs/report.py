"""Run reports: ``kedit runs`` (a table of the runs in a directory) and ``kedit report``
(several runs side by side: a markdown report and PNG charts).

A run is a directory with a ``config.yaml`` (``kedit edit`` or ``kedit bench``).  Its
numbers come from ``metrics.json``; a bench run that has not finished has none, and is
summarised from the cases in its ``results.jsonl`` so far (marked unfinished).

Charts (matplotlib, Agg, no pyplot state):

* ``report.png`` -- one panel per metric with values in [0, 1] (the EasyEdit token
  accuracies, the CounterFact success rates, the score); in each panel, per run, the
  mean before the edit (light bar) and after it (solid bar), the value written on top.
* ``report-curve.png`` -- for runs whose ``metrics.json`` has a ``"curve"`` (sequential
  bench runs: ``[{"edits": k, "n": k, "post": {metric: mean}}, ...]``, the means over the
  first k cases after k edits), one panel per metric, the metric against the number of
  edits, one line per run; the dotted line is the run's mean before editing.

Runs scored beyond teacher forcing (``--eval generate|all``, ``--cost``) add their
sections and charts (``report-generated.png``, ``report-cost.png``,
``report-cost-curve.png``): :mod:`kedit.runs.report_beyond`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kedit.runs import report_beyond as beyond
from kedit.runs.figures import COLOURS, curve_table, fmt, run_axis
from kedit.runs.figures import grid as _grid
from kedit.runs.figures import legend_key as _key
from kedit.runs.figures import md as _md
from kedit.runs.figures import save_png as _save
from kedit.util.atomic import output_dir, write_text

#: Metrics shown by ``kedit runs`` (post-edit means), with their column names: the three
#: EasyEdit accuracies and the CounterFact score (which sums up ES, PS and NS).
HEADLINE = {"rewrite_acc": "rewrite", "rephrase_acc": "rephrase", "locality_acc": "locality", "score": "score"}

#: Metrics drawn in the charts (all lie in [0, 1]), in this order, with their panel titles.
CHART_METRICS = {
    "rewrite_acc": "rewrite acc (reliability)",
    "rephrase_acc": "rephrase acc (generality)",
    "locality_acc": "locality acc",
    "portability_acc": "portability acc",
    "efficacy_success": "efficacy success (ES)",
    "paraphrase_success": "paraphrase success (PS)",
    "neighborhood_success": "neighbourhood success (NS)",
    "score": "score (harmonic mean ES/PS/NS)",
}


class ReportError(ValueError):
    """A directory that is not a readable run (one-line message)."""


@dataclass
class RunSummary:
    path: Path
    run_id: str
    time: _dt.datetime | None
    kind: str                     # "edit" or "bench <name>"
    method: str
    model: str
    n: int
    n_planned: int | None
    mode: str                     # independent | sequential | batch B
    complete: bool
    metrics: dict                 # metrics.json content ({"n", "pre", "post", "stderr", ...})
    config: dict = field(repr=False, default_factory=dict)
    note: str = ""                # what tells this run from others with the same label (see distinguish)

    @property
    def curve(self) -> list[dict]:
        return list(self.metrics.get("curve") or [])

    @property
    def status(self) -> str:
        return "complete" if self.complete else f"unfinished {self.n}/{self.n_planned or '?'}"

    @property
    def cases_name(self) -> str:
        """The benchmark's name, or the stem of the cases file."""
        if self.kind.startswith("bench "):
            return self.kind.removeprefix("bench ")
        return Path(str((self.config.get("cases") or {}).get("file") or "?")).stem

    @property
    def label(self) -> str:
        extra = "" if self.mode == "independent" else f", {self.mode}"
        return f"{self.method}, {self.cases_name}, n={self.n}{extra}" + (f", {self.note}" if self.note else "")


def _time(run_id: str, path: Path) -> _dt.datetime | None:
    """The UTC time at the start of a run id (``YYYYmmdd-HHMMSS-...``), else the
    config file's modification time."""
    try:
        return _dt.datetime.strptime(run_id[:15], "%Y%m%d-%H%M%S").replace(tzinfo=_dt.timezone.utc)
    except ValueError:
        try:
            return _dt.datetime.fromtimestamp((path / "config.yaml").stat().st_mtime, _dt.timezone.utc)
        except OSError:
            return None


def summarize(run_dir: str | os.PathLike) -> RunSummary:
    """Read one run directory (see the module docstring)."""
    from kedit.runs.runner import metrics_summary
    from kedit.runs.rundir import RUN_KINDS, read_results, run_kind

    path = Path(run_dir)
    cfg_file = path / "config.yaml"
    if not cfg_file.is_file():
        raise ReportError(f"{path}: no config.yaml (not a kedit run directory)")
    try:
        config = yaml.safe_load(cfg_file.read_text()) or {}
        metrics_file = path / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    except (yaml.YAMLError, ValueError, OSError) as e:
        raise ReportError(f"{path}: unreadable run files ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ReportError(f"{cfg_file}: expected a mapping")
    kind = run_kind(config)
    if kind not in ("edit", "bench"):
        raise ReportError(f"{path}: not an edit or bench run ({RUN_KINDS[kind]})")
    complete = metrics is not None
    if metrics is None:
        records = read_results(path / "results.jsonl")
        metrics = metrics_summary(records) if records else {"n": 0, "pre": {}, "post": {}}
    bench = config.get("bench") or {}
    planned = (config.get("cases") or {}).get("n")
    batch = config.get("batch_size")
    if config.get("sequential"):
        mode = f"sequential, batches of {batch}" if batch and batch > 1 else "sequential"
    else:
        mode = f"batch {batch}" if batch and batch > 1 else "independent"
    run_id = str(config.get("run_id") or path.name)
    name = f"{bench.get('name')}/{bench['subset']}" if bench.get("subset") else bench.get("name")
    return RunSummary(path=path, run_id=run_id, time=_time(run_id, path),
                      kind=f"bench {name}" if bench else "edit", method=str(config.get("method", "?")),
                      model=str((config.get("model") or {}).get("name", "?")), n=int(metrics.get("n", 0)),
                      n_planned=planned, mode=mode, complete=complete, metrics=metrics, config=config)


def list_runs(root: str | os.PathLike = "runs") -> list[RunSummary]:
    """Every run directly under ``root`` (hidden and unreadable directories skipped),
    oldest first."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"{root}: no such directory")
    if (root / "config.yaml").is_file():
        raise ReportError(f"{root}: a run directory; give the directory that holds runs ({root.parent})")
    out = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or not (p / "config.yaml").is_file():
            continue
        try:
            out.append(summarize(p))
        except ReportError:
            continue
    epoch = _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)
    return sorted(out, key=lambda r: (r.time or epoch, r.run_id))


# --------------------------------------------------------------------------- tables


def runs_table(runs: list[RunSummary], title: str = "runs"):
    """A rich table, one row per run: number, time, method, model, cases, n, post-edit
    headline metrics.  The run directories are listed under it by number (the ids are long)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    names = [m for m in HEADLINE if any(m in r.metrics.get("post", {}) for r in runs)]
    t = Table(title=title, caption="metrics: means after the edit", box=box.SIMPLE_HEAD, show_edge=False,
              padding=(0, 0, 0, 0))
    t.add_column("#", justify="right", no_wrap=True)
    t.add_column("UTC time", no_wrap=True)
    for col in ("method", "model", "cases"):
        t.add_column(col, overflow="fold", min_width=4)
    t.add_column("n", justify="right", overflow="fold")
    for m in names:
        t.add_column(HEADLINE[m], justify="right", no_wrap=True)
    for i, r in enumerate(runs, start=1):
        n = str(r.n) if r.complete else f"{r.n}/{r.n_planned or '?'} unfinished"
        method = r.method + ("" if r.mode == "independent" else f" ({r.mode})")
        t.add_row(str(i), r.time.strftime("%m-%d %H:%M") if r.time else "?", method, r.model, r.cases_name, n,
                  *[fmt(r.metrics.get("post", {}).get(m)) for m in names])
    paths = Text("\n".join(f"{i:>3}  {r.path}" for i, r in enumerate(runs, start=1)), no_wrap=False)
    return Group(t, paths)


def comparison_table(runs: list[RunSummary], title: str = "runs compared"):
    """A rich table, one row per metric, one column per run: pre -> post."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    t = Table(title=title, caption="mean before -> after the edit", box=box.SIMPLE_HEAD)
    t.add_column("metric", no_wrap=True)
    for i, _ in enumerate(runs, start=1):
        t.add_column(str(i), justify="right", no_wrap=True)
    for m in _metric_names(runs):
        t.add_row(m, *[_cell(r, m, markdown=False) for r in runs])
    paths = Text("\n".join(f"{i:>3}  {r.label}\n     {r.path}" for i, r in enumerate(runs, start=1)))
    return Group(t, paths)


def _metric_names(runs: list[RunSummary]) -> list[str]:
    names: dict[str, None] = {}
    for r in runs:
        for part in ("pre", "post"):
            names.update(dict.fromkeys(r.metrics.get(part, {})))
    return list(names)


def _cell(r: RunSummary, metric: str, markdown: bool = True) -> str:
    pre, post = r.metrics.get("pre", {}).get(metric), r.metrics.get("post", {}).get(metric)
    if pre is None and post is None:
        return "–"
    se = (r.metrics.get("stderr") or {}).get("post", {}).get(metric)
    after = f"**{fmt(post)}**" if markdown else fmt(post)
    return f"{fmt(pre)} → {after}" + (f" ± {se:.2f}" if isinstance(se, (int, float)) and se else "")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


#: Config keys compared by the report ("what differs between these runs").
DIFF_KEYS = ("method", "model.name", "model.dtype", "model.device", "sequential", "batch_size", "seed",
             "cases.file", "cases.n", "bench.name", "bench.n", "bench.offset", "hparams_source")


def config_differences(runs: list[RunSummary]) -> list[tuple[str, list[str]]]:
    """(key, value per run) for the settings and hyperparameters that are not the same in every run."""
    flats = [_flat(r.config) for r in runs]
    keys = [k for k in DIFF_KEYS if any(k in f for f in flats)]
    keys += sorted({k for f in flats for k in f if k.startswith("hparams.")})
    out = []
    for k in keys:
        values = [json.dumps(f.get(k), default=str) if k in f else "–" for f in flats]
        if len(set(values)) > 1:
            out.append((k, values))
    return out


def distinguish(runs: list[RunSummary], most: int = 2) -> list[RunSummary]:
    """Runs that would share a label get a note: the (at most ``most``) hyperparameters
    or settings in which they differ, e.g. ``mom2_update_weight=15000``."""
    groups: dict[str, list[RunSummary]] = {}
    for r in runs:
        r.note = ""
        groups.setdefault(r.label, []).append(r)
    for group in groups.values():
        if len(group) < 2:
            continue
        diffs = config_differences(group)
        diffs = [d for d in diffs if d[0].startswith("hparams.")] + [d for d in diffs if not d[0].startswith("hparams.")]
        for i, r in enumerate(group):
            r.note = ", ".join(f"{k.rpartition('.')[2]}={values[i]}" for k, values in diffs[:most])
    return runs


#: Columns of the report's summary table: post-edit means, one row per run.
SUMMARY = {"rewrite_acc": "rewrite", "rephrase_acc": "rephrase", "locality_acc": "locality",
           "specificity_acc": "specificity", "efficacy_success": "ES", "paraphrase_success": "PS",
           "neighborhood_success": "NS", "score": "score"}


def edit_seconds_per_case(r: RunSummary) -> float | None:
    """Editing time (method calls, evaluation excluded) per case, from metrics.json's ``time``."""
    edit_s = (r.metrics.get("time") or {}).get("edit_s")
    return edit_s / r.n if isinstance(edit_s, (int, float)) and r.n else None


def summary_lines(runs: list[RunSummary]) -> list[str]:
    """The comparison at a glance: one row per run, the headline metrics after the edit
    (and, in the first row, before it, when every run has the same pre-edit means)."""
    names = [m for m in SUMMARY if any(m in r.metrics.get("post", {}) for r in runs)]
    lines = ["", "## Summary", "",
             "Mean after the edit; time = editing seconds per case (evaluation excluded).", "",
             "| # | method | mode | n | " + " | ".join(SUMMARY[m] for m in names) + " | time |",
             "|---" * (len(names) + 5) + "|"]
    pres = {json.dumps({m: r.metrics.get("pre", {}).get(m) for m in names}, sort_keys=True) for r in runs}
    if len(pres) == 1:
        pre = runs[0].metrics.get("pre", {})
        lines.append("| | before editing | | | " + " | ".join(fmt(pre.get(m)) for m in names) + " | |")
    for i, r in enumerate(runs, start=1):
        sec = edit_seconds_per_case(r)
        lines.append(f"| {i} | {_md(r.method)} | {_md(r.mode)} | {r.n} | "
                     + " | ".join(fmt(r.metrics.get("post", {}).get(m)) for m in names)
                     + f" | {'–' if sec is None else f'{sec:.1f} s'} |")
    return lines


def render_report(runs: list[RunSummary], charts: dict[str, str]) -> str:
    """The markdown report (``charts``: kind -> file name next to it)."""
    lines = ["# kedit report", "",
             f"{len(runs)} runs, written {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC.", "",
             "| # | run | kind | method | model | n | mode | status |", "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(runs, start=1):
        lines.append(f"| {i} | {_md(r.path)} | {_md(r.kind)} | {_md(r.method)} | {_md(r.model)} | {r.n} | "
                     f"{_md(r.mode)} | {r.status} |")
    lines += summary_lines(runs)
    lines += ["", "## Metrics", "", "Mean before → **after** the edit (± standard error after the edit).", "",
              "| metric | " + " | ".join(f"{i}: {_md(r.label)}" for i, r in enumerate(runs, start=1)) + " |",
              "|---" * (len(runs) + 1) + "|"]
    for m in _metric_names(runs):
        lines.append(f"| {m} | " + " | ".join(_cell(r, m) for r in runs) + " |")
    if "bars" in charts:
        lines += ["", f"![pre and post per metric and run]({charts['bars']})"]
    curved = [(i, r) for i, r in enumerate(runs, start=1) if r.curve]
    if curved:
        lines += ["", "## Sequential editing: metrics against the number of edits", "",
                  "Mean over the cases edited so far, measured after the k-th edit."]
        if "curve" in charts:
            lines += ["", f"![metrics against the number of edits]({charts['curve']})"]
        for i, r in curved:
            names = [m for m in CHART_METRICS if any(m in p.get("post", {}) for p in r.curve)]
            lines += curve_table(i, r.label, r.curve, names)
    lines += beyond.markdown_sections(runs, charts)
    diffs = config_differences(runs)
    if diffs:
        lines += ["", "## Settings that differ", "",
                  "| setting | " + " | ".join(str(i) for i in range(1, len(runs) + 1)) + " |",
                  "|---" * (len(runs) + 1) + "|"]
        for k, values in diffs:
            lines.append(f"| {_md(k)} | " + " | ".join(_md(v) for v in values) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- charts


def bar_chart(runs: list[RunSummary], path: str | os.PathLike) -> Path | None:
    """``report.png``: pre (light) vs post (solid) per metric panel, one bar pair per run."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    names = [m for m in CHART_METRICS if any(m in r.metrics.get("post", {}) for r in runs)]
    if not names:
        return None
    rows, cols = _grid(len(names))
    width_per_panel = max(3.2, 0.9 * len(runs) + 1.2)
    fig = Figure(figsize=(width_per_panel * cols, 2.9 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    w = 0.38
    for ax, m in zip(axes.flat, names):
        for i, r in enumerate(runs):
            colour = COLOURS[i % len(COLOURS)]
            pre, post = r.metrics.get("pre", {}).get(m), r.metrics.get("post", {}).get(m)
            for dx, v, alpha in ((-w / 2, pre, 0.3), (w / 2, post, 1.0)):
                if isinstance(v, (int, float)):
                    ax.bar(i + dx, v, w, color=colour, alpha=alpha, edgecolor=colour, linewidth=1.0)
                    ax.text(i + dx, max(v, 0) + 0.02, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
                else:
                    ax.text(i + dx, 0.02, "n/a", ha="center", va="bottom", fontsize=7, color="#777777")
        ax.set_title(CHART_METRICS[m], fontsize=10)
        ax.set_ylim(0, 1.15)
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        run_axis(ax, len(runs))
    grey = "#555555"
    fig.legend(handles=[Patch(color=grey, alpha=0.3, label="before edit"), Patch(color=grey, label="after edit")],
               loc="outside upper right", ncols=2, fontsize=9, frameon=False)
    fig.suptitle("before vs after the edit, per metric (x: run number)", fontsize=12)
    _key(fig, axes, len(names), [Patch(color=COLOURS[i % len(COLOURS)], label=f"{i + 1}: {r.label}\n{r.path.name}")
                                 for i, r in enumerate(runs)])
    _save(fig, Path(path))
    return Path(path)


def curve_chart(runs: list[RunSummary], path: str | os.PathLike) -> Path | None:
    """``report-curve.png``: metric against the number of edits, one line per run with a curve."""
    from matplotlib.figure import Figure

    curved = [(i, r) for i, r in enumerate(runs) if r.curve]
    names = [m for m in CHART_METRICS if any(m in p.get("post", {}) for _, r in curved for p in r.curve)]
    if not names:
        return None
    rows, cols = _grid(len(names))
    fig = Figure(figsize=(4.0 * cols, 3.0 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, m in zip(axes.flat, names):
        for i, r in curved:
            colour = COLOURS[i % len(COLOURS)]
            pts = [(p["edits"], p["post"][m]) for p in r.curve if m in p.get("post", {})]
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(xs) <= 60 else None, markersize=3, color=colour,
                    label=f"{i + 1}: {r.label}\n{r.path.name}")
            pre = r.metrics.get("pre", {}).get(m)
            if isinstance(pre, (int, float)):
                ax.axhline(pre, color=colour, linestyle=":", linewidth=1)
        ax.set_title(CHART_METRICS[m], fontsize=10)
        ax.set_ylim(-0.03, 1.05)
        ax.set_xlabel("number of edits", fontsize=9)
        ax.grid(alpha=0.3)
    handles, _ = axes.flat[0].get_legend_handles_labels()
    _key(fig, axes, len(names), handles)
    fig.suptitle("sequential editing: mean over the cases edited so far (dotted: mean of all the run's cases "
                 "before editing)", fontsize=12)
    _save(fig, Path(path))
    return Path(path)


def write_report(run_dirs: list[str | os.PathLike | RunSummary], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Summarise runs (directories or summaries) into ``out_dir``: report.md, report.png,
    report-curve.png (when a run has a curve), and when runs have them report-generated.png,
    report-cost.png, report-cost-curve.png (:mod:`kedit.runs.report_beyond`).  Returns what
    was written, by kind."""
    if not run_dirs:
        raise ReportError("give at least one run directory")
    runs = distinguish([d if isinstance(d, RunSummary) else summarize(d) for d in run_dirs])
    written: dict[str, Path] = {}
    with output_dir(out_dir, f"--out {out_dir}") as out:
        if bar_chart(runs, out / "report.png"):
            written["bars"] = out / "report.png"
        if curve_chart(runs, out / "report-curve.png"):
            written["curve"] = out / "report-curve.png"
        for kind, name, chart in (("generated", "report-generated.png", beyond.generated_chart),
                                  ("cost", "report-cost.png", beyond.cost_chart),
                                  ("cost_curve", "report-cost-curve.png", beyond.cost_curve_chart)):
            if chart(runs, out / name):
                written[kind] = out / name
        write_text(out / "report.md", render_report(runs, {k: p.name for k, p in written.items()}))
    written["markdown"] = out / "report.md"
    return written


# --------------------------------------------------------------------------- the KnowEdit table

#: KnowEdit's datasets, in its table's order: our benchmark subset -> its name in the table.
KNOWEDIT_DATASETS = {"knowedit/wiki-recent": "WikiData_recent", "knowedit/zsre": "ZsRE",
                     "knowedit/wikibio": "WikiBio", "knowedit/wiki-counterfact": "WikiData_counterfact"}

#: KnowEdit's rows: (its metric name, kedit's metric, scale).  Accuracies are shown as
#: percentages and fluency (bits) ×100, as the published table does.
KNOWEDIT_ROWS = (("Edit Succ.", "rewrite_acc", 100.0), ("Portability", "portability_acc", 100.0),
                 ("Locality", "locality_acc", 100.0), ("Fluency", "fluency", 100.0))

#: kedit's method names as KnowEdit's table spells them (others are upper-cased).
METHOD_NAMES = {"rome": "ROME", "memit": "MEMIT", "ft_l": "FT-L", "ft_m": "FT-M", "alphaedit": "AlphaEdit",
                "emmet": "EMMET", "lora": "LoRA", "grace": "GRACE", "wise": "WISE", "ike": "IKE"}

PUBLISHED_MODEL = "Llama-2-7b-chat"


def knowedit_card() -> Path:
    """The KnowEdit dataset card shipped with kedit (MIT), which holds the published table."""
    from kedit.util.paths import package_data

    return package_data() / "benchmarks" / "knowedit" / "DATASET-CARD.md"


def published_knowedit(card: str | os.PathLike | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """The results table of KnowEdit's dataset card: ``{dataset: {metric: {method: value}}}``,
    metric names without their arrows ("Edit Succ.", "Portability", "Locality", "Fluency"),
    values as printed (percentages; fluency ×100).  A decimal comma ("64,86") is read as a
    point; an empty or unreadable cell is left out."""
    path = Path(card) if card else knowedit_card()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ReportError(f"{path}: cannot read the KnowEdit dataset card ({e.strerror or e})") from None
    start = next((i for i, line in enumerate(lines) if line.strip().startswith("|")
                  and [c.strip().lower() for c in line.strip().strip("|").split("|")][:2] == ["dataset", "metric"]),
                 None)
    if start is None:
        raise ReportError(f"{path}: no '| DataSet | Metric | ...' results table")
    methods = [c.strip() for c in lines[start].strip().strip("|").split("|")][2:]
    out: dict[str, dict[str, dict[str, float]]] = {}
    dataset = None
    for line in lines[start + 2:]:
        if not line.strip().startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0]:
            dataset = cells[0].strip("*").strip()
            out.setdefault(dataset, {})
            continue
        if dataset is None or len(cells) < 2 or not cells[1]:
            continue
        metric = cells[1].replace("↑", "").replace("↓", "").strip()
        row = out[dataset].setdefault(metric, {})
        for method, cell in zip(methods, cells[2:]):
            try:
                row[method] = float(cell.replace(",", "."))
            except ValueError:
                continue
    if not out:
        raise ReportError(f"{path}: the results table is empty")
    return out


@dataclass
class KnowEditTable:
    """The table as data: ``datasets`` (row groups, in order), ``columns`` (labels, in
    order), ``cells[(dataset, row, column)] = value``, notes per dataset."""

    datasets: list[str]
    columns: list[str]
    rows: dict[str, list[str]]                     # dataset -> row names
    cells: dict[tuple[str, str, str], float]
    n: dict[tuple[str, str], int]                  # (dataset, column) -> cases
    published: set[str]                            # columns holding published values
    notes: dict[str, str]                          # dataset -> where its cases came from
    runs: dict[tuple[str, str], RunSummary]        # (dataset, column) -> the run


def _dataset_of(r: RunSummary) -> tuple[str, str]:
    """(the row group's name, a note on its data) for a run."""
    bench = r.config.get("bench") or {}
    name = r.cases_name
    label = KNOWEDIT_DATASETS.get(name, name)
    note = str(bench.get("note") or "")
    if bench.get("data"):
        note = f"cases from {bench['data']}"
    return label, note


def knowedit_table(runs: list[RunSummary], published: bool = True,
                   card: str | os.PathLike | None = None) -> KnowEditTable:
    """Runs -> KnowEdit's table: one row group per dataset (KnowEdit's four first, then any
    other benchmark), rows Edit Succ. / Portability / Locality / Fluency (×100, as
    published) and kedit's extra rows (rephrase accuracy, each portability and locality
    kind), one column per method and model; with ``published`` the dataset card's
    Llama-2-7b-chat values sit beside each method that has them."""
    if not runs:
        raise ReportError("give at least one run directory")
    pub = published_knowedit(card) if published else {}
    order = list(KNOWEDIT_DATASETS.values())
    datasets: list[str] = []
    columns: list[str] = []
    cells: dict[tuple[str, str, str], float] = {}
    n: dict[tuple[str, str], int] = {}
    notes: dict[str, str] = {}
    owner: dict[tuple[str, str], RunSummary] = {}
    extra: dict[str, list[str]] = {}
    pub_cols: set[str] = set()
    for r in runs:
        dataset, note = _dataset_of(r)
        method = METHOD_NAMES.get(r.method, r.method.upper())
        model = Path(r.model).name if ("/" in r.model or "\\" in r.model) else r.model
        column = f"{method} · {model}" + ("" if r.mode == "independent" else f" ({r.mode})")
        if (dataset, column) in owner:
            raise ReportError(f"two runs for {dataset} × {column}: {owner[(dataset, column)].path} and {r.path} "
                              "(give one of them)")
        owner[(dataset, column)] = r
        if dataset not in datasets:
            datasets.append(dataset)
        notes.setdefault(dataset, note)
        if column not in columns:
            columns.append(column)
        post = r.metrics.get("post", {})
        for row, metric, scale in KNOWEDIT_ROWS:
            if isinstance(post.get(metric), (int, float)):
                cells[(dataset, row, column)] = post[metric] * scale
        rows = extra.setdefault(dataset, [])
        for metric, label in (("rephrase_acc", "Rephrase"),):
            if isinstance(post.get(metric), (int, float)):
                cells[(dataset, label, column)] = post[metric] * 100
                rows.append(label)
        for parent, label in (("portability_acc", "Portability"), ("locality_acc", "Locality")):
            for k, v in post.items():
                if k.startswith(parent + ".") and isinstance(v, (int, float)):
                    row = f"{label}: {k.removeprefix(parent + '.')}"
                    cells[(dataset, row, column)] = v * 100
                    rows.append(row)
        n[(dataset, column)] = r.n
        pub_values = pub.get(dataset, {})
        pcol = f"{method} · {PUBLISHED_MODEL} (published)"
        if any(method in v for v in pub_values.values()):
            for row, _, _ in KNOWEDIT_ROWS:
                if method in pub_values.get(row, {}):
                    cells[(dataset, row, pcol)] = pub_values[row][method]
            pub_cols.add(pcol)
    # the published column right after its method's (first) kedit column
    ordered: list[str] = []
    for c in columns:
        ordered.append(c)
        pcol = f"{c.split(' · ')[0]} · {PUBLISHED_MODEL} (published)"
        if pcol in pub_cols and pcol not in ordered:
            ordered.append(pcol)
    seen = list(datasets)
    datasets.sort(key=lambda d: (order.index(d) if d in order else len(order), seen.index(d)))
    all_rows = {}
    for d in datasets:
        main = [row for row, _, _ in KNOWEDIT_ROWS if any((d, row, c) in cells for c in ordered)]
        all_rows[d] = main + list(dict.fromkeys(extra.get(d, [])))
    return KnowEditTable(datasets, ordered, all_rows, cells, n, pub_cols, notes, owner)


def render_knowedit(t: KnowEditTable, chart: str | None = None) -> str:
    """The table in Markdown, KnowEdit's shape: one row per dataset × metric."""
    lines = ["# KnowEdit table", "",
             "Edit Succ., Portability and Locality: EasyEdit's token accuracies ×100; Fluency: ROME's n-gram "
             "entropy (bits) ×100; rows after the first four are kedit's own (rephrase accuracy, each "
             f"portability and locality kind). Columns marked *{PUBLISHED_MODEL} (published)* are the values "
             "of KnowEdit's dataset card, on another model (Llama-2-7b-chat) and the full test sets: they "
             "frame the scale, they are not the same experiment.", "",
             "| dataset | metric | " + " | ".join(_md(c) for c in t.columns) + " |",
             "|---|---|" + "---:|" * len(t.columns)]
    for d in t.datasets:
        first = True
        for row in t.rows[d]:
            vals = [fmt(t.cells.get((d, row, c))) for c in t.columns]
            lines.append(("| **" + _md(d) + "** |" if first else "| |") + f" {_md(row)} | " + " | ".join(vals) + " |")
            first = False
        lines.append(f"| | n (cases) | " + " | ".join(
            str(t.n[(d, c)]) if (d, c) in t.n else ("full test set" if c in t.published and
                                                   any((d, r, c) in t.cells for r in t.rows[d]) else "–")
            for c in t.columns) + " |")
    lines += ["", "Data and runs:", ""]
    for d in t.datasets:
        lines.append(f"- **{_md(d)}**: {_md(t.notes.get(d) or 'cases file')}")
        for (dd, c), r in t.runs.items():
            if dd == d:
                lines.append(f"  - {_md(c)}: `{r.path}`" + ("" if r.complete else f" ({r.status})"))
    if chart:
        lines += ["", f"![the KnowEdit table]({chart})"]
    return "\n".join(lines) + "\n"


def knowedit_chart(t: KnowEditTable, path: str | os.PathLike) -> Path | None:
    """One panel per dataset × KnowEdit metric, one bar per column (published: hatched)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    panels = [(d, row) for d in t.datasets for row, _, _ in KNOWEDIT_ROWS if row in t.rows[d]]
    if not panels:
        return None
    rows, cols = _grid(len(panels), 4)
    fig = Figure(figsize=(max(3.4, 0.55 * len(t.columns) + 1.4) * cols, 3.0 * rows + 1.0), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    kedit_cols = [c for c in t.columns if c not in t.published]

    def colour(c: str) -> str:
        base = c if c not in t.published else next((k for k in kedit_cols if k.split(" · ")[0] == c.split(" · ")[0]), c)
        return COLOURS[kedit_cols.index(base) % len(COLOURS)] if base in kedit_cols else "#777777"

    for ax, (d, row) in zip(axes.flat, panels):
        for i, c in enumerate(t.columns):
            v = t.cells.get((d, row, c))
            if v is None:
                continue
            pub = c in t.published
            ax.bar(i, v, 0.8, color=colour(c), alpha=0.35 if pub else 1.0, hatch="//" if pub else None,
                   edgecolor=colour(c))
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_title(f"{d}: {row}", fontsize=10)
        ax.set_xticks(range(len(t.columns)), [str(i + 1) for i in range(len(t.columns))], fontsize=8)
        if row != "Fluency":
            ax.set_ylim(0, 110)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    handles = [Patch(facecolor=colour(c), alpha=0.35 if c in t.published else 1.0,
                     hatch="//" if c in t.published else None, edgecolor=colour(c), label=f"{i + 1}: {c}")
               for i, c in enumerate(t.columns)]
    _key(fig, axes, len(panels), handles, title="columns")
    fig.suptitle("KnowEdit metrics (×100); hatched: published values on Llama-2-7b-chat", fontsize=12)
    _save(fig, Path(path))
    return Path(path)


def write_knowedit_table(run_dirs: list[str | os.PathLike | RunSummary], out_dir: str | os.PathLike,
                         published: bool = True) -> dict[str, Path]:
    """``knowedit.md`` and ``knowedit.png`` in ``out_dir``; returns what was written."""
    runs = [d if isinstance(d, RunSummary) else summarize(d) for d in run_dirs]
    table = knowedit_table(runs, published=published)
    written: dict[str, Path] = {}
    with output_dir(out_dir, f"--out {out_dir}") as out:
        if knowedit_chart(table, out / "knowedit.png"):
            written["chart"] = out / "knowedit.png"
        write_text(out / "knowedit.md", render_knowedit(table, "knowedit.png" if "chart" in written else None))
    written["markdown"] = out / "knowedit.md"
    return written
