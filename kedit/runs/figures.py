"""What every part of a run report shares: number and markdown-cell formatting, and the
figure building blocks (matplotlib's Agg canvas, no pyplot state; PNGs written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedit.util.atomic import atomic_path

__all__ = ["COLOURS", "fmt", "grid", "legend_key", "md", "save_png"]

#: One colour per run, in report order (cycled).
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def fmt(v: Any, digits: int = 2) -> str:
    return "–" if not isinstance(v, (int, float)) else f"{v:.{digits}f}"


def md(text: Any) -> str:
    """Text safe in a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def save_png(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def grid(n: int, ncols: int = 4) -> tuple[int, int]:
    """(rows, columns) of panels for ``n`` panels, at most ``ncols`` a row."""
    ncols = min(ncols, n)
    return -(-n // ncols), ncols


def legend_key(fig, axes, n_used: int, handles: list, title: str = "runs") -> None:
    """The legend of the runs: in the first unused panel, else under the figure."""
    free = list(axes.flat[n_used:])
    if free:
        free[0].set_visible(True)
        free[0].axis("off")
        free[0].legend(handles=handles, loc="center", frameon=False, fontsize=8, title=title, title_fontsize=9,
                       labelspacing=1.0)
    else:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)), fontsize=8,
                   frameon=False)


def run_axis(ax, n_runs: int) -> None:
    """A panel whose x positions are runs 1..n (bars per run): ticks, margins, a light grid."""
    ax.set_xticks(range(n_runs), [str(i) for i in range(1, n_runs + 1)])
    ax.set_xlim(-0.6, n_runs - 0.4)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def curve_table(number: int, label: str, curve: list[dict], names: list[str], before: dict | None = None) -> list[str]:
    """Markdown lines: run ``number``'s metrics ``names`` at each checkpoint of its ``curve``
    (``before``: a first row of pre-edit values)."""
    lines = ["", f"Run {number} ({md(label)}):", "", "| edits | " + " | ".join(names) + " |",
             "|---" * (len(names) + 1) + "|"]
    if before is not None:
        lines.append("| 0 (before) | " + " | ".join(fmt(before.get(m)) for m in names) + " |")
    for p in curve:
        lines.append(f"| {p.get('edits')} | " + " | ".join(fmt(p.get("post", {}).get(m)) for m in names) + " |")
    return lines
