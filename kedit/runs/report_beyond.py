"""The part of a run report on scores beyond teacher forcing (``--eval generate|all``,
``--cost``): what the edited model generates against what teacher forcing credits it with,
and what editing costs the model.

Shown only for runs that have the metrics (a report of teacher-forced runs is unchanged):

* **teacher-forced against generated**, per run and kind of prompt (rewrite, rephrase,
  locality, portability): the teacher-forced accuracy beside the generated answers' scores
  (``gen_<kind>_acc``: the answer contains an accepted one; ``gen_<kind>_em``: exact match;
  ``gen_<kind>_judge``: a judge model's), before → after the edit; chart
  ``report-generated.png``: one panel per kind, per run a solid bar (teacher-forced) and a
  hatched bar (generated) after the edit, a black tick at each bar's value before it;
* **cost**, per run: ``ppl`` (perplexity on WikiText-2 test) and ``retained_acc`` (200
  known facts) before → after; chart ``report-cost.png``: the two, before (light) and after
  (solid) per run;
* **cost along a sequential run**: ``ppl`` and ``retained_acc`` at every checkpoint of a
  run's curve (``metrics.json``'s ``"curve"``), a table per run and chart
  ``report-cost-curve.png`` (one line per run, dotted: before editing).

Runs are any objects with ``metrics`` (``{"pre", "post", "curve"?}``), ``curve``, ``label``
and ``path`` (:class:`kedit.runs.report.RunSummary`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from kedit.runs.figures import COLOURS, curve_table, fmt, grid, legend_key, md, run_axis, save_png

__all__ = ["COST", "KINDS", "cost_chart", "cost_curve_chart", "generated_chart", "markdown_sections"]

#: Kinds of prompt: (name, the teacher-forced metric, the prefix of the generated scores).
KINDS = (("rewrite", "rewrite_acc", "gen_rewrite"), ("rephrase", "rephrase_acc", "gen_rephrase"),
         ("locality", "locality_acc", "gen_locality"), ("portability", "portability_acc", "gen_portability"))

#: Whole-model costs, with their panel titles.
COST = {"ppl": "perplexity on WikiText-2 test (lower is better)",
        "retained_acc": "retained knowledge: accuracy on 200 known facts"}

#: The generated scores shown per kind, with their column names.
GENERATED = (("acc", "generated (contains)"), ("em", "generated (exact)"), ("judge", "judge"))


def _value(r: Any, part: str, metric: str) -> float | None:
    v = r.metrics.get(part, {}).get(metric)
    return v if isinstance(v, (int, float)) else None


def _has(r: Any, metric: str) -> bool:
    return _value(r, "pre", metric) is not None or _value(r, "post", metric) is not None


def generated_kinds(runs: Sequence[Any]) -> list[tuple[str, str, str]]:
    """The kinds some run has generated scores for."""
    return [k for k in KINDS if any(_has(r, f"{k[2]}_acc") for r in runs)]


def cost_metrics(runs: Sequence[Any]) -> list[str]:
    return [m for m in COST if any(_has(r, m) for r in runs)]


def cost_curved(runs: Sequence[Any]) -> list[tuple[int, Any]]:
    """(index, run) of the runs whose curve holds a cost metric."""
    return [(i, r) for i, r in enumerate(runs) if any(m in p.get("post", {}) for p in r.curve for m in COST)]


def _pre_post(r: Any, metric: str) -> str:
    pre, post = _value(r, "pre", metric), _value(r, "post", metric)
    if pre is None and post is None:
        return "–"
    return f"{fmt(pre)} → **{fmt(post)}**"


# --------------------------------------------------------------------------- markdown


def markdown_sections(runs: Sequence[Any], charts: dict[str, str]) -> list[str]:
    """The report's lines on generated answers and cost ([] when no run has them);
    ``charts``: kind (``generated``, ``cost``, ``cost_curve``) -> file name."""
    lines: list[str] = []
    kinds = generated_kinds(runs)
    if kinds:
        columns = [(s, name) for s, name in GENERATED
                   if any(_has(r, f"{k[2]}_{s}") for r in runs for k in kinds)]
        lines += ["", "## Teacher-forced against generated answers", "",
                  "Mean before → **after** the edit. Teacher-forced: the token accuracy given the target's "
                  "own prefix; generated: the greedy answer to the prompt alone, cut at the first \".\" or "
                  "newline, that contains an accepted answer (contains) or is one (exact); locality generated: "
                  "the answer unchanged by the edit.", "",
                  "| # | run | kind | teacher-forced | " + " | ".join(n for _, n in columns) + " |",
                  "|---" * (len(columns) + 4) + "|"]
        for i, r in enumerate(runs, start=1):
            for name, teacher, gen in kinds:
                if not _has(r, f"{gen}_acc"):
                    continue
                lines.append(f"| {i} | {md(r.label)} | {name} | {_pre_post(r, teacher)} | "
                             + " | ".join(_pre_post(r, f"{gen}_{s}") for s, _ in columns) + " |")
        if "generated" in charts:
            lines += ["", f"![teacher-forced against generated, after the edit]({charts['generated']})"]
    costs = cost_metrics(runs)
    if costs:
        lines += ["", "## What editing costs the model", "",
                  "Mean before → **after** the edit: " + "; ".join(f"{m}: {COST[m]}" for m in costs) + ".", "",
                  "| # | run | " + " | ".join(costs) + " |", "|---" * (len(costs) + 2) + "|"]
        for i, r in enumerate(runs, start=1):
            if any(_has(r, m) for m in costs):
                lines.append(f"| {i} | {md(r.label)} | " + " | ".join(_pre_post(r, m) for m in costs) + " |")
        if "cost" in charts:
            lines += ["", f"![perplexity and retained knowledge before and after]({charts['cost']})"]
    curved = cost_curved(runs)
    if curved:
        lines += ["", "## What sequential editing costs, edit by edit", "",
                  "The model's perplexity and retained knowledge at each checkpoint of the run."]
        if "cost_curve" in charts:
            lines += ["", f"![perplexity and retained knowledge against the number of edits]({charts['cost_curve']})"]
        for i, r in curved:
            names = [m for m in COST if any(m in p.get("post", {}) for p in r.curve)]
            lines += curve_table(i + 1, r.label, r.curve, names, before={m: _value(r, "pre", m) for m in names})
    return lines


# --------------------------------------------------------------------------- charts


def _figure(n_panels: int, width: float, height: float = 3.0):
    from matplotlib.figure import Figure

    rows, cols = grid(n_panels)
    fig = Figure(figsize=(width * cols, height * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _run_handles(runs: Sequence[Any]) -> list:
    from matplotlib.patches import Patch

    return [Patch(color=COLOURS[i % len(COLOURS)], label=f"{i + 1}: {r.label}\n{Path(r.path).name}")
            for i, r in enumerate(runs)]


def generated_chart(runs: Sequence[Any], path: str | os.PathLike) -> Path | None:
    """``report-generated.png`` (module docstring); None when no run has generated scores."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    kinds = generated_kinds(runs)
    if not kinds:
        return None
    fig, axes = _figure(len(kinds) + 1, max(3.2, 0.9 * len(runs) + 1.2))
    w = 0.38
    for ax, (name, teacher, gen) in zip(axes.flat, kinds):
        for i, r in enumerate(runs):
            colour = COLOURS[i % len(COLOURS)]
            for dx, metric, hatch in ((-w / 2, teacher, None), (w / 2, f"{gen}_acc", "//")):
                post, pre = _value(r, "post", metric), _value(r, "pre", metric)
                if post is None:
                    ax.text(i + dx, 0.02, "n/a", ha="center", va="bottom", fontsize=7, color="#777777")
                    continue
                ax.bar(i + dx, post, w, color=colour if hatch is None else "white", edgecolor=colour, hatch=hatch,
                       linewidth=1.0)
                ax.text(i + dx, max(post, 0) + 0.02, f"{post:.2f}", ha="center", va="bottom", fontsize=8)
                if pre is not None:
                    ax.plot([i + dx - w / 2, i + dx + w / 2], [pre, pre], color="black", linewidth=1.5)
        ax.set_title(f"{name}: teacher-forced vs generated", fontsize=10)
        ax.set_ylim(0, 1.15)
        run_axis(ax, len(runs))
    grey = "#555555"
    styles = [Patch(color=grey, label="teacher-forced, after"),
              Patch(facecolor="white", edgecolor=grey, hatch="//", label="generated (contains), after"),
              Line2D([], [], color="black", label="before the edit")]
    fig.suptitle("teacher-forced accuracy against generated answers (x: run number)", fontsize=12)
    legend_key(fig, axes, len(kinds), styles + _run_handles(runs))
    save_png(fig, Path(path))
    return Path(path)


def cost_chart(runs: Sequence[Any], path: str | os.PathLike) -> Path | None:
    """``report-cost.png`` (module docstring); None when no run has a cost metric."""
    from matplotlib.patches import Patch

    costs = cost_metrics(runs)
    if not costs:
        return None
    fig, axes = _figure(len(costs) + 1, max(3.6, 0.9 * len(runs) + 1.2))
    w = 0.38
    for ax, m in zip(axes.flat, costs):
        top = max([v for r in runs for v in (_value(r, "pre", m), _value(r, "post", m)) if v is not None] or [1.0])
        for i, r in enumerate(runs):
            colour = COLOURS[i % len(COLOURS)]
            for dx, part, alpha in ((-w / 2, "pre", 0.3), (w / 2, "post", 1.0)):
                v = _value(r, part, m)
                if v is None:
                    continue
                ax.bar(i + dx, v, w, color=colour, alpha=alpha, edgecolor=colour, linewidth=1.0)
                ax.text(i + dx, v + 0.02 * top, f"{v:.2f}" if m != "ppl" else f"{v:.1f}", ha="center",
                        va="bottom", fontsize=8)
        ax.set_title(COST[m], fontsize=10)
        ax.set_ylim(0, 1.15 if m == "retained_acc" else 1.15 * top)
        run_axis(ax, len(runs))
    grey = "#555555"
    fig.legend(handles=[Patch(color=grey, alpha=0.3, label="before edit"), Patch(color=grey, label="after edit")],
               loc="outside upper right", ncols=2, fontsize=9, frameon=False)
    fig.suptitle("what editing costs the model (x: run number)", fontsize=12)
    legend_key(fig, axes, len(costs), _run_handles(runs))
    save_png(fig, Path(path))
    return Path(path)


def cost_curve_chart(runs: Sequence[Any], path: str | os.PathLike) -> Path | None:
    """``report-cost-curve.png`` (module docstring); None when no run's curve has a cost metric."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    curved = cost_curved(runs)
    if not curved:
        return None
    names = [m for m in COST if any(m in p.get("post", {}) for _, r in curved for p in r.curve)]
    fig, axes = _figure(len(names) + 1, 4.2)
    for ax, m in zip(axes.flat, names):
        for i, r in curved:
            colour = COLOURS[i % len(COLOURS)]
            pre = _value(r, "pre", m)
            pts = ([(0, pre)] if pre is not None else []) + [(p["edits"], p["post"][m]) for p in r.curve
                                                             if m in p.get("post", {})]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(xs) <= 60 else None, markersize=3, color=colour)
            if pre is not None:
                ax.axhline(pre, color=colour, linestyle=":", linewidth=1)
        ax.set_title(COST[m], fontsize=10)
        if m == "retained_acc":
            ax.set_ylim(-0.03, 1.05)
        ax.set_xlabel("number of edits (0: before editing)", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)

    legend_key(fig, axes, len(names), [Line2D([], [], color=COLOURS[i % len(COLOURS)], marker="o",
                                              label=f"{i + 1}: {r.label}\n{Path(r.path).name}") for i, r in curved])
    fig.suptitle("sequential editing: the model's cost at each checkpoint (dotted: before editing)", fontsize=12)
    save_png(fig, Path(path))
    return Path(path)
